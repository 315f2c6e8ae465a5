"""What is optimised and how it is rendered: the scene seam (:mod:`carv3d.scene.base`).

- :class:`Scene` — the protocol the step, export and evaluation use.
- :func:`build_scene` — the one factory: ``scene.type`` → implementation (imported on demand, so
  importing this package does not load a renderer backend).
- ``nerf``: :class:`carv3d.scene.nerf.NeRFScene` — hash grid (:mod:`carv3d.scene.hashgrid`, torch
  or tinycudann) + :class:`carv3d.scene.field.NeRFField` + the volume renderer.
- ``gaussians``: :class:`carv3d.scene.gaussians.GaussianScene` — 3D Gaussian splats, rasterised by
  gsplat on CUDA or by carv3d's PyTorch rasteriser, with adaptive density control.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from carv3d.scene.base import Scene

# scene.type → "module:Class"; each class takes (scene_cfg, render_cfg, device, seed).
SCENES: dict[str, str] = {"nerf": "carv3d.scene.nerf:NeRFScene", "gaussians": "carv3d.scene.gaussians:GaussianScene"}


def build_scene(scene_cfg: Any, render_cfg: Any, device: torch.device, seed: int = 0) -> Scene:
    """The scene ``scene_cfg.type`` names, initialised from ``seed``."""
    module, _, name = SCENES[str(scene_cfg.type)].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(scene_cfg, render_cfg, torch.device(device), seed)


__all__ = ["SCENES", "Scene", "build_scene"]
