"""Empty-space skipping with nerfacc's occupancy grid (CUDA tensors only).

A ``resolution³`` grid over the scene box stores, per cell, an exponential moving maximum of the
cell's *occupancy* ``σ(x) · Δt`` (density at a random point in the cell times the marching step,
roughly the opacity of one step). Cells above a threshold are marked occupied. Rays march with a
fixed step ``Δt`` from the near plane and only keep intervals whose midpoint falls in an occupied
cell, then drop intervals behind which the transmittance is below ``early_stop_eps`` (one extra
density pass without gradients). The result is *packed*: a flat list of intervals with the ray of
each one, composited with nerfacc's CUDA scans.

Differences from the stratified sampler, to keep in mind when comparing them:

- intervals have a fixed length ``Δt`` and start on the lattice ``near + (k + u) · Δt`` (``u`` from
  the render's generator, the same for all intervals of a ray; ``u = 0`` without one), so the
  box boundary is resolved to ``Δt``;
- a cell that is thinly occupied (a surface just touching it) may be missed by the grid's random
  probes and is skipped until an update sees it;
- the grid's updates draw their probe points from torch's *global* RNG on the CUDA device
  (nerfacc has no generator argument): seed it with ``torch.manual_seed`` for reproducible runs.

nerfacc's packed and marching functions exist only as CUDA kernels. On a CPU tensor they try to
JIT-build the extension and fail with a confusing CUDA_HOME error (this machine has an ``nvcc``),
so this module checks ``tensor.is_cuda`` / the device type, never the presence of a compiler.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import nerfacc
import torch
from torch import nn

from carv3d.errors import BackendUnavailableError
from carv3d.render.sampling import RaySegments


class DensityField(Protocol):
    def density(self, x: torch.Tensor) -> torch.Tensor: ...


class OccupancyGridSampler(nn.Module):
    """nerfacc's :class:`~nerfacc.OccGridEstimator` over the scene box ``[−r, r]³``.

    Args:
        scene_radius: r.
        resolution: cells per axis.
        threshold: occupancy ``σ · Δt`` above which a cell is occupied (nerfacc's ``occ_thre``;
            nerfacc lowers it to the grid's mean occupancy when that is smaller).
        update_every: update the grid every this many training steps.
        render_step_size: the marching step ``Δt`` used to turn densities into occupancies.
        near: rays start no closer than this.
        device: must be a CUDA device.
        ema_decay: per-update decay of the stored occupancies.
        warmup_steps: before this step every cell is probed at each update; after it, a quarter
            of the cells at random plus up to as many occupied ones.
        early_stop_eps: transmittance below which the rest of a ray is dropped.

    Raises:
        BackendUnavailableError: ``device`` is not CUDA.
    """

    def __init__(
        self,
        scene_radius: float,
        resolution: int,
        threshold: float,
        update_every: int,
        render_step_size: float,
        near: float,
        device: torch.device | str,
        ema_decay: float = 0.95,
        warmup_steps: int = 256,
        early_stop_eps: float = 1e-4,
    ):
        super().__init__()
        device = torch.device(device)
        if device.type != "cuda":
            raise BackendUnavailableError(
                f"the occupancy-grid sampler needs a CUDA device (nerfacc's marching kernels are CUDA-only), "
                f"but the device is '{device}'. Set render.sampler=stratified (or auto) to render on this device."
            )
        r = float(scene_radius)
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=[-r, -r, -r, r, r, r], resolution=resolution, levels=1)
        self.estimator.to(device)
        self.threshold = float(threshold)
        self.update_every = int(update_every)
        self.render_step_size = float(render_step_size)
        self.near = float(near)
        self.ema_decay = float(ema_decay)
        self.warmup_steps = int(warmup_steps)
        self.early_stop_eps = float(early_stop_eps)
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long, device=device))

    def _occupancy_fn(self, field: DensityField) -> Callable[[torch.Tensor], torch.Tensor]:
        def occupancy(x: torch.Tensor) -> torch.Tensor:  # x: (N, 3) → (N,) = σ(x) · Δt
            return field.density(x).float().reshape(-1) * self.render_step_size

        return occupancy

    @torch.no_grad()
    def update(self, field: DensityField, step: int) -> None:
        """Refresh the grid from the field's density when ``step % update_every == 0``.

        Wraps ``OccGridEstimator.update_every_n_steps``, which only runs in training mode
        (``module.train()``): the grid follows the field while it is being optimised.
        """
        self.estimator.update_every_n_steps(
            step=step,
            occ_eval_fn=self._occupancy_fn(field),
            occ_thre=self.threshold,
            ema_decay=self.ema_decay,
            warmup_steps=self.warmup_steps,
            n=self.update_every,
        )
        if step % self.update_every == 0:
            self.n_updates += 1

    @torch.no_grad()
    def initialize_if_needed(self, field: DensityField) -> None:
        """Probe every cell once if the grid has never been updated (a fresh grid is all empty,
        and would render nothing). Works in eval mode too, e.g. rendering a loaded field."""
        if int(self.n_updates) > 0:
            return
        self.estimator._update(
            step=0,
            occ_eval_fn=self._occupancy_fn(field),
            occ_thre=self.threshold,
            ema_decay=self.ema_decay,
            warmup_steps=self.warmup_steps,
        )
        self.n_updates += 1

    @torch.no_grad()
    def sample(
        self,
        origins: torch.Tensor,
        directions: torch.Tensor,
        render_step_size: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        density_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> RaySegments:
        """March rays through the occupied cells.

        Args:
            origins: (N, 3) float32 CUDA tensor.
            directions: (N, 3) unit directions, float32 CUDA tensor.
            render_step_size: marching step ``Δt``; defaults to the one given at construction.
            generator: offsets each ray's lattice by ``u · Δt``, ``u ~ U[0, 1)`` (drawn on the
                generator's device); None: no offset.
            density_fn: ``x: (M, 3) → σ: (M,)``; when given, intervals behind which the
                transmittance has dropped below ``early_stop_eps`` are removed.

        Returns:
            Packed :class:`RaySegments` (``(M,)`` tensors, ``ray_indices`` long), not
            differentiable (gradients flow through the field's values at these intervals).
        """
        if not origins.is_cuda:
            raise BackendUnavailableError("OccupancyGridSampler.sample needs CUDA tensors; use the stratified sampler on CPU")
        step = self.render_step_size if render_step_size is None else float(render_step_size)
        origins, directions = origins.float().contiguous(), directions.float().contiguous()
        n_rays = origins.shape[0]
        start = torch.full((n_rays,), self.near, device=origins.device)
        if generator is not None:
            u = torch.rand((n_rays,), generator=generator, device=generator.device).to(origins.device)
            start = start + u * step

        sigma_fn = None
        if density_fn is not None:

            def sigma_fn(t_starts: torch.Tensor, t_ends: torch.Tensor, ray_indices: torch.Tensor) -> torch.Tensor:
                x = origins[ray_indices] + (0.5 * (t_starts + t_ends)).unsqueeze(-1) * directions[ray_indices]
                return density_fn(x).float().reshape(-1)

        ray_indices, t_starts, t_ends = self.estimator.sampling(
            origins,
            directions,
            sigma_fn=sigma_fn,
            near_plane=self.near,
            t_min=start,
            render_step_size=step,
            early_stop_eps=self.early_stop_eps,
            alpha_thre=0.0,
            stratified=False,  # nerfacc's jitter uses the global RNG; ours uses the generator
        )
        return RaySegments(t_starts, t_ends, ray_indices.long(), packed=True)

    def occupied_fraction(self) -> float:
        """Fraction of the grid's cells marked occupied (for logs)."""
        return float(self.estimator.binaries.float().mean())
