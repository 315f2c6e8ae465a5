"""Density grid and marching cubes: from a field to a closed, outward-facing triangle mesh.

The grid samples the field at the *nodes* of a regular lattice that includes the faces of the scene
box: node ``(i, j, k)`` sits at

    x_i = −r + i·h,   h = 2r / (R − 1),   i = 0 … R−1          (the same for y_j, z_k)

i.e. ``numpy.linspace(−r, r, R)`` on each axis, and ``grid[i, j, k] = σ(x_i, y_j, z_k)``.

Marching cubes finds the level set ``{x : σ̃(x) = τ}`` of the piecewise-linear interpolant of the
grid; the solid is ``σ > τ`` ("higher density inside"). Before extraction the grid is padded with
one layer of nodes below the level so that a surface touching the box is closed there; vertices
are then clipped back into the box, so the mesh is always watertight.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np
import torch
from skimage import measure

from carv3d.errors import UserError
from carv3d.log import logger


class EmptyMeshError(UserError):
    """The isosurface is empty: the threshold is above every density in the grid."""


def field_device(field: Any) -> torch.device:
    """The device a field wants its query points on: its ``device`` attribute when it states one (a
    field that is not a module, such as the Gaussians' density), else that of its parameters or
    buffers (CPU for a field that has none)."""
    stated = getattr(field, "device", None)
    if isinstance(stated, (torch.device, str)):
        return torch.device(stated)
    for getter in ("parameters", "buffers"):
        try:
            tensor = next(iter(getattr(field, getter)()))
        except (AttributeError, StopIteration, TypeError):
            continue
        return tensor.device
    return torch.device("cpu")


def node_coordinates(radius: float, resolution: int) -> np.ndarray:
    """(R,) float64 node positions ``linspace(−radius, radius, resolution)`` of one axis."""
    return np.linspace(-radius, radius, resolution)


@torch.no_grad()
def evaluate_in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], points: np.ndarray, device: torch.device,
                       chunk: int = 2**18) -> np.ndarray:
    """Apply ``fn`` to (N, 3) points in batches of ``chunk``; returns a float32 numpy array (N, ...)."""
    outputs = []
    for start in range(0, len(points), chunk):
        batch = torch.from_numpy(np.array(points[start:start + chunk], dtype=np.float32)).to(device)
        outputs.append(fn(batch).float().cpu().numpy())
    if not outputs:
        return np.zeros((0,), dtype=np.float32)
    return np.concatenate(outputs, axis=0)


@torch.no_grad()
def density_grid(field: Any, resolution: int, chunk: int = 2**18) -> np.ndarray:
    """Sample ``field.density`` on the R³ lattice of nodes ``linspace(−r, r, R)`` per axis.

    Args:
        field: has ``radius`` (scene box [−r, r]³) and ``density(x: (N, 3)) -> (N,)``.
        resolution: R, nodes per axis (≥ 2); the node spacing is h = 2r / (R − 1).
        chunk: points per call of the field (bounds memory; the grid is evaluated slab by slab).

    Returns:
        grid: (R, R, R) float32, ``grid[i, j, k] = σ(x_i, y_j, z_k)`` (axis order x, y, z).
        Non-finite densities are replaced by 0 (and logged).
    """
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    radius = float(field.radius)
    device = field_device(field)
    axis = node_coordinates(radius, resolution).astype(np.float32)
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    slab_rows = max(1, chunk // (resolution * resolution))  # x-slabs per call
    yz = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)  # (R², 2)
    for i0 in range(0, resolution, slab_rows):
        xs = axis[i0:i0 + slab_rows]
        pts = np.concatenate([np.repeat(xs, len(yz))[:, None], np.tile(yz, (len(xs), 1))], axis=1)  # (n·R², 3)
        values = evaluate_in_chunks(field.density, pts, device, chunk=chunk)
        grid[i0:i0 + len(xs)] = values.reshape(len(xs), resolution, resolution)
    bad = ~np.isfinite(grid)
    if bad.any():
        logger.warning("density grid: %d non-finite densities replaced by 0", int(bad.sum()))
        grid[bad] = 0.0
    return grid


def check_not_empty(grid: np.ndarray, threshold: float) -> None:
    """Raise :class:`EmptyMeshError` when no density exceeds ``threshold``."""
    max_density = float(grid.max()) if grid.size else float("nan")
    if not grid.size or not max_density > threshold:
        suggestion = 0.5 * max_density if max_density > 0 else max_density
        raise EmptyMeshError(
            f"the mesh is empty: the threshold {threshold:g} is above every density in the "
            f"{grid.shape[0]}³ grid (the largest density found is {max_density:.4g}). Use "
            f"threshold=auto, or a value below {max_density:.4g} (e.g. {suggestion:.4g})."
        )


def extract_isosurface(grid: np.ndarray, threshold: float, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """Marching cubes on a node grid; the faces are oriented outward.

    The solid is ``{σ > τ}``. scikit-image's Lewiner marching cubes winds the triangles of such a
    level set clockwise seen from outside, so the winding is reversed to give counter-clockwise
    (glTF's front face) with normals ``n = (v1 − v0) × (v2 − v0)`` pointing out of the solid; the
    signed volume ``V = Σ_f v0 · (v1 × v2) / 6`` of the result is positive.

    Args:
        grid: (R, R, R) densities at nodes ``linspace(−radius, radius, R)`` (see :func:`density_grid`).
        threshold: τ, the density level.
        radius: r, half the side of the scene box.

    Returns:
        vertices: (V, 3) float32 positions in scene units, inside [−r, r]³.
        faces: (F, 3) int64 vertex indices, counter-clockwise seen from outside.

    Raises:
        EmptyMeshError: when every density is at or below ``threshold``.
    """
    check_not_empty(grid, threshold)
    resolution = grid.shape[0]
    spacing = 2.0 * radius / (resolution - 1)
    if float(grid.min()) > threshold:
        logger.warning("every density exceeds the threshold %g: the mesh is the scene box", threshold)
    # One node of padding on every side, below the level, closes surfaces that leave the box.
    pad_value = min(float(grid.min()), float(threshold)) - 1.0
    padded = np.pad(grid.astype(np.float32, copy=False), 1, mode="constant", constant_values=pad_value)
    vertices, faces, _, _ = measure.marching_cubes(padded, level=float(threshold), spacing=(spacing,) * 3)
    vertices = vertices - (radius + spacing)  # padded node 1 is the box corner −r
    np.clip(vertices, -radius, radius, out=vertices)
    faces = np.ascontiguousarray(faces[:, ::-1], dtype=np.int64)  # flip: outward, counter-clockwise
    return vertices.astype(np.float32), faces


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume ``Σ_f v0 · (v1 × v2) / 6`` of a closed mesh: > 0 when the faces point outward."""
    v = vertices.astype(np.float64)[faces]  # (F, 3, 3)
    return float(np.einsum("fi,fi->f", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0)


def resample_grid(grid: np.ndarray, resolution: int) -> np.ndarray:
    """Trilinear resampling of a node grid to ``resolution`` nodes per axis over the same box.

    Nodes stay at ``linspace(−r, r, n)``, so the result is a node grid of the same scene box
    (``align_corners=True``). Grids already at or under ``resolution`` are returned as they are.
    """
    if grid.shape[0] <= resolution:
        return grid
    volume = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(volume, size=(resolution,) * 3, mode="trilinear", align_corners=True)
    return out[0, 0].numpy()
