"""Automatic isosurface threshold: the level whose mesh silhouettes best match the NeRF's opacity.

For a set of views v (pixels p), the NeRF's silhouette is ``T_v = {p : α_v(p) > α₀}`` (α the rendered
opacity, α₀ = ½ by default) and the isosurface at level τ covers ``M_v(τ) = {p : m_v(p) > τ}`` with
m the max-projection of the density grid (:func:`carv3d.export.silhouette.grid_projections`).
The threshold maximises the mean IoU

    τ* = argmax_τ  (1/V) Σ_v |T_v ∩ M_v(τ)| / |T_v ∪ M_v(τ)|.

The IoU only changes where τ crosses a value of m, so the 1-D search is exhaustive and exact: for
each view the pixel values inside and outside T_v are sorted once, and
``|T ∩ M(τ)| = #{p ∈ T : m(p) > τ}``, ``|T ∪ M(τ)| = |T| + #{p ∉ T : m(p) > τ}`` are counted by
binary search at every candidate level (midpoints between consecutive distinct values of m, and
half the smallest one, so that keeping everything is possible). Among levels tied at the best IoU,
the middle of the tied run is taken. The chosen mesh is then checked by rasterising its triangles
(:func:`mesh_iou`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from carv3d.export.isosurface import EmptyMeshError, density_grid, resample_grid
from carv3d.export.silhouette import fibonacci_cameras, grid_projections, mesh_silhouettes, silhouette_iou
from carv3d.log import logger
from carv3d.cameras import Cameras

OpacityFn = Callable[[Cameras], torch.Tensor]  # cameras -> (B, H, W) opacity in [0, 1]


@dataclass
class ThresholdSearch:
    """The result of :func:`auto_threshold`.

    Attributes:
        threshold: τ*, the chosen density level.
        iou: mean silhouette IoU predicted at τ* (grid max-projection against the NeRF opacity).
        levels: (C,) candidate levels searched, increasing.
        ious: (C,) mean IoU at each candidate level.
        cameras: the views used.
        target: (B, H, W) bool, the NeRF's silhouettes ``α > α₀``.
    """

    threshold: float
    iou: float
    levels: np.ndarray
    ious: np.ndarray
    cameras: Cameras
    target: np.ndarray


def default_cameras(radius: float, n_views: int = 8) -> Cameras:
    """Views for the threshold search: Fibonacci directions at distance 2r with a 60° field of view.

    At distance 2r every camera is outside the scene box (whose corners are at r√3 ≈ 1.73r), and
    the view spans ±1.15r at the origin, where objects sit.
    """
    return fibonacci_cameras(n_views, distance=2.0 * radius, fovy_deg=60.0)


def iou_curve(max_projection: np.ndarray, target: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Mean over views of IoU(T_v, {m_v > τ}) at each level τ (exact counting by binary search).

    Args:
        max_projection: (B, H, W) m.
        target: (B, H, W) bool T.
        levels: (C,) levels τ.

    Returns:
        (C,) mean IoU.
    """
    total = np.zeros(len(levels))
    for m, t in zip(max_projection.reshape(len(target), -1), target.reshape(len(target), -1), strict=True):
        inside, outside = np.sort(m[t]), np.sort(m[~t])
        inter = len(inside) - np.searchsorted(inside, levels, side="right")  # #{p ∈ T: m > τ}
        false_pos = len(outside) - np.searchsorted(outside, levels, side="right")
        union = len(inside) + false_pos
        total += np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return total / len(target)


def candidate_levels(max_projection: np.ndarray, max_levels: int = 20000) -> np.ndarray:
    """Half the smallest finite positive value of m, then the midpoints between consecutive distinct ones.

    The first level keeps every pixel whose density is positive: without it a uniform field (one
    value, or a few that differ by rounding) offers only levels at or above its density, whose mesh
    is empty. The midpoints are subsampled to ``max_levels``.
    """
    values = np.unique(max_projection[np.isfinite(max_projection)])
    values = values[values > 0]
    if len(values) == 0:
        return values
    mids = 0.5 * (values[:-1] + values[1:])
    if len(mids) > max_levels:
        mids = mids[np.linspace(0, len(mids) - 1, max_levels).round().astype(int)]
    return np.concatenate([[0.5 * values[0]], mids])


def pick_level(levels: np.ndarray, ious: np.ndarray, tolerance: float = 1e-9) -> int:
    """Index of the middle of the run of levels tied (within ``tolerance``) with the best IoU."""
    best = int(np.argmax(ious))
    tied = ious >= ious[best] - tolerance
    lo = best
    while lo > 0 and tied[lo - 1]:
        lo -= 1
    hi = best
    while hi + 1 < len(tied) and tied[hi + 1]:
        hi += 1
    return (lo + hi) // 2


def auto_threshold(field: Any, nerf_opacity: Optional[OpacityFn] = None, *, grid: Optional[np.ndarray] = None,
                   resolution: int = 128, cameras: Optional[Cameras] = None, n_views: int = 8,
                   image_size: int = 96, opacity_level: float = 0.5,
                   search_resolution: int = 96) -> ThresholdSearch:
    """Choose the isosurface level whose silhouettes best match the NeRF's rendered opacity.

    Args:
        field: the density field (``radius``, ``density``); sampled on a grid unless ``grid`` is given.
        nerf_opacity: ``cameras -> (B, H, W)`` opacity rendered by the caller's NeRF renderer with the
            pixel rays of :mod:`carv3d.export.silhouette`; its H, W set the image size. Default: the
            opacity of the density grid itself (:func:`grid_projections`) at ``image_size``².
        grid: (R, R, R) density grid over the scene box (see :func:`density_grid`).
        resolution: grid resolution when ``grid`` is None.
        cameras: the views; default :func:`default_cameras` with ``n_views``.
        n_views: number of default views.
        image_size: silhouette size (pixels) when ``nerf_opacity`` is None.
        opacity_level: α₀; a NeRF pixel is inside its silhouette when α > α₀.
        search_resolution: the grid is resampled (trilinearly) to at most this many nodes per axis
            for the max-projection; the level found applies to the full grid (the IoU curve is flat
            near its optimum, and :func:`mesh_iou` checks the final mesh).

    Returns:
        A :class:`ThresholdSearch` with τ*, the IoU reached and the whole IoU curve.

    Raises:
        EmptyMeshError: the NeRF is transparent from every view, or the grid has no positive density.
    """
    radius = float(field.radius)
    grid = density_grid(field, resolution) if grid is None else grid
    cameras = default_cameras(radius, n_views) if cameras is None else cameras
    search_grid = resample_grid(grid, search_resolution)
    if nerf_opacity is None:
        max_projection, opacity = grid_projections(search_grid, radius, cameras, image_size, image_size)
    else:
        with torch.no_grad():
            opacity = torch.as_tensor(nerf_opacity(cameras)).detach().float().cpu().numpy()
        if opacity.ndim != 3 or opacity.shape[0] != len(cameras):
            raise ValueError(f"nerf_opacity must return (B={len(cameras)}, H, W), got {opacity.shape}")
        max_projection, _ = grid_projections(search_grid, radius, cameras, *opacity.shape[1:])
    target = opacity > opacity_level
    if not target.any():
        raise EmptyMeshError(
            f"cannot choose a threshold automatically: the NeRF's opacity is below {opacity_level} in "
            f"every pixel of {len(cameras)} views (largest {opacity.max():.3g}); the scene looks empty. "
            f"Check the run, or pass a numeric threshold."
        )
    levels = candidate_levels(max_projection)
    if len(levels) == 0:
        raise EmptyMeshError(
            f"cannot choose a threshold automatically: no positive density in the {grid.shape[0]}³ grid "
            f"(largest {float(grid.max()):.3g}). Check the run, or pass a numeric threshold."
        )
    ious = iou_curve(max_projection, target, levels)
    best = pick_level(levels, ious)
    result = ThresholdSearch(float(levels[best]), float(ious[best]), levels, ious, cameras, target)
    logger.info("auto threshold: level %.4g, mean silhouette IoU %.3f over %d views (%d levels searched)",
                result.threshold, result.iou, len(cameras), len(levels))
    return result


def mesh_iou(vertices: np.ndarray, faces: np.ndarray, search: ThresholdSearch) -> float:
    """Mean IoU of the mesh's rasterised silhouettes against the NeRF silhouettes of a search."""
    height, width = search.target.shape[1:]
    masks = mesh_silhouettes(vertices, faces, search.cameras, height, width)
    return float(silhouette_iou(masks, search.target).mean())
