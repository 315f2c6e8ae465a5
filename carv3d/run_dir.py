"""Run directories: where a training run keeps its config, checkpoints and outputs.

Layout::

    RUN_DIR/
      config.yaml        the resolved config (the single source of truth for --resume)
      run.json           status (running | finished | interrupted | diverged), step, wall clock, backends
      metrics.jsonl      one JSON object per logged step
      checkpoints/       step_XXXXXXX.pt (data only: loaded with weights_only=True) and LATEST
      validation/        validation image sheets and proposal plots
      tensorboard/       TensorBoard event files
      turntable.mp4      the final turntable video
      mesh/              mesh.glb, mesh.ply, mesh.obj

A new run never reuses an existing directory.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carv3d.config import load_config, to_yaml
from carv3d.errors import OutputPathError, RunDirError
from carv3d.io import atomic_write_text, make_writable_folder

CONFIG_FILE = "config.yaml"
STATUS_FILE = "run.json"


def slugify(text: str, max_length: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_length].rstrip("_") or "run"


def create_run_dir(cfg: DictConfig) -> Path:
    """Make a fresh run directory under ``train.output_dir``; refuse to reuse an existing one."""
    parent = Path(cfg.train.output_dir).expanduser()
    name = cfg.train.run_name or f"{slugify(cfg.prompt)}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_dir = parent / name
    if run_dir.exists():
        raise RunDirError(
            f"run directory '{run_dir}' already exists; carv3d never overwrites a run. "
            f"Continue it with `carv3d train --resume {run_dir}`, or choose another train.run_name."
        )
    try:
        run_dir.mkdir(parents=True)  # not exist_ok: a run directory is never reused
        make_writable_folder(run_dir)
    except OSError as err:
        raise OutputPathError(
            f"cannot create the run directory '{run_dir}' ({err.strerror}). "
            f"Set train.output_dir to a writable folder."
        ) from None
    atomic_write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
    return run_dir


def require_run_dir(path: str | Path) -> Path:
    """Check that ``path`` is a carv3d run directory and return it."""
    run_dir = Path(path).expanduser()
    if not run_dir.is_dir():
        raise RunDirError(f"'{run_dir}' does not exist or is not a directory; pass a run directory made by `carv3d train`.")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"'{run_dir}' is not a carv3d run: it has no {CONFIG_FILE}. Pass a directory made by `carv3d train`.")
    return run_dir


def load_run_config(run_dir: Path, overrides: tuple[str, ...] | list[str] = ()) -> DictConfig:
    """The run's resolved config, validated against today's schema, with optional overrides."""
    base = load_config(config_file=run_dir / CONFIG_FILE)
    return load_config(overrides=list(overrides), base=base) if overrides else base


def write_status(run_dir: Path, **fields: Any) -> None:
    status = read_status(run_dir)
    status.update(fields)
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(status, indent=2, sort_keys=True))


def read_status(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def config_as_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
