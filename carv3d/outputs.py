"""What a run leaves for people to look at: metrics, validation sheets, the turntable, the mesh."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from carv3d.log import logger
from carv3d.cameras import orbit_cameras
from carv3d.render.turntable import image_grid, render_turntable, write_image, write_video

if TYPE_CHECKING:  # pragma: no cover
    from carv3d.train import Trainer


class MetricsWriter:
    """metrics.jsonl (one line per logged step) and, when installed, TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                logger.warning("tensorboard is not importable; metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, Any], **extra: float) -> dict[str, float]:
        from carv3d.train import metrics_to_floats

        row = {"step": step, **metrics_to_floats(metrics), **extra}
        self._file.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                     for k, v in row.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
        return row

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] → (B, H, W, 3) uint8."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def validation_sheet(field, renderer, resolution: int, n_views: int = 4, elevation: float = 15.0,
                     distance: float = 2.0, fovy: float = 45.0) -> np.ndarray:
    """Rows: albedo, shaded (lambertian), opacity — from ``n_views`` orbit cameras (front first)."""
    device = next(field.parameters()).device
    cameras = orbit_cameras(n_views, elevation_deg=elevation, distance=distance, fovy_deg=fovy, device=device)
    # One render gives all three rows: the albedo composites from the lambertian render's samples.
    out = renderer(field, cameras, generator=None, shading="lambertian", height=resolution, width=resolution,
                   need_albedo=True)
    rows = [_to_uint8(out.albedo), _to_uint8(out.rgb), _to_uint8(out.opacity)]
    return image_grid(np.concatenate(rows), ncols=n_views)


def validation_path(trainer: "Trainer") -> Path:
    """Where the validation sheet of the trainer's current step goes."""
    return trainer.run_dir / "validation" / f"step_{trainer.step:07d}.png"


def write_validation(trainer: "Trainer") -> Path:
    cfg = trainer.cfg
    was_training = trainer.field.training
    trainer.field.eval()
    trainer.renderer.eval()
    sheet = validation_sheet(trainer.field, trainer.renderer, cfg.train.val_resolution)
    path = validation_path(trainer)
    write_image(path, sheet)
    try:
        figure = trainer.estimator.proposal_figure()
        if figure is not None:
            from carv3d.io import atomic_path

            with atomic_path(trainer.run_dir / "validation" / f"proposal_step_{trainer.step:07d}.png") as tmp:
                figure.savefig(tmp, dpi=100)
            import matplotlib.pyplot as plt

            plt.close(figure)
    except Exception as err:  # a plot must never stop training
        logger.warning("could not plot the proposal: %s", err)
    if was_training:
        trainer.field.train()
        trainer.renderer.train()
    return path


def write_turntable(field, renderer, path: Path, n_frames: int, resolution: int, fps: int) -> Path:
    frames = render_turntable(field, renderer, n_frames=n_frames, size=resolution)
    write_video(frames, path, fps=fps)
    return path


def finish(trainer: "Trainer", interrupted: bool = False) -> None:
    """End of a run (also after Ctrl-C): a final validation sheet, the turntable and the mesh."""
    cfg = trainer.cfg
    trainer.field.eval()
    trainer.renderer.eval()
    if not validation_path(trainer).exists():  # not already written by the loop at this step
        write_validation(trainer)
    if cfg.train.turntable_frames > 0:
        write_turntable(trainer.field, trainer.renderer, trainer.run_dir / "turntable.mp4",
                        cfg.train.turntable_frames, cfg.train.val_resolution, cfg.train.turntable_fps)
    if cfg.export.at_end:
        from carv3d.export.command import export_scene
        from carv3d.export.isosurface import EmptyMeshError

        try:
            export_scene(trainer.field, trainer.renderer, trainer.run_dir / "mesh", cfg.export, overwrite=True)
        except EmptyMeshError as err:  # the run itself is fine; say why there is no mesh
            logger.warning("no mesh exported: %s", err)
    logger.info("outputs in %s", trainer.run_dir)
