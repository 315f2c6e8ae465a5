"""The one place where config + device become objects: device, field, renderer, teacher, estimator.

Commands that work on a saved run (export, render, evaluate, variance) rebuild the scene through
the same functions as training, so a checkpoint always loads into the module it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from carv3d.checkpoint import latest_checkpoint, load_checkpoint

from carv3d.errors import CheckpointError
from carv3d.log import logger
from carv3d.render.renderer import VolumeRenderer
from carv3d.run_dir import load_run_config, require_run_dir
from carv3d.scene.field import NeRFField


def build_field(cfg: DictConfig, device: torch.device, seed: int) -> NeRFField:
    generator = torch.Generator().manual_seed(seed)
    return NeRFField(cfg.scene, device=device, generator=generator)


def build_renderer(cfg: DictConfig, device: torch.device, seed: int = 0) -> VolumeRenderer:
    # The learned background's layers initialise from torch's global generator; seed a forked copy
    # of it so the run is reproducible without touching the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return VolumeRenderer.from_config(cfg.render, cfg.scene.radius, device)


@dataclass
class SavedScene:
    """A trained scene rebuilt from a run directory."""

    run_dir: Path
    cfg: DictConfig
    field: NeRFField
    renderer: VolumeRenderer
    step: int
    device: torch.device


def load_scene(run_dir: str | Path, device: str | torch.device = "cpu") -> SavedScene:
    """Rebuild the field and renderer of a run from its config and latest checkpoint."""
    run_dir = require_run_dir(run_dir)
    cfg = load_run_config(run_dir)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    state = load_checkpoint(latest_checkpoint(run_dir), map_location=device)
    field = build_field(cfg, device, cfg.train.seed)
    renderer = build_renderer(cfg, device, cfg.train.seed)
    try:
        field.load_state_dict(state["field"])
        renderer.load_state_dict(state["renderer"], strict=False)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"the checkpoint of '{run_dir}' does not match its config ({str(err).splitlines()[0][:200]})."
        ) from None
    field.eval()
    renderer.eval()
    logger.debug("loaded %s at step %d", run_dir, state["step"])
    return SavedScene(run_dir, cfg, field, renderer, int(state["step"]), device)
