"""What a run leaves for people to look at: metrics, validation sheets, the turntable, the mesh.

Every function here takes the parts it draws (a scene, an estimator, a run directory), never the
trainer. One output failing is logged with what to do and never costs the others or the run
(:func:`attempt`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from carv3d.cameras import orbit_cameras
from carv3d.io import atomic_path, reporting_full_disk
from carv3d.log import logger
from carv3d.run_dir import METRICS_FILE
from carv3d.render.turntable import image_grid, render_turntable, to_uint8, write_image, write_video


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Turn tensors into floats (the host sync happens here, only on logging steps); non-scalars are dropped."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class MetricsWriter:
    """metrics.jsonl (one line per logged step) and, when installed, TensorBoard scalars.

    ``start_step``: the step training continues from (a resumed run's checkpoint). The rows a run
    logged after its last checkpoint, before it was killed, are dropped from metrics.jsonl (with a
    half-written last line) and purged from TensorBoard, so the continued run's rows for those steps
    are the only ones.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, start_step: int = 0):
        self.path = run_dir / METRICS_FILE
        if self.path.is_file():
            drop_rows_after(self.path, start_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the events at and after it that an earlier process wrote
                self._tb = SummaryWriter(str(run_dir / "tensorboard"),
                                         purge_step=start_step + 1 if start_step > 0 else None)
            except ImportError:  # tensorboard is a dependency, but keep training if it is broken
                logger.warning("tensorboard is not importable; metrics go to metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, Any], **extra: float) -> dict[str, float]:
        row = {"step": step, **metrics_to_floats(metrics), **extra}
        with reporting_full_disk(self.path, f"Nothing is lost: the last checkpoint is intact. Free some space, then "
                                 f"continue with `carv3d train --resume {self.path.parent}`."):
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


def drop_rows_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl without its rows past ``step`` and any line that is not whole JSON (a
    write cut off by a kill); returns how many lines were dropped. Untouched when nothing is dropped."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    dropped = sum(1 for line in lines if line.strip()) - len(kept)
    if dropped:
        with reporting_full_disk(path, "Nothing is lost: the last checkpoint is intact. Free some space, then "
                                 f"continue with `carv3d train --resume {path.parent}`."):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(kept), encoding="utf-8")
        logger.info("metrics.jsonl: dropped %d row(s) logged after the checkpoint at step %d", dropped, step)
    return dropped


# Rays per renderer call of the end-of-run renders (sheets; the turntable and the export's silhouettes
# use the same number): deterministic renders under torch.no_grad, so the chunking changes no pixel
# (tests/test_memory.py), and it bounds their memory whatever the resolution: 4 views at 128 px in one
# piece were 65,536 rays, 22.8 GB with the default config on a CPU.
RENDER_CHUNK_RAYS = 16384


@torch.no_grad()
def validation_sheet(scene, resolution: int, n_views: int = 4, elevation: float = 15.0,
                     distance: float = 2.0, fovy: float = 45.0, chunk_rays: Optional[int] = RENDER_CHUNK_RAYS
                     ) -> np.ndarray:
    """Rows: albedo, shaded (lambertian), opacity — from ``n_views`` orbit cameras (front first),
    rendered ``chunk_rays`` rays at a time (None: all at once)."""
    cameras = orbit_cameras(n_views, elevation_deg=elevation, distance=distance, fovy_deg=fovy, device=scene.device)
    # One render gives all three rows: the albedo composites from the lambertian render's samples.
    out = scene.render(cameras, generator=None, shading="lambertian", height=resolution, width=resolution,
                       need_albedo=True, chunk_rays=chunk_rays)
    rows = [to_uint8(out.albedo), to_uint8(out.rgb), to_uint8(out.opacity)]
    return image_grid(np.concatenate(rows), ncols=n_views)


def validation_path(run_dir: Path, step: int) -> Path:
    """Where the validation sheet of ``step`` goes."""
    return run_dir / "validation" / f"step_{step:07d}.png"


def write_validation(scene, estimator, run_dir: Path, step: int, resolution: int) -> Path:
    """The validation sheet of ``step`` and, when the estimator has one, its proposal plot."""
    was_training = scene.training
    scene.eval()
    try:
        path = write_image(validation_path(run_dir, step), validation_sheet(scene, resolution))
    finally:
        scene.train(was_training)
    attempt("proposal plot", write_proposal_plot, estimator, run_dir / "validation" / f"proposal_step_{step:07d}.png")
    return path


def write_proposal_plot(estimator, path: Path) -> None:
    figure = estimator.proposal_figure()
    if figure is None:
        return
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=100)
    finally:
        plt.close(figure)


def write_turntable(scene, path: Path, n_frames: int, resolution: int, fps: int) -> Path:
    scene.eval()
    return write_video(render_turntable(scene, n_frames=n_frames, size=resolution), path, fps=fps)


def attempt(name: str, write: Callable[..., Any], *args: Any, hint: str = "") -> bool:
    """Run one output writer; a failure (not Ctrl-C) is logged with what to do and returns False."""
    try:
        write(*args)
        return True
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # an output must never cost the run or the other outputs
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        logger.warning("could not write the %s: %s%s", name, first[:300], f" ({hint})" if hint else "")
        return False


def finish(scene, estimator, run_dir: Path, cfg, step: int) -> list[str]:
    """End of a run (also after Ctrl-C): the last validation sheet, the turntable and the mesh.

    Each is attempted on its own. Returns the names of the outputs that failed (empty when all
    were written).
    """
    from carv3d.export.from_scene import export_scene

    scene.eval()
    failed: list[str] = []
    if not validation_path(run_dir, step).exists():  # not already written by the loop at this step
        if not attempt("validation sheet", write_validation, scene, estimator, run_dir, step, cfg.train.val_resolution):
            failed.append("validation")
    if cfg.train.turntable_frames > 0:
        if not attempt("turntable video", write_turntable, scene, run_dir / "turntable.mp4", cfg.train.turntable_frames,
                       cfg.train.val_resolution, cfg.train.turntable_fps,
                       hint=f"make it later with `carv3d render {run_dir}`"):
            failed.append("turntable")
    if cfg.export.at_end:
        if not attempt("mesh", export_scene, scene, run_dir / "mesh", cfg.export, True,
                       hint=f"make it later with `carv3d export {run_dir}`"):
            failed.append("mesh")
    logger.info("outputs in %s", run_dir)
    return failed
