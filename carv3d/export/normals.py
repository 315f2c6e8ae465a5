"""Smooth shading normals on the welded mesh, split only at creases.

Each face corner gets the normal of its *smoothing group*: the corners of one vertex that are
connected through edges whose two faces meet at less than the crease angle,

    smooth edge  ⇔  n_f · n_g ≥ cos(θ_crease),

and the group's normal is the angle-weighted mean of its faces' normals (Thürmer & Wüthrich 1998),

    n = normalise( Σ_{corners c in the group} α_c · n_{face(c)} ),

α_c the corner's interior angle, so that the result does not depend on how the surface around the
vertex is triangulated. A vertex on a smooth surface has one group (one normal); a vertex on a
crease has one per side. θ_crease = 180° makes every vertex smooth (one normal per vertex, what PLY
stores). The groups are the normals written to OBJ (``vn``, indexed per corner) and GLB (``NORMAL``,
the vertex split where position, UV or normal differs).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from carv3d.export.defects import corner_groups, corner_pairs


def unit(x: np.ndarray, fallback: Tuple[float, float, float] = (0.0, 1.0, 0.0)) -> np.ndarray:
    """Rows normalised to length 1; zero rows become ``fallback`` (a glTF NORMAL must be unit length)."""
    x = np.asarray(x, dtype=np.float64)
    length = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(length > 1e-20, x / np.maximum(length, 1e-20), np.asarray(fallback))


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) unit normals (v1 − v0) × (v2 − v0) / |…| (outward for counter-clockwise faces)."""
    v = np.asarray(vertices, dtype=np.float64)[faces]
    return unit(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]))


def corner_angles(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) interior angle of every face corner, in radians."""
    v = np.asarray(vertices, dtype=np.float64)[faces]
    angles = np.empty(faces.shape, dtype=np.float64)
    for i in range(3):
        a = unit(v[:, (i + 1) % 3] - v[:, i], (1.0, 0.0, 0.0))
        b = unit(v[:, (i + 2) % 3] - v[:, i], (1.0, 0.0, 0.0))
        angles[:, i] = np.arccos(np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0))
    return angles


def corner_normals(vertices: np.ndarray, faces: np.ndarray, crease_angle: float = 60.0) -> Tuple[np.ndarray, np.ndarray]:
    """Shading normals per smoothing group (module docstring) and each corner's group.

    Args:
        vertices: (V, 3) welded positions.
        faces: (F, 3) counter-clockwise faces.
        crease_angle: θ_crease in degrees; edges whose faces meet at a larger angle are hard.

    Returns:
        normals: (N, 3) float32 unit normals, one per smoothing group.
        corner_normal: (F, 3) int64 index into ``normals`` of each face corner.
    """
    faces = np.asarray(faces, dtype=np.int64)
    n_faces = len(faces)
    if n_faces == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    normal_f = face_normals(vertices, faces)
    a, b = corner_pairs(faces, len(vertices))
    smooth = np.einsum("ij,ij->i", normal_f[a // 3], normal_f[b // 3]) >= np.cos(np.radians(crease_angle)) - 1e-9
    label = corner_groups(3 * n_faces, a[smooth], b[smooth])
    # A group never spans two vertices (pairs join corners of one vertex), so (label) is the group id.
    groups, corner_normal = np.unique(label, return_inverse=True)
    weighted = (corner_angles(vertices, faces)[..., None] * normal_f[:, None, :]).reshape(-1, 3)
    sums = np.zeros((len(groups), 3))
    np.add.at(sums, corner_normal.reshape(-1), weighted)
    return unit(sums).astype(np.float32), corner_normal.reshape(n_faces, 3).astype(np.int64)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V, 3) float32 angle-weighted unit vertex normals (θ_crease = 180°: one per vertex)."""
    faces = np.asarray(faces, dtype=np.int64)
    weighted = (corner_angles(vertices, faces)[..., None] * face_normals(vertices, faces)[:, None, :]).reshape(-1, 3)
    sums = np.zeros((len(vertices), 3))
    np.add.at(sums, faces.reshape(-1), weighted)
    return unit(sums).astype(np.float32)
