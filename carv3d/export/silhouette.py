"""Silhouettes on the CPU: of a mesh (rasterised), of a density grid (max along rays), of a field
(opacity by ray marching), and their IoU.

Camera model (that of :mod:`carv3d.render.rays`): pinhole, OpenGL axes, camera-to-world
``c2w``, vertical field of view ``fovy``, focal length ``f = (H / 2) / tan(fovy / 2)`` in pixels.
Pixel (row i, column j) is the ray through its centre with camera-space direction

    d_cam = ((j + ½ − W/2) / f,  −(i + ½ − H/2) / f,  −1),

and a world point X projects to ``(x, y, z) = R⁻¹ (X − o)``, column ``W/2 + f·x/(−z)``, row
``H/2 − f·y/(−z)``. A NeRF opacity image handed to :func:`carv3d.export.threshold.auto_threshold`
must use the same pixel rays.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np
import torch

from carv3d.export.isosurface import field_device
from carv3d.export.raster import coverage
from carv3d.cameras import Cameras, make_cameras
from carv3d.render.rays import camera_rays as render_rays


def fibonacci_cameras(n_views: int, distance: float, fovy_deg: float) -> Cameras:
    """``n_views`` cameras spread evenly over the sphere of directions (a Fibonacci spiral).

    View k has elevation ``asin(1 − 2(k + ½)/n)`` and azimuth ``k · 137.508°`` (the golden angle),
    so top, bottom and all sides are seen; every camera looks at the origin.
    """
    k = torch.arange(n_views, dtype=torch.float32)
    elevation = torch.rad2deg(torch.asin(1.0 - 2.0 * (k + 0.5) / n_views))
    azimuth = k * (180.0 * (3.0 - math.sqrt(5.0)))
    full = lambda v: torch.full((n_views,), float(v))  # noqa: E731
    return make_cameras(elevation, azimuth, full(distance), full(fovy_deg))


def camera_rays(cameras: Cameras, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The renderer's pixel-centre rays (:func:`carv3d.render.rays.camera_rays`), on the CPU, flattened.

    Returns:
        origins: (B, H·W, 3); directions: (B, H·W, 3) unit vectors, row-major pixel order.
    """
    cpu = Cameras(*(t.detach().float().cpu() for t in (cameras.c2w, cameras.fovy, cameras.elevation,
                                                         cameras.azimuth, cameras.distance)))
    origins, directions = render_rays(cpu, height, width)
    return origins.reshape(len(cameras), -1, 3), directions.reshape(len(cameras), -1, 3)


def box_intervals(origins: torch.Tensor, directions: torch.Tensor, radius: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slab test against [−r, r]³: entry and exit distances (t_near clamped at 0; t_far < t_near: miss)."""
    inv = 1.0 / torch.where(directions.abs() < 1e-12, torch.full_like(directions, 1e-12), directions)
    t0, t1 = (-radius - origins) * inv, (radius - origins) * inv
    t_near = torch.minimum(t0, t1).max(dim=-1).values.clamp(min=0.0)
    t_far = torch.maximum(t0, t1).min(dim=-1).values
    return t_near, t_far


@torch.no_grad()
def march_opacity(field: Any, cameras: Cameras, height: int, width: int, n_samples: int = 128,
                  chunk: int = 2**18) -> torch.Tensor:
    """The field's opacity per pixel, ``α = 1 − exp(−Σ_i σ(x_i) δ)``, by uniform ray marching.

    Samples are the midpoints of ``n_samples`` equal intervals of length δ between the ray's entry
    into and exit from the scene box. A plain stand-in for the renderer's opacity, for callers
    (tests, scripts) that have a field but no renderer.

    Returns:
        (B, H, W) float32 in [0, 1].
    """
    radius = float(field.radius)
    device = field_device(field)
    origins, directions = camera_rays(cameras, height, width)
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    t_near, t_far = box_intervals(o, d, radius)
    delta = ((t_far - t_near).clamp(min=0.0) / n_samples)  # (N,)
    steps = torch.arange(n_samples, dtype=torch.float32) + 0.5
    optical_depth = torch.zeros(len(o))
    rays_per_chunk = max(1, chunk // n_samples)
    for s in range(0, len(o), rays_per_chunk):
        sl = slice(s, s + rays_per_chunk)
        t = t_near[sl, None] + delta[sl, None] * steps[None]  # (n, S)
        x = o[sl, None] + d[sl, None] * t[..., None]  # (n, S, 3)
        sigma = field.density(x.reshape(-1, 3).to(device)).float().cpu().reshape(t.shape)
        optical_depth[sl] = sigma.clamp(min=0).sum(dim=-1) * delta[sl]
    return (1.0 - torch.exp(-optical_depth)).reshape(len(cameras), height, width)


@torch.no_grad()
def grid_projections(grid: np.ndarray, radius: float, cameras: Cameras, height: int, width: int,
                     n_samples: Optional[int] = None, chunk: int = 2**22) -> Tuple[np.ndarray, np.ndarray]:
    """Max-projection and opacity of a density grid along each pixel ray, in one pass.

    With σ̃ the trilinear interpolant of the grid and x_s the midpoints of ``n_samples`` equal
    steps δ through the scene box:

        m = max_s σ̃(x_s),        α = 1 − exp(−Σ_s max(σ̃(x_s), 0) · δ).

    The solid ``{σ̃ > τ}`` covers a pixel exactly when ``m > τ``, so one max-projection gives the
    silhouette of the isosurface at every level τ at once (up to the sampling step along the ray,
    by default one grid cell, and to marching cubes' approximation of σ̃'s level set); α is the
    NeRF's opacity as seen through the grid.

    Args:
        grid: (R, R, R) densities at nodes ``linspace(−r, r, R)`` (axis order x, y, z).
        radius: r.
        cameras: B cameras.
        height, width: image size.
        n_samples: samples per ray across the box; default ``√3·(R − 1)`` (one cell along the longest chord).

    Returns:
        max_projection: (B, H, W) float32, −inf for rays that miss the box;
        opacity: (B, H, W) float32 in [0, 1].
    """
    resolution = grid.shape[0]
    n_samples = n_samples or int(math.ceil(math.sqrt(3) * (resolution - 1)))
    volume = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]  # (1, 1, X, Y, Z)
    origins, directions = camera_rays(cameras, height, width)
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    t_near, t_far = box_intervals(o, d, radius)
    hit = t_far > t_near
    max_projection = torch.full((len(o),), -math.inf)
    optical_depth = torch.zeros(len(o))
    steps = (torch.arange(n_samples, dtype=torch.float32) + 0.5) / n_samples
    rays_per_chunk = max(1, chunk // n_samples)
    index = torch.nonzero(hit).squeeze(-1)
    for s in range(0, len(index), rays_per_chunk):
        rays = index[s:s + rays_per_chunk]
        length = (t_far - t_near)[rays]  # (n,)
        t = t_near[rays, None] + length[:, None] * steps[None]  # (n, S)
        x = o[rays, None] + d[rays, None] * t[..., None]  # (n, S, 3)
        # grid_sample's last coordinate indexes the first volume axis: pass (z, y, x) / r.
        coords = (x.flip(-1) / radius).reshape(1, 1, 1, -1, 3)
        values = torch.nn.functional.grid_sample(volume, coords, mode="bilinear", align_corners=True)
        values = values.reshape(len(rays), n_samples)
        max_projection[rays] = values.max(dim=-1).values
        optical_depth[rays] = values.clamp(min=0).sum(dim=-1) * (length / n_samples)
    shape = (len(cameras), height, width)
    opacity = 1.0 - torch.exp(-optical_depth)
    return max_projection.reshape(shape).numpy(), opacity.reshape(shape).numpy()


def project_vertices(vertices: np.ndarray, cameras: Cameras, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates and depths of vertices in every camera.

    Returns:
        xy: (B, V, 2) float64 (column, row) pixel coordinates; depth: (B, V) distance along the view axis.
    """
    c2w = cameras.c2w.detach().double().cpu().numpy()  # (B, 4, 4)
    focal = (height / 2.0) / np.tan(cameras.fovy.detach().double().cpu().numpy() / 2.0)  # (B,)
    rel = vertices.astype(np.float64)[None] - c2w[:, None, :3, 3]  # (B, V, 3)
    cam = np.einsum("bji,bvj->bvi", c2w[:, :3, :3], rel)  # R⁻¹ = Rᵀ
    depth = -cam[..., 2]
    safe = np.where(depth > 1e-9, depth, 1e-9)
    xy = np.stack([width / 2.0 + focal[:, None] * cam[..., 0] / safe,
                   height / 2.0 - focal[:, None] * cam[..., 1] / safe], axis=-1)
    return xy, depth


def mesh_silhouettes(vertices: np.ndarray, faces: np.ndarray, cameras: Cameras, height: int, width: int,
                     near: float = 1e-3) -> np.ndarray:
    """(B, H, W) bool: pixels whose centre ray hits the mesh (CPU rasterisation, no depth test).

    Triangles with a vertex closer than ``near`` to a camera (or behind it) are skipped for that
    camera; export cameras sit outside the scene box, so none are.
    """
    xy, depth = project_vertices(vertices, cameras, height, width)
    masks = np.zeros((len(cameras), height, width), dtype=bool)
    for b in range(len(cameras)):
        visible = (depth[b][faces] > near).all(axis=1)
        masks[b] = coverage(xy[b][faces[visible]], height, width)
    return masks


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-view IoU ``|A ∩ B| / |A ∪ B|`` of (B, H, W) boolean masks; two empty masks score 1."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    inter = (a & b).reshape(len(a), -1).sum(axis=1)
    union = (a | b).reshape(len(a), -1).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
