"""Samples along rays: stratified intervals on any device, and the container both samplers fill.

Two samplers produce :class:`RaySegments`:

- ``stratified`` (here; any device): a fixed number of contiguous intervals per ray, *batched* as
  ``(n_rays, n_samples)`` tensors.
- ``occupancy_grid`` (:mod:`carv3d.render.occupancy`; CUDA only): nerfacc's marching through an
  occupancy grid that skips empty space, *packed* as ``(n_total,)`` tensors with the ray of each
  sample in ``ray_indices``.

The renderer evaluates the field at interval midpoints ``(t_start + t_end) / 2`` in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass
class RaySegments:
    """Intervals ``[t_start, t_end)`` along rays.

    Attributes:
        t_starts: (n_rays, n_samples) batched, or (n_total,) packed.
        t_ends: same shape as ``t_starts``.
        ray_indices: same shape, long: the ray each interval belongs to. Batched segments hold
            ``ray_indices[r, s] = r``, so gathering ray data works the same way for both layouts.
        packed: whether the layout is packed (nerfacc's flattened ``ray_indices`` format).
    """

    t_starts: torch.Tensor
    t_ends: torch.Tensor
    ray_indices: torch.Tensor
    packed: bool

    @property
    def t_mids(self) -> torch.Tensor:
        return 0.5 * (self.t_starts + self.t_ends)

    @classmethod
    def batched(cls, t_starts: torch.Tensor, t_ends: torch.Tensor) -> "RaySegments":
        n_rays, n_samples = t_starts.shape
        ray_indices = torch.arange(n_rays, device=t_starts.device).unsqueeze(-1).expand(n_rays, n_samples)
        return cls(t_starts, t_ends, ray_indices, packed=False)

    def points(self, origins: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Midpoints ``o + t_mid · d`` of every interval: (*segment shape, 3).

        Args:
            origins: (n_rays, 3).
            directions: (n_rays, 3).
        """
        return origins[self.ray_indices] + self.t_mids.unsqueeze(-1) * directions[self.ray_indices]


def stratified_samples(
    t_near: torch.Tensor,
    t_far: torch.Tensor,
    n_samples: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Contiguous intervals covering ``[t_near, t_far]`` exactly, one per equal-width bin.

    The range is cut into ``n`` bins of width ``Δ = (t_far − t_near) / n``. One point is drawn in
    each bin,

        s_k = t_near + (k + u_k) · Δ,    u_k ~ U[0, 1)  (u_k = 1/2 without a generator),

    and the intervals are the points' cells: they meet half-way between neighbouring points,

        t_start_0 = t_near,   t_end_{k} = t_start_{k+1} = (s_k + s_{k+1}) / 2,   t_end_{n−1} = t_far.

    So the intervals always tile ``[t_near, t_far]`` without gaps (``Σ δ_k = t_far − t_near``,
    which makes the opacity of a constant medium exact), and without a generator they are the
    ``n`` equal bins themselves. With a generator every training step sees different
    boundaries, so the field is not fitted to one fixed set of sample depths.

    Args:
        t_near: (N,) start of each ray's range.
        t_far: (N,) end of each ray's range (``t_far ≥ t_near``).
        n_samples: intervals per ray.
        generator: jitter source; the uniform draws are made on its device.

    Returns:
        t_starts: (N, n_samples).
        t_ends: (N, n_samples), with ``t_ends[:, k] == t_starts[:, k + 1]``.
    """
    n_rays = t_near.shape[0]
    device, dtype = t_near.device, t_near.dtype
    if generator is None:
        u = torch.full((n_rays, n_samples), 0.5, device=device, dtype=dtype)
    else:
        u = torch.rand((n_rays, n_samples), generator=generator, device=generator.device).to(device, dtype)
    k = torch.arange(n_samples, device=device, dtype=dtype)
    span = (t_far - t_near).unsqueeze(-1)
    fractions = (k + u) / n_samples  # (N, n) positions of the points in [0, 1)
    cuts = 0.5 * (fractions[:, 1:] + fractions[:, :-1])  # (N, n − 1) interior boundaries
    near, far = t_near.unsqueeze(-1), t_far.unsqueeze(-1)
    edges = torch.cat([near, near + span * cuts, far], dim=-1)  # (N, n + 1)
    return edges[:, :-1], edges[:, 1:]
