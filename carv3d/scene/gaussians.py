"""``scene.type: gaussians`` — 3D Gaussian splats behind the scene seam (DreamGaussian-style).

The parts, one job each:

- :mod:`carv3d.scene.gaussians_model` — the Gaussians (parameters, covariances, SH colours, initialisation);
- :mod:`carv3d.scene.gaussians_raster` — projection and compositing in PyTorch (any device);
- :mod:`carv3d.scene.gaussians_gsplat` — gsplat on CUDA, and the rasteriser's choice;
- :mod:`carv3d.scene.gaussians_density` — clone / split / prune / opacity reset, optimiser state included;
- :mod:`carv3d.scene.gaussians_field` — the density / colour query the mesh export uses;
- :mod:`carv3d.scene.gaussians_ply` — the standard 3DGS ``.ply``.

A render returns the NeRF's :class:`~carv3d.render.renderer.RenderOutput`: each Gaussian gets, per
camera, its colour (its SH colour seen from the camera, shaded when the mode asks), its distance
from the camera and, when normals are needed, its normal — the axis of its smallest scale, turned
towards the camera (the normal of the flat disc a Gaussian becomes). These features are composited
with the same weights ``α_i T_i``, so

    rgb = Σ w_i c_i + (1 − A) b,    opacity A = Σ w_i,    depth = Σ w_i ‖μ_i − o‖ / A,    normal = Σ w_i n_i,

over the ``render.background`` b. Lambertian and textureless shading shade each Gaussian with its
normal before compositing (:func:`carv3d.render.shading.shade`). The NeRF's orientation penalty has
no counterpart: normals turned towards the camera never face away, so ``orientation`` is None.

Per-step hook (:meth:`GaussianScene.after_step`, after the optimiser's step): the position learning
rate's decay, the view-space gradient statistics of the step's render and, on schedule, density
control — which changes the number of Gaussians and edits the optimiser's groups and Adam state to
match. Its state (the statistics, the split offsets' generator) is in :meth:`state_dict`, so a resumed
run continues bit-identically; :meth:`load_state_dict` takes a state of any number of Gaussians.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from carv3d.cameras import Cameras
from carv3d.devices import warm_up_gsplat
from carv3d.log import logger
from carv3d.render.background import Background
from carv3d.render.rays import camera_rays
from carv3d.render.renderer import RenderOutput
from carv3d.render.shading import needs_normals, sample_light_directions, shade
from carv3d.scene.base import Scene
from carv3d.scene.gaussians_density import (densify_and_prune, learning_rate_schedule, record_gradients,
                                            reset_opacity)
from carv3d.scene.gaussians_field import GaussianField
from carv3d.scene.gaussians_gsplat import rasterize_gsplat, select_rasterizer
from carv3d.scene.gaussians_model import Gaussians, covariance, quaternion_to_rotation
from carv3d.scene.gaussians_ply import SPLAT_FILE, read_splats, write_splats
from carv3d.scene.gaussians_raster import camera_matrices, project, rasterize


class GaussianScene(Scene):
    """N Gaussians, their background, their density control.

    Args:
        scene_cfg: the ``scene`` section (:class:`carv3d.config.GaussianSceneConfig`).
        render_cfg: the ``render`` section (size, shading, light, background).
        device: where it lives; decides the rasteriser (:func:`select_rasterizer`).
        seed: the initial Gaussians' seed (the run's ``train.seed``).

    Raises:
        SplatFileError: ``scene.init_from`` is not a readable splat PLY.
    """

    type_name = "gaussians"
    field: GaussianField

    def __init__(self, scene_cfg: Any, render_cfg: Any, device: torch.device, seed: int = 0):
        super().__init__()
        self.cfg, self.render_cfg = scene_cfg, render_cfg
        self.rasterizer = select_rasterizer(str(scene_cfg.rasterizer), device)
        generator = torch.Generator(device=device).manual_seed(seed)
        if str(scene_cfg.init_from):
            self.gaussians = Gaussians.from_tensors(read_splats(str(scene_cfg.init_from)), int(scene_cfg.sh_degree),
                                                    device)
            logger.info("scene: %d Gaussians from %s", len(self.gaussians), scene_cfg.init_from)
        else:
            self.gaussians = Gaussians.in_ball(int(scene_cfg.n_points), float(scene_cfg.init_radius),
                                               float(scene_cfg.init_opacity), int(scene_cfg.sh_degree), generator)
        with torch.random.fork_rng(devices=[]):  # the learned background's layers draw from the global generator
            torch.manual_seed(seed + 2)
            self.background = Background(str(render_cfg.background)).to(device)
        n = len(self.gaussians)
        self.register_buffer("grad_accum", torch.zeros(n, device=device))
        self.register_buffer("grad_count", torch.zeros(n, device=device))
        self.split_generator = torch.Generator().manual_seed(seed + 3)  # CPU: the same splits on any device
        self.field = GaussianField(lambda: self.gaussians, float(scene_cfg.radius))
        self._viewspace: Optional[tuple[torch.Tensor, torch.Tensor, int, int]] = None
        self.last_density: dict[str, int] = {}
        self.total_steps: Optional[int] = None  # the run's planned length (plan), None outside a run
        if self.rasterizer == "gsplat":
            seconds = warm_up_gsplat()
            logger.info("gsplat CUDA extension ready in %.1f s", seconds or 0.0)

    @property
    def backends(self) -> dict[str, str]:
        return {"rasterizer": self.rasterizer}

    # ------------------------------------------------------------------ rendering
    def render(self, cameras: Cameras, generator: Optional[torch.Generator] = None, shading: str = "albedo",
               height: Optional[int] = None, width: Optional[int] = None, need_normals: bool = False,
               need_albedo: bool = False, chunk_rays: Optional[int] = None) -> RenderOutput:
        """Render B cameras (module docstring). ``chunk_rays`` bounds the torch rasteriser's
        (pixel, Gaussian) pairs in memory at once (× 64: the NeRF's samples per ray); gsplat needs none."""
        height = int(self.render_cfg.height if height is None else height)
        width = int(self.render_cfg.width if width is None else width)
        g = self.gaussians
        positions = cameras.positions.to(g.means.dtype)
        to_gaussian = g.means[None] - positions[:, None]  # (B, N, 3)
        distance = to_gaussian.norm(dim=-1, keepdim=True)
        view = to_gaussian / distance.clamp_min(1e-12)
        colour = g.colours(view if g.sh_degree > 0 else None).expand(len(cameras), -1, -1)
        _, directions = camera_rays(cameras, height, width)
        background = self.background(directions, generator).permute(0, 3, 1, 2)  # (B, 3, H, W)
        with_normals = need_normals or needs_normals(shading)
        features = [colour, distance]
        if with_normals:
            rotation = quaternion_to_rotation(g.quats)  # (N, 3, 3)
            axis = torch.gather(rotation, 2, g.log_scales.argmin(dim=-1)[:, None, None].expand(-1, 3, 1))[..., 0]
            normals = axis[None] * -torch.sign((axis[None] * view).sum(-1, keepdim=True) + 1e-12)  # towards the camera
            light = sample_light_directions(cameras.positions, float(self.render_cfg.light_jitter), generator)
            features[0] = shade(colour, normals, light[:, None, :], shading, float(self.render_cfg.ambient))
            features.append(normals)
        if need_albedo and features[0] is not colour:
            features.append(colour)
        images, alpha, means2d, radii = self._rasterize(cameras, torch.cat(features, dim=-1), height, width,
                                                        chunk_rays)
        if torch.is_grad_enabled() and means2d.requires_grad:
            means2d.retain_grad()  # its gradient is the view-space gradient of density control
            self._viewspace = (means2d, radii, width, height)
        images, alpha = images.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)
        uncovered = (1.0 - alpha) * background
        out = RenderOutput(rgb=images[:, :3] + uncovered, opacity=alpha,
                           depth=images[:, 3:4] / alpha.clamp_min(torch.finfo(alpha.dtype).eps),
                           background=background, shading=shading)
        if with_normals:
            out.normal = images[:, 4:7]
        if need_albedo:
            out.albedo = out.rgb if features[0] is colour else images[:, -3:] + uncovered
        return out

    def _rasterize(self, cameras: Cameras, features: torch.Tensor, height: int, width: int,
                   chunk_rays: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.gaussians
        viewmats, ks = camera_matrices(cameras, height, width)
        if self.rasterizer == "gsplat":
            images, alpha, meta = rasterize_gsplat(g.means, g.quats, g.scales(), g.opacities(), features, viewmats,
                                                   ks, height, width)
            return images, alpha, meta["means2d"], meta["radii"]
        opacities = g.opacities()
        projection = project(g.means, covariance(g.quats, g.scales()), viewmats, ks, width, height, opacities)
        extra = {"max_pairs": int(chunk_rays) * 64} if chunk_rays else {}
        images, alpha = rasterize(projection, opacities, features, height, width, **extra)
        return images, alpha, projection.means2d, projection.radii

    def sample_shading(self, generator: torch.Generator) -> str:
        """``render.shading``, or with ``random`` the draw of :meth:`VolumeRenderer.sample_shading`:
        albedo with probability ``albedo_probability``, else lambertian or textureless evenly."""
        mode = str(self.render_cfg.shading)
        if mode != "random":
            return mode
        u = torch.rand((2,), generator=generator, device=generator.device).tolist()
        if u[0] < float(self.render_cfg.albedo_probability):
            return "albedo"
        return "lambertian" if u[1] < 0.5 else "textureless"

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self, optim_cfg: Any) -> list[dict[str, Any]]:
        """One Adam group per Gaussian parameter (DreamGaussian's learning rates, ``scene.lr``), and
        the background's (``optim.lr_background``)."""
        lr = self.cfg.lr
        g = self.gaussians
        rates = {"means": learning_rate_schedule(0, lr.position, lr.position_final, lr.position_decay_steps),
                 "log_scales": lr.scale, "quats": lr.rotation, "opacity_logits": lr.opacity,
                 "sh_dc": lr.colour, "sh_rest": lr.colour / 20.0}
        groups = [{"params": [getattr(g, name)], "lr": float(rate), "name": name} for name, rate in rates.items()]
        return groups + [{"params": list(self.background.parameters()), "lr": optim_cfg.lr_background,
                          "name": "background"}]

    def after_step(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """After optimiser step ``step`` (1-based): position learning rate for the next step,
        gradient statistics, and on schedule densify / prune / reset (:mod:`carv3d.scene.gaussians_density`)."""
        density, lr = self.cfg.density, self.cfg.lr
        viewspace, self._viewspace = self._viewspace, None
        in_window = int(density.start) <= step <= int(density.stop)
        if in_window and viewspace is not None and viewspace[0].grad is not None:
            means2d, radii, width, height = viewspace
            record_gradients(self.grad_accum, self.grad_count, means2d.grad, radii, width, height)
        if optimizer is None:  # without the optimiser the parameters cannot change shape
            return
        for group in optimizer.param_groups:
            if group.get("name") == "means":
                group["lr"] = learning_rate_schedule(step, lr.position, lr.position_final, lr.position_decay_steps)
        if not in_window:
            return
        if step % int(density.every) == 0:
            started = time.perf_counter()
            report = densify_and_prune(self.gaussians, optimizer, self.grad_accum, self.grad_count, density,
                                       self.split_generator)
            n = report.count
            self.grad_accum = torch.zeros(n, device=self.grad_accum.device)
            self.grad_count = torch.zeros(n, device=self.grad_count.device)
            self.last_density = {"step": step, "cloned": report.cloned, "split": report.split,
                                 "pruned": report.pruned, "gaussians": n}
            logger.debug("step %d: %d cloned, %d split, %d pruned -> %d Gaussians (%.3f s)", step, report.cloned,
                         report.split, report.pruned, n, time.perf_counter() - started)
        if int(density.opacity_reset_every) > 0 and step % int(density.opacity_reset_every) == 0:
            if self.reset_too_late(step):
                logger.info("step %d: opacity reset skipped, %d steps before the run's end (scene.density."
                            "opacity_reset_margin=%d)", step, self.total_steps - step, int(density.opacity_reset_margin))
            else:
                reset_opacity(self.gaussians, optimizer, float(density.opacity_reset_value))

    def plan(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def reset_too_late(self, step: int) -> bool:
        """Whether an opacity reset at ``step`` would leave the run fewer than
        ``scene.density.opacity_reset_margin`` steps to grow the opacities back: a reset empties the
        render for about 20 steps (the embedded world, docs/BENCHMARKS.md), and a run that ends
        inside that window exports a nearly transparent scene."""
        margin = int(self.cfg.density.opacity_reset_margin)
        return self.total_steps is not None and margin > 0 and self.total_steps - step < margin

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"split_generator": self.split_generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict) and "split_generator" in state:
            self.split_generator.set_state(state["split_generator"].cpu())

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load a state of any number of Gaussians (the parameters are resized to it first)."""
        means = state.get("gaussians.means")
        if means is not None and means.shape[0] != len(self.gaussians):
            n = means.shape[0]
            self.gaussians.resize(n)
            self.grad_accum = torch.zeros(n, device=self.grad_accum.device)
            self.grad_count = torch.zeros(n, device=self.grad_count.device)
        return super().load_state_dict(state, strict=strict)

    # ------------------------------------------------------------------ files
    def write_native(self, out_dir: Path, overwrite: bool = False) -> dict[str, Path]:
        """The Gaussians as the standard 3DGS splat PLY (``out_dir/splats.ply``)."""
        g = self.gaussians
        path = write_splats(Path(out_dir) / SPLAT_FILE, g.means, g.log_scales, g.quats, g.opacity_logits, g.sh_dc,
                            g.sh_rest, overwrite=overwrite)
        return {"splats": path}
