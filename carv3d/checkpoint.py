"""Checkpoints: plain data (tensors, numbers, strings), written atomically, read with
``torch.load(weights_only=True)`` so a checkpoint from someone else cannot execute code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from carv3d.errors import CheckpointError
from carv3d.io import atomic_path, atomic_write_text

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "LATEST"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{7})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` for ``step`` atomically, point LATEST at it, keep the newest ``keep`` files."""
    path = checkpoint_path(run_dir, step)
    payload = {"format_version": FORMAT_VERSION, "step": step, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_text(run_dir / CHECKPOINT_DIR / LATEST_FILE, path.name + "\n")
    existing = sorted(p for p in path.parent.iterdir() if _NAME.match(p.name))
    for old in existing[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint LATEST names; a clear error when there is none."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    latest = ckpt_dir / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(
            f"run '{run_dir}' has no checkpoint yet ({latest} is missing); it cannot be resumed or exported. "
            "Start a new run with `carv3d train`."
        )
    path = ckpt_dir / latest.read_text().strip()
    if not _NAME.match(path.name) or not path.is_file():
        raise CheckpointError(f"{latest} names '{path.name}', which does not exist. The run directory is damaged.")
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data only; a truncated or foreign file is a CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip errors, unpickling refusals, EOF: all mean "not a good checkpoint"
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a carv3d checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Delete it and point {LATEST_FILE} at an older step_*.pt, "
            "or start a new run."
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' is not a carv3d checkpoint (format version {FORMAT_VERSION} expected).")
    return state


def generator_state(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state().clone()


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    generator.set_state(state.cpu())  # CUDA generators take their state as a CPU ByteTensor too
