"""A trained scene rebuilt from a run directory (for export, render, evaluate and variance).

The scene is built by the same factory as in training (:func:`carv3d.scene.build_scene`) from the
run's own config, so a checkpoint always loads into the module it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from carv3d.checkpoint import latest_checkpoint, load_checkpoint
from carv3d.errors import CheckpointError
from carv3d.log import logger
from carv3d.run_dir import load_run_config, require_run_dir
from carv3d.scene import Scene, build_scene
from carv3d.step import scene_state


@dataclass
class SavedScene:
    """A trained scene and where it came from."""

    run_dir: Path
    cfg: DictConfig
    scene: Scene
    step: int
    device: torch.device


def load_scene(run_dir: str | Path, device: str | torch.device = "cpu") -> SavedScene:
    """Rebuild the scene of a run from its config and latest checkpoint, in eval mode.

    A scene saved on CUDA loads on a CPU: CUDA-only state (the occupancy grid) is left out.
    """
    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    device = torch.device(device)
    state = load_checkpoint(latest_checkpoint(run_dir), map_location=device)
    scene = build_scene(cfg.scene, cfg.render, device, cfg.train.seed)
    try:
        scene.load_state_dict(scene_state(state), strict=False)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"the checkpoint of '{run_dir}' does not match its config ({str(err).splitlines()[0][:200]})."
        ) from None
    scene.eval()
    logger.debug("loaded %s at step %d", run_dir, state["step"])
    return SavedScene(run_dir, cfg, scene, int(state["step"]), device)
