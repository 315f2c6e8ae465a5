"""Checkpoints: plain data (tensors, numbers, strings), written atomically, read with
``torch.load(weights_only=True)`` so a checkpoint from someone else cannot execute code.

``checkpoints/LATEST`` holds the file name of the newest checkpoint, ``step_NNNNNNN.pt``, and nothing
else: it is never followed as a path, so an edited or malicious LATEST cannot make a run load (or
export) another run's weights. A full disk while saving is a :class:`~carv3d.errors.DiskFullError`
that leaves the previous checkpoint and LATEST as they were.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from carv3d.errors import CheckpointError, DiskFullError
from carv3d.io import atomic_path, atomic_write_text, reporting_full_disk, temporaries_of

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "LATEST"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{7,})\.pt$")  # 7 digits, more past step 9,999,999


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` for ``step`` atomically, point LATEST at it, keep the newest ``keep`` files.

    Raises:
        DiskFullError: the disk filled up; the new checkpoint's temporary file is removed, and the
            previous checkpoint and LATEST are untouched (the message says so and how to resume).
    """
    path = checkpoint_path(run_dir, step)
    latest = run_dir / CHECKPOINT_DIR / LATEST_FILE
    previous = _latest_name(run_dir)
    consequence = _nothing_lost(run_dir, previous)
    payload = {"format_version": FORMAT_VERSION, "step": step, **state}
    with reporting_full_disk(path, consequence):
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    try:
        with reporting_full_disk(latest, consequence):
            atomic_write_text(latest, path.name + "\n")
    except DiskFullError:
        if path.name != previous:  # LATEST does not name it: unreachable, and it takes the space needed
            path.unlink(missing_ok=True)
        raise
    existing = sorted((p for p in path.parent.iterdir() if _NAME.fullmatch(p.name)), key=_step_of)
    for old in existing[:-keep]:
        old.unlink()
    return path


def _step_of(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))  # type: ignore[union-attr]


def _nothing_lost(run_dir: Path, previous: str | None) -> str:
    kept = (f"the previous checkpoint ({run_dir / CHECKPOINT_DIR / previous}) and {LATEST_FILE} are intact"
            if previous else "the run had no checkpoint yet, and no partial one was left behind")
    return (f"Nothing is lost: {kept}. Free some space, then continue the run with "
            f"`carv3d train --resume {run_dir}`.")


def _latest_name(run_dir: Path) -> str | None:
    """What LATEST names when that is a valid checkpoint name, else None (for messages only)."""
    try:
        name = (run_dir / CHECKPOINT_DIR / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if _NAME.fullmatch(name) else None


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint LATEST names; a clear error when there is none or LATEST is not a checkpoint name.

    LATEST must hold exactly ``step_NNNNNNN.pt``: a file name inside this run's ``checkpoints/``.
    Anything else (a path, ``..``, a symlink that leads out of the folder) is refused rather than
    followed, so a run never silently loads another run's weights.
    """
    ckpt_dir = run_dir / CHECKPOINT_DIR
    latest = ckpt_dir / LATEST_FILE
    if not latest.is_file():
        raise CheckpointError(
            f"run '{run_dir}' has no checkpoint yet ({latest} is missing); it cannot be resumed or exported. "
            "Start a new run with `carv3d train`."
        )
    try:
        name = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{latest} cannot be read ({type(err).__name__}); the run directory is damaged. "
                              f"{_repair_hint(ckpt_dir)}") from None
    if not _NAME.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise CheckpointError(
            f"{latest} names {shown!r}, which is not a checkpoint of this run: it must hold only a file name "
            f"step_NNNNNNN.pt inside {ckpt_dir}. {_repair_hint(ckpt_dir)}"
        )
    path = ckpt_dir / name
    if not path.is_file():
        raise CheckpointError(f"{latest} names '{name}', which does not exist. The run directory is damaged. "
                              f"{_repair_hint(ckpt_dir)}")
    if path.resolve().parent != ckpt_dir.resolve():
        raise CheckpointError(f"{path} is a link to {path.resolve()}, outside this run's {CHECKPOINT_DIR}/; "
                              f"refusing to load another run's weights. {_repair_hint(ckpt_dir)}")
    return path


def _repair_hint(ckpt_dir: Path) -> str:
    files = sorted((p for p in ckpt_dir.iterdir() if _NAME.fullmatch(p.name)), key=_step_of) if ckpt_dir.is_dir() else []
    if files:
        return f"Write the name of one of its own checkpoints (e.g. {files[-1].name}) into {ckpt_dir / LATEST_FILE}."
    return "It has no checkpoint files; start a new run with `carv3d train`."


# The temporaries atomic_path leaves when a process dies mid-write: .step_0000012.tmp-ab12cd.pt, .LATEST.tmp-x1
_TEMPORARY_STEMS = (r"step_\d{7,}", re.escape(LATEST_FILE))


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary files a killed checkpoint write left in ``run_dir/checkpoints``.

    Only call this while holding the run's lock (:func:`carv3d.run_dir.run_lock` does, right after
    taking it): a live writer's temporary looks the same. Returns the files removed.
    """
    removed = []
    for tmp in temporaries_of(run_dir / CHECKPOINT_DIR, _TEMPORARY_STEMS):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint as data only; a truncated or foreign file is a CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip errors, EOF, unpickling refusals: all mean "not a good checkpoint"
        first = (str(err).strip().splitlines() or [""])[0]
        # Weights-only loading names the object it refused ("... GLOBAL posix.system ..."); other refusals
        # ("Unsupported operand") are bytes that are no pickle at all.
        if isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err):
            raise CheckpointError(
                f"checkpoint '{path}' holds Python objects other than tensors, numbers and strings; carv3d refuses "
                "to load it, since unpickling such objects can run code (a carv3d checkpoint never holds any). Use "
                f"a checkpoint written by carv3d: point {LATEST_FILE} at another step_*.pt, or start a new run."
            ) from None
        if isinstance(err, pickle.UnpicklingError):  # torch's text would suggest weights_only=False: never here
            first = "its data is not a valid pickle of tensors"
        if len(first) > 200:  # torch's reasons run long; cut at a word, and say that it was cut
            first = first[:200].rsplit(" ", 1)[0].rstrip(",;:") + " …"
        detail = f"{type(err).__name__}: {first}" if first else type(err).__name__
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a carv3d checkpoint ({detail}). Delete it and point "
            f"{LATEST_FILE} at an older step_*.pt, or start a new run."
        ) from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' is not a carv3d checkpoint (format version {FORMAT_VERSION} expected).")
    return state


def generator_state(generator: torch.Generator) -> torch.Tensor:
    return generator.get_state().clone()


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    generator.set_state(state.cpu())  # CUDA generators take their state as a CPU ByteTensor too
