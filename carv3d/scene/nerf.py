"""``scene.type: nerf`` — the hash-grid NeRF field with its volume renderer.

The field (:class:`carv3d.scene.field.NeRFField`) holds density and albedo; the renderer
(:class:`carv3d.render.renderer.VolumeRenderer`) holds the background and, on CUDA, the occupancy
grid that it refreshes before every step. Its state holds ``field.*`` then ``renderer.*``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from carv3d.cameras import Cameras
from carv3d.render.renderer import VolumeRenderer
from carv3d.scene.base import Scene
from carv3d.scene.field import NeRFField


class NeRFScene(Scene):
    """A :class:`NeRFField` rendered by a :class:`VolumeRenderer`.

    Args:
        scene_cfg: the ``scene`` section (:class:`carv3d.config.NeRFSceneConfig`).
        render_cfg: the ``render`` section.
        device: where it lives; decides the hash-grid backend and the ray sampler.
        seed: the initial weights' seed (the run's ``train.seed``).
    """

    type_name = "nerf"
    field: NeRFField

    def __init__(self, scene_cfg: Any, render_cfg: Any, device: torch.device, seed: int = 0):
        super().__init__()
        self.field = NeRFField(scene_cfg, device=device, generator=torch.Generator().manual_seed(seed))
        # The learned background's layers initialise from torch's global generator; seed a forked
        # copy of it so the run is reproducible without touching the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            self.renderer = VolumeRenderer.from_config(render_cfg, scene_cfg.radius, device)

    @classmethod
    def from_parts(cls, field: Any, renderer: VolumeRenderer) -> "NeRFScene":
        """A scene of an existing field (any object with the field protocol of
        :mod:`carv3d.render.renderer`, e.g. an analytic world object) and renderer."""
        scene = cls.__new__(cls)
        Scene.__init__(scene)
        scene.field, scene.renderer = field, renderer
        return scene

    @property
    def backends(self) -> dict[str, str]:
        return {"hash_grid": getattr(self.field, "encoding_backend", "none"), "sampler": self.renderer.sampler}

    def render(self, cameras: Cameras, generator: Optional[torch.Generator] = None, shading: str = "albedo",
               height: Optional[int] = None, width: Optional[int] = None, need_normals: bool = False,
               need_albedo: bool = False, chunk_rays: Optional[int] = None):
        return self.renderer(self.field, cameras, generator=generator, shading=shading, height=height,
                             width=width, need_normals=need_normals, chunk_rays=chunk_rays, need_albedo=need_albedo)

    def sample_shading(self, generator: torch.Generator) -> str:
        return self.renderer.sample_shading(generator)

    def parameter_groups(self, optim_cfg: Any) -> list[dict[str, Any]]:
        return self.field.parameter_groups(optim_cfg.lr_grid, optim_cfg.lr_mlp) + [
            {"params": list(self.renderer.parameters()), "lr": optim_cfg.lr_background, "name": "background"}]

    def before_step(self, step: int) -> None:
        self.renderer.update_occupancy(self.field, step)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load ``field.*`` strictly; ``renderer.*`` strictly too unless ``strict=False``, which lets
        a scene saved on CUDA (with an occupancy grid) load on a CPU (without one)."""
        field = {k[len("field."):]: v for k, v in state.items() if k.startswith("field.")}
        renderer = {k[len("renderer."):]: v for k, v in state.items() if k.startswith("renderer.")}
        unknown = [k for k in state if not k.startswith(("field.", "renderer."))]
        if unknown:
            raise RuntimeError(f"unexpected scene keys {unknown[:3]}")
        self.field.load_state_dict(field)
        return self.renderer.load_state_dict(renderer, strict=strict)
