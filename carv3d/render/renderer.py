"""The volume renderer: cameras + field → images, differentiable to the field's parameters.

For every pixel's ray ``o + t·d`` (unit ``d``) the renderer

1. picks intervals along the ray inside the scene box (:func:`select_sampler` decides how, once):
   ``stratified`` (batched, any device) or ``occupancy_grid`` (packed, CUDA only);
2. evaluates the field at the interval midpoints: density ``σ_i``, albedo ``a_i`` and, when the
   shading or the caller needs them, unit normals ``n_i``;
3. shades each sample (:mod:`carv3d.render.shading`) into a colour ``c_i``;
4. composites (:mod:`carv3d.render.compositing`) with ``w_i = T_i (1 − exp(−σ_i δ_i))``:

       opacity A = Σ_i w_i,     rgb = Σ_i w_i c_i + (1 − A) · b,     depth = Σ_i w_i t_i / A,
       normal = Σ_i w_i n_i     (not renormalised: its length is at most A),

   with ``b`` the background (:mod:`carv3d.render.background`);
5. when normals are computed, DreamFusion's orientation penalty per pixel,

       orientation = Σ_i sg(w_i) · max(0, n_i · d)²,

   which is positive where a visible normal faces away from the camera (``sg`` = stop-gradient:
   the penalty moves the normals, not the weights).

The field protocol: ``field.radius`` (float), ``field(x: (N, 3)) -> (σ: (N,), albedo: (N, 3))``,
``field.density(x) -> (N,)`` and ``field.normals(x) -> (N, 3)`` (unit, outward, differentiable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

from carv3d.errors import BackendUnavailableError
from carv3d.log import logger
from carv3d.render.background import Background
from carv3d.cameras import Cameras
from carv3d.render.compositing import accumulate, compute_weights, expected_depth
from carv3d.render.occupancy import OccupancyGridSampler
from carv3d.render.rays import camera_rays, ray_box_intersect
from carv3d.render.sampling import RaySegments, stratified_samples
from carv3d.render.shading import needs_normals, sample_light_directions, shade

SAMPLERS = ("stratified", "occupancy_grid")


class Field(Protocol):
    radius: float

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def density(self, x: torch.Tensor) -> torch.Tensor: ...

    def normals(self, x: torch.Tensor) -> torch.Tensor: ...


def choose_sampler(render_cfg, device: torch.device | str) -> tuple[str, str]:
    """The one place the ray sampler is chosen, from ``render.sampler`` and the device, and why.

    - ``auto``: ``occupancy_grid`` on a CUDA device, else ``stratified``.
    - ``stratified``: always available.
    - ``occupancy_grid``: CUDA only; asked for on another device it is a user error.

    The decision looks at the *device*, never at whether a CUDA compiler is installed.

    Returns:
        (``"stratified"`` or ``"occupancy_grid"``, the reason to log).

    Raises:
        BackendUnavailableError: ``occupancy_grid`` requested on a non-CUDA device, or an unknown name.
    """
    device = torch.device(device)
    requested = str(render_cfg.sampler)
    is_cuda = device.type == "cuda"
    if requested == "auto":
        if is_cuda:
            return "occupancy_grid", "auto: CUDA device"
        return "stratified", f"auto: device '{device}' is not CUDA; nerfacc's occupancy grid needs CUDA"
    if requested == "occupancy_grid" and not is_cuda:
        raise BackendUnavailableError(
            f"render.sampler=occupancy_grid needs a CUDA device (nerfacc's occupancy-grid marching is CUDA-only), "
            f"but the device is '{device}'. Use render.sampler=stratified or render.sampler=auto."
        )
    if requested not in SAMPLERS:
        raise BackendUnavailableError(f"unknown render.sampler '{requested}'; expected auto, stratified or occupancy_grid.")
    return requested, f"requested by render.sampler={requested}"


def select_sampler(render_cfg, device: torch.device | str) -> str:
    """:func:`choose_sampler`'s sampler, its choice logged."""
    chosen, reason = choose_sampler(render_cfg, device)
    logger.info("render.sampler -> %s (%s)", chosen, reason)
    return chosen


@dataclass
class RayOutput:
    """Per-ray results before the background. Shapes for N rays."""

    rgb: torch.Tensor  # (N, 3) Σ w_i c_i (premultiplied by opacity)
    opacity: torch.Tensor  # (N, 1)
    depth: torch.Tensor  # (N, 1)
    normal: Optional[torch.Tensor] = None  # (N, 3) Σ w_i n_i
    orientation: Optional[torch.Tensor] = None  # (N, 1) Σ sg(w_i) max(0, n_i·d)^2
    albedo: Optional[torch.Tensor] = None  # (N, 3) Σ w_i a_i, when asked for beside a shaded rgb


@dataclass
class RenderOutput:
    """Images of B cameras at H × W.

    Attributes:
        rgb: (B, 3, H, W) composited over the background, in [0, 1].
        opacity: (B, 1, H, W) ``Σ_i w_i``.
        depth: (B, 1, H, W) expected termination distance given the ray stops; 0 where empty.
        background: (B, 3, H, W) the background colours used.
        shading: the shading mode used.
        normal: (B, 3, H, W) ``Σ_i w_i n_i`` in world space, when normals were computed.
        orientation: (B, 1, H, W) per-pixel orientation penalty, when normals were computed.
        orientation_loss: scalar, the mean of ``orientation`` over all pixels.
        albedo: (B, 3, H, W) the unshaded albedo composited over the same background, when asked
            for with ``need_albedo`` (it comes free with a shaded render: same samples, same weights).
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    background: torch.Tensor
    shading: str
    normal: Optional[torch.Tensor] = None
    orientation: Optional[torch.Tensor] = None
    orientation_loss: Optional[torch.Tensor] = None
    albedo: Optional[torch.Tensor] = None


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision field outputs (autocast) are promoted: compositing exponentiates sums."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Put ``values: (M, C)`` at ``rows`` of an (n, C) zero tensor (differentiable to values)."""
    if values.shape[0] == n:
        return values
    return torch.zeros((n, values.shape[-1]), device=values.device, dtype=values.dtype).index_copy(0, rows, values)


class VolumeRenderer(nn.Module):
    """Renders a field from cameras; holds the background and, on CUDA, the occupancy grid.

    Args:
        scene_radius: the scene is the box ``[−r, r]³``; rays are clipped to it.
        sampler: ``stratified`` or ``occupancy_grid`` (resolve ``auto`` with :func:`select_sampler`).
        samples_per_ray: stratified intervals per ray; the occupancy grid marches with the step
            ``Δt = 2√3·r / samples_per_ray`` (the box diagonal over the sample count).
        near: rays start no closer than this.
        ambient: ambient fraction of the shading.
        light_jitter: std of the random light offset (see :mod:`carv3d.render.shading`).
        background: ``white`` | ``random`` | ``learned``.
        shading: ``albedo`` | ``lambertian`` | ``textureless`` | ``random`` (for :meth:`sample_shading`).
        albedo_probability: with ``shading=random``, the probability of ``albedo``.
        height, width: default image size.
        occupancy: the grid sampler, required for ``sampler="occupancy_grid"``.
    """

    def __init__(
        self,
        scene_radius: float,
        sampler: str = "stratified",
        samples_per_ray: int = 64,
        near: float = 0.05,
        ambient: float = 0.1,
        light_jitter: float = 0.5,
        background: str = "white",
        shading: str = "random",
        albedo_probability: float = 0.5,
        height: int = 64,
        width: int = 64,
        occupancy: Optional[OccupancyGridSampler] = None,
    ):
        super().__init__()
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} (resolve 'auto' with select_sampler), not '{sampler}'")
        if sampler == "occupancy_grid" and occupancy is None:
            raise ValueError("sampler='occupancy_grid' needs an OccupancyGridSampler")
        self.scene_radius = float(scene_radius)
        self.sampler = sampler
        self.samples_per_ray = int(samples_per_ray)
        self.near = float(near)
        self.ambient = float(ambient)
        self.light_jitter = float(light_jitter)
        self.shading = shading
        self.albedo_probability = float(albedo_probability)
        self.height, self.width = int(height), int(width)
        self.background = Background(background)
        self.occupancy = occupancy

    @property
    def render_step_size(self) -> float:
        """Marching step of the occupancy grid: the box diagonal over ``samples_per_ray``."""
        return 2.0 * math.sqrt(3.0) * self.scene_radius / self.samples_per_ray

    @classmethod
    def from_config(cls, render_cfg, scene_radius: float, device: torch.device | str) -> "VolumeRenderer":
        """Build from ``cfg.render``; the sampler is chosen by :func:`select_sampler`."""
        sampler = select_sampler(render_cfg, device)
        step = 2.0 * math.sqrt(3.0) * float(scene_radius) / int(render_cfg.samples_per_ray)
        occupancy = None
        if sampler == "occupancy_grid":
            occupancy = OccupancyGridSampler(
                scene_radius,
                resolution=int(render_cfg.occupancy_resolution),
                threshold=float(render_cfg.occupancy_threshold),
                update_every=int(render_cfg.occupancy_update_every),
                render_step_size=step,
                near=float(render_cfg.near),
                device=device,
            )
        renderer = cls(
            scene_radius,
            sampler=sampler,
            samples_per_ray=int(render_cfg.samples_per_ray),
            near=float(render_cfg.near),
            ambient=float(render_cfg.ambient),
            light_jitter=float(render_cfg.light_jitter),
            background=str(render_cfg.background),
            shading=str(render_cfg.shading),
            albedo_probability=float(render_cfg.albedo_probability),
            height=int(render_cfg.height),
            width=int(render_cfg.width),
            occupancy=occupancy,
        )
        return renderer.to(device)

    def sample_shading(self, generator: torch.Generator) -> str:
        """The shading mode of one render: ``render.shading``, or with ``random`` a draw of
        ``albedo`` with probability p = ``albedo_probability``, else ``lambertian`` or
        ``textureless`` with probability (1 − p)/2 each (two uniforms from ``generator``)."""
        if self.shading != "random":
            return self.shading
        u = torch.rand((2,), generator=generator, device=generator.device).tolist()
        if u[0] < self.albedo_probability:
            return "albedo"
        return "lambertian" if u[1] < 0.5 else "textureless"

    def update_occupancy(self, field: Field, step: int) -> None:
        """Refresh the occupancy grid (every ``occupancy_update_every`` steps); no-op for stratified."""
        if self.occupancy is not None:
            self.occupancy.update(field, step)

    def _segments(
        self, field: Field, origins: torch.Tensor, directions: torch.Tensor, generator: Optional[torch.Generator]
    ) -> tuple[RaySegments, torch.Tensor]:
        """Intervals for the rays, and the rows (into ``origins``) of the rays they refer to."""
        n = origins.shape[0]
        if self.sampler == "occupancy_grid":
            assert self.occupancy is not None
            self.occupancy.initialize_if_needed(field)
            segments = self.occupancy.sample(origins, directions, generator=generator, density_fn=field.density)
            rows = torch.arange(n, device=origins.device)
            if segments.t_starts.numel() == 0:  # nothing occupied: one empty interval keeps the graph alive
                t = torch.full((1,), self.near, device=origins.device)
                segments = RaySegments(t, t.clone(), torch.zeros(1, dtype=torch.long, device=origins.device), True)
            return segments, rows
        t_near, t_far, hit = ray_box_intersect(origins, directions, self.scene_radius, self.near)
        if origins.is_cuda:
            # Every ray, misses included: a miss has t_far == t_near, so its samples have zero width
            # and zero weight. Selecting the hits would need their count on the host (a sync per step).
            rows = torch.arange(n, device=origins.device)
            t_starts, t_ends = stratified_samples(t_near, t_far, self.samples_per_ray, generator)
            return RaySegments.batched(t_starts, t_ends), rows
        rows = hit.nonzero().squeeze(-1)
        if rows.numel() == 0:  # every ray misses: render ray 0 with its empty interval (t_far == t_near)
            rows = torch.zeros(1, dtype=torch.long, device=origins.device)
        t_starts, t_ends = stratified_samples(t_near[rows], t_far[rows], self.samples_per_ray, generator)
        return RaySegments.batched(t_starts, t_ends), rows

    @staticmethod
    def _sample_normals(field: Field, flat: torch.Tensor, weights: torch.Tensor, shape: torch.Size,
                        min_weight: float = 1e-4) -> torch.Tensor:
        """Normals at the samples (6 extra density evaluations each, central differences).

        Without autograd (validation, turntables) only samples whose weight w_i > ``min_weight`` get
        one: the others change a composited value by less than w_i·|n| and are left at 0, which makes
        shaded renders several times cheaper. Training computes every normal (they carry gradients).
        """
        if torch.is_grad_enabled():
            return _at_least_float32(field.normals(flat)).reshape(*shape, 3)
        normals = torch.zeros(flat.shape[0], 3, device=flat.device, dtype=torch.float32)
        mask = weights.reshape(-1) > min_weight
        if bool(mask.any()):
            normals[mask] = _at_least_float32(field.normals(flat[mask]))
        return normals.reshape(*shape, 3)

    def render_rays(
        self,
        field: Field,
        origins: torch.Tensor,
        directions: torch.Tensor,
        light_dirs: Optional[torch.Tensor] = None,
        shading: str = "albedo",
        need_normals: bool = False,
        generator: Optional[torch.Generator] = None,
        need_albedo: bool = False,
    ) -> RayOutput:
        """Render N rays (no background).

        Args:
            field: the field to render (see the module docstring).
            origins: (N, 3).
            directions: (N, 3) unit.
            light_dirs: (N, 3) unit directions towards the light; needed by lambertian/textureless.
            shading: ``albedo`` | ``lambertian`` | ``textureless``.
            need_normals: also composite normals and the orientation penalty.
            generator: jitter of the samples.
            need_albedo: also composite the unshaded albedo (``RayOutput.albedo``).
        """
        field_radius = getattr(field, "radius", self.scene_radius)
        if abs(float(field_radius) - self.scene_radius) > 1e-6:
            raise ValueError(f"field.radius={field_radius} but the renderer's scene radius is {self.scene_radius}")
        with_normals = need_normals or needs_normals(shading)
        n = origins.shape[0]
        segments, rows = self._segments(field, origins, directions, generator)
        ray_o, ray_d = origins[rows], directions[rows]
        n_active = rows.shape[0]

        points = segments.points(ray_o, ray_d)  # (*S, 3), S the segments' shape
        shape = segments.t_starts.shape
        flat = points.reshape(-1, 3)
        density, albedo = field(flat)
        sigmas = _at_least_float32(density).reshape(shape)
        albedo = _at_least_float32(albedo).reshape(*shape, 3)
        weights, _, _ = compute_weights(segments, sigmas, n_active)
        normals = self._sample_normals(field, flat, weights, shape) if with_normals else None
        sample_light = light_dirs[rows][segments.ray_indices] if light_dirs is not None else None
        colours = shade(albedo, normals, sample_light, shading, self.ambient)

        opacity = accumulate(segments, weights, None, n_active)
        rgb = accumulate(segments, weights, colours, n_active)
        depth = expected_depth(segments, weights, opacity, n_active)
        out = RayOutput(
            rgb=_scatter_rows(rgb, rows, n), opacity=_scatter_rows(opacity, rows, n), depth=_scatter_rows(depth, rows, n)
        )
        if normals is not None:
            facing_away = (normals * ray_d[segments.ray_indices]).sum(-1, keepdim=True).clamp_min(0.0) ** 2
            out.normal = _scatter_rows(accumulate(segments, weights, normals, n_active), rows, n)
            out.orientation = _scatter_rows(accumulate(segments, weights.detach(), facing_away, n_active), rows, n)
        if need_albedo:  # albedo shading already composited it
            unshaded = rgb if colours is albedo else accumulate(segments, weights, albedo, n_active)
            out.albedo = _scatter_rows(unshaded, rows, n)
        return out

    def forward(
        self,
        field: Field,
        cameras: Cameras,
        generator: Optional[torch.Generator] = None,
        shading: str = "albedo",
        height: Optional[int] = None,
        width: Optional[int] = None,
        need_normals: bool = False,
        chunk_rays: Optional[int] = None,
        need_albedo: bool = False,
    ) -> RenderOutput:
        """Render B cameras.

        Args:
            field: the field to render.
            cameras: B cameras (on the renderer's device).
            generator: randomness of this render (sample jitter, light offset, random background
                colour), drawn on the generator's device. None: a deterministic render (midpoint
                bins, headlight, white instead of random background).
            shading: ``albedo`` | ``lambertian`` | ``textureless`` (see :meth:`sample_shading`).
            height, width: image size; defaults to the configured one.
            need_normals: composite normals and the orientation penalty even for ``albedo``.
            chunk_rays: render at most this many rays at a time (big validation renders under
                ``torch.no_grad``); None renders all at once. With a generator the draws depend on
                the chunking, so keep it fixed for reproducible training renders.
            need_albedo: also return the unshaded albedo image of the same render
                (:attr:`RenderOutput.albedo`): a shaded and an albedo view for the price of one.

        Returns:
            :class:`RenderOutput`.
        """
        height = self.height if height is None else int(height)
        width = self.width if width is None else int(width)
        batch = len(cameras)
        origins, directions = camera_rays(cameras, height, width)  # (B, H, W, 3)
        background = self.background(directions, generator)  # (B, H, W, 3)
        light = None
        if needs_normals(shading):
            light = sample_light_directions(cameras.positions, self.light_jitter, generator)  # (B, 3)
            light = light[:, None, None, :].expand_as(directions).reshape(-1, 3)
        origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
        n_rays = origins.shape[0]
        chunk = n_rays if not chunk_rays else int(chunk_rays)
        parts = []
        for start in range(0, n_rays, chunk):
            stop = min(start + chunk, n_rays)
            parts.append(
                self.render_rays(
                    field,
                    origins[start:stop],
                    directions[start:stop],
                    None if light is None else light[start:stop],
                    shading=shading,
                    need_normals=need_normals,
                    generator=generator,
                    need_albedo=need_albedo,
                )
            )

        def image(name: str) -> Optional[torch.Tensor]:
            values = [getattr(p, name) for p in parts]
            if values[0] is None:
                return None
            return torch.cat(values, dim=0).view(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()

        opacity = image("opacity")
        bg = background.permute(0, 3, 1, 2).contiguous()
        rgb = image("rgb") + (1.0 - opacity) * bg
        orientation = image("orientation")
        albedo = image("albedo")
        return RenderOutput(
            rgb=rgb,
            opacity=opacity,
            depth=image("depth"),
            background=bg,
            shading=shading,
            normal=image("normal"),
            orientation=orientation,
            orientation_loss=None if orientation is None else orientation.mean(),
            albedo=None if albedo is None else albedo + (1.0 - opacity) * bg,
        )
