"""What is wrong with a triangle mesh: the checks a modelling tool (Blender, a slicer, a boolean) makes.

Every count is computed from the face array alone (plus positions for areas and enclosure), with
numpy and scipy, so it can be run after every geometric step of the export:

- **degenerate faces**: a repeated vertex index, or area ≤ ``area_eps``;
- **duplicate faces**: faces over the same three vertices (any winding) beyond the first;
- **edges**: each undirected edge {a, b} is used by ``n`` faces. ``n = 1`` is a *boundary* edge (a
  hole), ``n > 2`` a *non-manifold* edge (Blender's "Select Non-Manifold" finds both);
- **orientation**: on a consistently wound 2-manifold every directed half-edge a→b appears once and
  its twin b→a once; a half-edge used twice is a winding flip;
- **non-manifold vertices** ("bow ties"): the faces around a vertex fall into more than one fan,
  fans being connected through edges that contain the vertex;
- **components**: vertices sharing a face are connected; a mesh is *watertight* when every edge has
  exactly two faces and the winding is consistent;
- **genus** of a closed component from its Euler characteristic χ = V − E + F = 2 − 2g.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph


@dataclass
class MeshReport:
    """Counts of a mesh's defects (all 0 and ``watertight`` for a clean closed 2-manifold).

    Attributes:
        vertices, faces: sizes.
        degenerate_faces: faces with a repeated index or (near) zero area.
        duplicate_faces: extra copies of a face over the same three vertices.
        boundary_edges: edges with one face (holes).
        nonmanifold_edges: edges with more than two faces.
        flipped_edges: directed half-edges used by two faces (inconsistent winding).
        nonmanifold_vertices: vertices whose faces form more than one fan.
        unreferenced_vertices: vertices no face uses.
        components: connected components (by shared vertices).
        watertight: every edge has exactly two faces, winding consistent (and no degenerate faces).
        genus: total genus of the closed components (−1 when the mesh is not watertight).
    """

    vertices: int
    faces: int
    degenerate_faces: int
    duplicate_faces: int
    boundary_edges: int
    nonmanifold_edges: int
    flipped_edges: int
    nonmanifold_vertices: int
    unreferenced_vertices: int
    components: int
    watertight: bool
    genus: int

    @property
    def clean(self) -> bool:
        """A closed, consistently wound 2-manifold with nothing degenerate, duplicated or loose."""
        return (self.watertight and self.degenerate_faces == 0 and self.duplicate_faces == 0
                and self.nonmanifold_vertices == 0 and self.unreferenced_vertices == 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "clean": self.clean}

    def summary(self) -> str:
        """One line for the log."""
        return (f"{self.faces} faces, {self.components} component(s), {self.nonmanifold_edges} non-manifold edges, "
                f"{self.boundary_edges} boundary edges, {self.duplicate_faces} duplicate and {self.degenerate_faces} "
                f"degenerate faces, {self.nonmanifold_vertices} non-manifold vertices, {self.flipped_edges} flipped "
                f"edges, watertight {self.watertight}, genus {self.genus}")


def face_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F,) triangle areas |(v1 − v0) × (v2 − v0)| / 2."""
    v = np.asarray(vertices, dtype=np.float64)[faces]
    return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)


def degenerate_mask(vertices: np.ndarray, faces: np.ndarray, area_eps: float = 0.0) -> np.ndarray:
    """(F,) True for faces with a repeated vertex index or area ≤ ``area_eps``."""
    faces = np.asarray(faces)
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])
    return repeated | (face_areas(vertices, faces) <= area_eps)


def row_keys(rows: np.ndarray) -> np.ndarray:
    """(N,) int64 key of each row of small non-negative ints, equal iff the rows are equal.

    ``key = Σ_j rows[:, j] · base^(k−1−j)`` with base = max + 1 (1-D keys make ``np.unique`` a fast
    hash or sort instead of a row-wise lexicographic one).
    """
    rows = np.asarray(rows, dtype=np.int64)
    base = np.int64(int(rows.max()) + 1 if rows.size else 1)
    if float(base) ** rows.shape[1] >= 2**62:
        raise ValueError("too many vertices to key rows of indices in 64 bits")
    key = np.zeros(len(rows), dtype=np.int64)
    for j in range(rows.shape[1]):
        key = key * base + rows[:, j]
    return key


def duplicate_mask(faces: np.ndarray) -> np.ndarray:
    """(F,) True for every face over the same vertex set as an earlier face (any winding)."""
    faces = np.asarray(faces)
    if len(faces) == 0:
        return np.zeros(0, dtype=bool)
    _, first = np.unique(row_keys(np.sort(faces, axis=1)), return_index=True)
    mask = np.ones(len(faces), dtype=bool)
    mask[first] = False
    return mask


def edge_face_counts(faces: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Undirected edges and how many faces use each.

    Returns:
        edges: (E, 2) int64 sorted vertex pairs (a < b), unique.
        counts: (E,) number of faces containing the edge.
    """
    faces = np.asarray(faces, dtype=np.int64)
    half = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    sorted_half = np.sort(half, axis=1)
    _, first, counts = np.unique(row_keys(sorted_half), return_index=True, return_counts=True)
    return sorted_half[first], counts


def corner_pairs(faces: np.ndarray, n_vertices: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pairs of corners of one vertex whose faces share an edge through that vertex.

    Corner ``3f + i`` is vertex ``faces[f, i]`` of face f. Around a vertex v, the corners of two faces
    that both contain the edge {v, x} form a pair; walking pairs goes round v's fan.

    Returns:
        (P,) and (P,) int64 corner indices of the pairs (on a manifold mesh, two per edge).
    """
    faces = np.asarray(faces, dtype=np.int64)
    n_faces = len(faces)
    corner = np.arange(3 * n_faces).reshape(n_faces, 3)
    rows, keys_v, keys_o = [], [], []
    for i in range(3):  # each corner touches the edges to the face's two other vertices
        for j in ((i + 1) % 3, (i + 2) % 3):
            rows.append(corner[:, i])
            keys_v.append(faces[:, i])
            keys_o.append(faces[:, j])
    rows = np.concatenate(rows)
    key = np.concatenate(keys_v) * np.int64(max(n_vertices, 1)) + np.concatenate(keys_o)  # (vertex, other end)
    order = np.argsort(key, kind="stable")
    key_sorted, rows_sorted = key[order], rows[order]
    same = key_sorted[1:] == key_sorted[:-1]
    return rows_sorted[1:][same], rows_sorted[:-1][same]


def corner_groups(n_corners: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n_corners,) component label of every corner in the graph with edges (a, b)."""
    graph = scipy.sparse.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n_corners,) * 2)
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def vertex_fans(faces: np.ndarray, n_vertices: int) -> np.ndarray:
    """(V,) number of fans around each vertex (0 unused, 1 manifold, >1 a "bow tie").

    The fans of a vertex are the connected components of its corners under :func:`corner_pairs`.
    """
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return np.zeros(n_vertices, dtype=np.int64)
    label = corner_groups(3 * len(faces), *corner_pairs(faces, n_vertices))
    keys = np.unique(faces.reshape(-1).astype(np.int64) * np.int64(3 * len(faces)) + label)  # (vertex, fan)
    return np.bincount(keys // np.int64(3 * len(faces)), minlength=n_vertices)


def component_labels(faces: np.ndarray, n_vertices: int) -> Tuple[int, np.ndarray]:
    """Connected components of a mesh (vertices that share a face are connected).

    Returns:
        n_components (of the faces; unreferenced vertices do not count) and (F,) int labels.
    """
    faces = np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        return 0, np.zeros(0, dtype=np.int64)
    rows = np.concatenate([faces[:, 0], faces[:, 1]])
    cols = np.concatenate([faces[:, 1], faces[:, 2]])
    graph = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n_vertices,) * 2)
    _, vertex_label = scipy.sparse.csgraph.connected_components(graph, directed=False)
    labels = vertex_label[faces[:, 0]]
    _, labels = np.unique(labels, return_inverse=True)  # 0..n−1 over the faces' components only
    return int(labels.max()) + 1, labels.reshape(-1)


def inspect_mesh(vertices: np.ndarray, faces: np.ndarray, area_eps: float = 0.0) -> MeshReport:
    """Count a mesh's defects (see the module docstring for each definition)."""
    vertices = np.asarray(vertices)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    n_vertices = len(vertices)
    if len(faces) == 0:
        return MeshReport(n_vertices, 0, 0, 0, 0, 0, 0, 0, n_vertices, 0, False, -1)
    degenerate = int(degenerate_mask(vertices, faces, area_eps).sum())
    duplicates = int(duplicate_mask(faces).sum())
    edges, counts = edge_face_counts(faces)
    half = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    _, directed_counts = np.unique(row_keys(half), return_counts=True)
    flipped = int((directed_counts > 1).sum())
    fans = vertex_fans(faces, n_vertices)
    n_components, _ = component_labels(faces, n_vertices)
    boundary, nonmanifold = int((counts == 1).sum()), int((counts > 2).sum())
    watertight = boundary == 0 and nonmanifold == 0 and flipped == 0 and degenerate == 0
    used = np.unique(faces)
    genus = -1
    if watertight:
        chi = len(used) - len(edges) + len(faces)  # Σ over components of (2 − 2 g_c)
        genus = int(round((2 * n_components - chi) / 2))
    return MeshReport(n_vertices, len(faces), degenerate, duplicates, boundary, nonmanifold, flipped,
                      int((fans > 1).sum()), n_vertices - len(used), n_components, bool(watertight), genus)
