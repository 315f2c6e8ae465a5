"""Rays: one per pixel through the pixel's centre, and their clipping against the scene box.

Pinhole model (OpenGL camera axes: the camera looks down its −Z, +X right, +Y up in the image).
With the vertical field of view ``fovy`` and an image of ``H × W`` pixels, the focal length in
pixels is

    f = (H / 2) / tan(fovy / 2)

and the pixel in row ``i`` (0 = top) and column ``j`` (0 = left) has its centre on the ray

    d_cam = ((j + 0.5 − W/2) / f,  −(i + 0.5 − H/2) / f,  −1),     d_world = R · d_cam / ‖R · d_cam‖

where ``R`` is the rotation block of the camera-to-world matrix. Pixels are square, so the
horizontal field of view follows from the aspect ratio.
"""

from __future__ import annotations

from typing import Tuple

import torch

from carv3d.cameras import Cameras


def camera_rays(cameras: Cameras, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rays through the pixel centres of every camera.

    Args:
        cameras: B cameras (``c2w: (B, 4, 4)``, ``fovy: (B,)`` radians).
        height: image height H in pixels.
        width: image width W in pixels.

    Returns:
        origins: (B, H, W, 3), the camera positions broadcast over the pixels.
        directions: (B, H, W, 3), unit vectors in world space.
    """
    c2w = cameras.c2w
    device, dtype = c2w.device, c2w.dtype
    focal = (0.5 * height) / torch.tan(0.5 * cameras.fovy.to(dtype))  # (B,) pixels
    rows = torch.arange(height, device=device, dtype=dtype) + 0.5
    cols = torch.arange(width, device=device, dtype=dtype) + 0.5
    ii, jj = torch.meshgrid(rows, cols, indexing="ij")  # (H, W)
    f = focal.view(-1, 1, 1)
    x = (jj - 0.5 * width) / f  # (B, H, W)
    y = -(ii - 0.5 * height) / f
    z = -torch.ones_like(x)
    d_cam = torch.stack([x, y, z], dim=-1)  # (B, H, W, 3)
    rotation = c2w[:, :3, :3]  # (B, 3, 3)
    directions = torch.einsum("bij,bhwj->bhwi", rotation, d_cam)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


def ray_box_intersect(
    origins: torch.Tensor, directions: torch.Tensor, radius: float, near: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip rays ``o + t·d`` against the box ``[−radius, radius]^3`` (the slab method).

    On each axis k the ray is inside the slab ``|o_k + t·d_k| ≤ r`` for ``t`` between

        t_k1 = (−r − o_k) / d_k,    t_k2 = (r − o_k) / d_k,

    and inside the box where it is inside all three slabs:

        t_near = max(near, max_k min(t_k1, t_k2)),    t_far = min_k max(t_k1, t_k2).

    The ray hits the box (in front of ``near``) when ``t_far > t_near``. A direction component
    that is exactly zero is replaced by a tiny one of positive sign, so a ray parallel to a slab
    gets ±huge bounds on that axis (inside the slab) or an empty interval (outside it).

    Args:
        origins: (..., 3).
        directions: (..., 3), need not be unit (``t`` is then in units of ‖d‖).
        radius: half the side of the box.
        near: rays start no closer than this (cameras may sit inside the box).

    Returns:
        t_near: (...,) where the ray enters the box, at least ``near``.
        t_far: (...,) where it leaves; equal to ``t_near`` for rays that miss (an empty interval).
        hit: (...,) bool.
    """
    tiny = torch.finfo(directions.dtype).tiny ** 0.5  # ~1e-19 in float32: 1/tiny stays finite
    safe = torch.where(directions.abs() < tiny, torch.full_like(directions, tiny), directions)
    inv = 1.0 / safe
    t1 = (-radius - origins) * inv
    t2 = (radius - origins) * inv
    t_near = torch.minimum(t1, t2).amax(dim=-1).clamp_min(near)
    t_far = torch.maximum(t1, t2).amin(dim=-1)
    hit = t_far > t_near
    t_far = torch.where(hit, t_far, t_near)
    return t_near, t_far, hit
