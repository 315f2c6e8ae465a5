"""The scene seam: what the distillation step optimises and renders.

A scene pairs a representation with its renderer. The step, export, evaluation and the outputs
ask it only these questions, so a new representation (Gaussians next to the hash-grid NeRF) is a
new module behind :func:`carv3d.scene.build_scene`:

==========================  ====================================================================
``render(cameras, ...)``    images of B cameras → :class:`carv3d.render.output.RenderOutput`
                            (rgb, opacity, depth; normals / orientation when asked for)
``sample_shading(gen)``     the shading mode of one training render (DreamFusion's random shading)
``parameter_groups(optim)`` Adam groups, each with a ``name`` and its learning rate
``plan(total_steps)``       the run's planned length, before training and again on resume (which
                            may extend it), for schedules that must respect the run's end
``before_step(step)``       per-step hook before the render (occupancy-grid refresh, ...)
``after_step(step, opt)``   per-step hook after the optimiser step (densify / prune, ...); a scene
                            whose parameters change shape edits the optimiser ``opt`` to match
``write_native(dir)``       the scene in its own file format, if it has one (Gaussians: splats.ply)
``field``                   the density / colour query export and evaluation use:
                            ``field(x) -> (σ, albedo)``, ``field.density(x)``, ``field.radius``
``backends``                the backends chosen for this device, for logs and run.json
==========================  ====================================================================

A scene knows nothing about diffusion; it is an ``nn.Module`` so that ``state_dict``, ``train()``
and ``eval()`` cover everything it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from carv3d.cameras import Cameras


class Scene(nn.Module):
    """Base class of the scenes (see the module docstring for the protocol)."""

    #: the ``scene.type`` this class implements
    type_name = "scene"

    #: The density / colour query export and evaluation use: ``field(x: (N, 3)) -> (σ: (N,),
    #: albedo: (N, 3))``, ``field.density(x)``, ``field.radius``. Set by each implementation.
    field: Any

    @property
    def backends(self) -> dict[str, str]:
        return {}

    def render(
        self,
        cameras: Cameras,
        generator: Optional[torch.Generator] = None,
        shading: str = "albedo",
        height: Optional[int] = None,
        width: Optional[int] = None,
        need_normals: bool = False,
        need_albedo: bool = False,
        chunk_rays: Optional[int] = None,
    ) -> Any:
        raise NotImplementedError

    def sample_shading(self, generator: torch.Generator) -> str:
        return "albedo"

    def parameter_groups(self, optim_cfg: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def plan(self, total_steps: int) -> None:
        """Told the run's planned number of steps before its first step (and again on a resume, which
        may extend it). Scenes whose schedules must leave the run's last steps alone keep it."""

    def before_step(self, step: int) -> None:
        """Called at the start of every training step (before the render)."""

    def after_step(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Called after every optimiser step (``step`` counts the steps taken, from 1).

        A scene whose parameter tensors change (Gaussians' densification) replaces them in
        ``optimizer``'s groups and moves their state along; without an optimiser it keeps its
        parameters' shapes. After loading a state the optimiser is built again from
        :meth:`parameter_groups`, so shapes saved mid-run load exactly.
        """

    def write_native(self, out_dir: Path, overwrite: bool = False) -> dict[str, Path]:
        """Write the scene in its own file format next to the mesh; returns name → path (none here)."""
        return {}

    @property
    def device(self) -> torch.device:
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")
