"""Run directories: where a training run keeps its config, checkpoints and outputs.

Layout::

    RUN_DIR/
      config.yaml        the resolved config (the single source of truth for --resume)
      run.json           status (running | finished | interrupted | diverged), step, wall clock, backends
      run.lock           present while a process trains in the directory (see run_lock)
      metrics.jsonl      one JSON object per logged step
      checkpoints/       step_XXXXXXX.pt (data only: loaded with weights_only=True) and LATEST
      validation/        validation image sheets and proposal plots
      tensorboard/       TensorBoard event files
      turntable.mp4      the final turntable video
      mesh/              mesh.glb, mesh.ply, mesh.obj

A new run never reuses an existing directory, and its name (``train.run_name``) is a plain directory
name (:func:`check_plain_name`), so that a config file from someone else cannot write outside
``train.output_dir``. Sweeps name their runs and their own folder with the same check.

Only one process trains in a run directory at a time: the training loop holds :func:`run_lock`
from the moment it reads the latest checkpoint until it has written its last file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from carv3d.checkpoint import remove_stale_temporaries
from carv3d.config import load_config, to_yaml
from carv3d.errors import ConfigError, OutputPathError, RunDirError, RunLockedError
from carv3d.io import (FileLock, LockHeld, atomic_write_text, make_writable_folder, reporting_full_disk,
                       temporaries_of)

CONFIG_FILE = "config.yaml"
STATUS_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"  # written by carv3d.outputs.MetricsWriter, rewritten on resume
LOCK_FILE = "run.lock"
# A plain directory name: starts with a letter or digit (so never "." or ".." or hidden), then
# letters, digits, '.', '_', '-'. No separators, no spaces, nothing a shell or another OS mangles.
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME_LENGTH = 200  # file systems allow 255 bytes; leave room for suffixes such as "-20260101-120000"


def check_plain_name(name: str, what: str = "train.run_name") -> str:
    """Return ``name`` if it is a plain directory name, else raise :class:`ConfigError` saying why.

    Used for ``train.run_name`` and for a sweep's name: a name with a separator, ``..`` or an
    absolute path would put the run outside its output folder (``../../x``, ``/some/where``).
    """
    text = str(name)
    if not text.strip():
        problem = "is empty"
    elif "/" in text or "\\" in text:
        problem = "contains a path separator"
    elif text.startswith("."):
        problem = "starts with '.' (a hidden folder, or '..' which leaves the output folder)"
    elif len(text) > MAX_NAME_LENGTH:
        problem = f"is longer than {MAX_NAME_LENGTH} characters"
    elif not PLAIN_NAME.fullmatch(text):
        problem = "has characters other than letters, digits, '.', '_' and '-'"
    else:
        return text
    shown = text if len(text) <= 60 else text[:57] + "..."
    raise ConfigError(f"{what} {shown!r} {problem}; it must be a plain directory name such as 'red-cube-seed0' "
                      f"(letters, digits, '.', '_', '-'). To write somewhere else, set train.output_dir.")


def slugify(text: str, max_length: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:max_length].rstrip("_") or "run"


def _cannot_create(run_dir: Path, err: OSError) -> OutputPathError:
    return OutputPathError(f"cannot create the run directory '{run_dir}' ({err.strerror}). "
                           f"Set train.output_dir to a writable folder.")


def create_run_dir(cfg: DictConfig) -> Path:
    """Make a fresh run directory under ``train.output_dir``; refuse to reuse an existing one.

    Without ``train.run_name`` the name is the prompt's slug and the time to the second; runs of one
    prompt started within the same second (a shell loop over seeds, two terminals) get ``-2``,
    ``-3``, ... after it instead of failing as "already exists". Each name is claimed by an atomic
    ``mkdir``, so two processes never get the same directory.
    """
    parent = Path(cfg.train.output_dir).expanduser()
    given = cfg.train.run_name
    if given != "":
        names = [check_plain_name(given)]
    else:
        stamped = f"{slugify(cfg.prompt)}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        names = [stamped] + [f"{stamped}-{i}" for i in range(2, 1000)]
    for name in names:
        run_dir = parent / name
        try:
            run_dir.mkdir(parents=True)  # not exist_ok: a run directory is never reused
        except FileExistsError:
            continue
        except OSError as err:
            raise _cannot_create(run_dir, err) from None
        break
    else:
        raise RunDirError(
            f"run directory '{run_dir}' already exists; carv3d never overwrites a run. "
            f"Continue it with `carv3d train --resume {run_dir}`, or choose another train.run_name."
        )
    try:
        make_writable_folder(run_dir)
    except OSError as err:
        raise _cannot_create(run_dir, err) from None
    with reporting_full_disk(run_dir / CONFIG_FILE, f"Nothing was trained yet. Free some space and start again; "
                             f"remove the empty run directory {run_dir} first (or choose another train.run_name)."):
        atomic_write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
    return run_dir


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/run.lock`` while training in ``run_dir``; refuse when another process holds it.

    Two processes resuming one run would both append to metrics.jsonl and overwrite each other's
    checkpoints. The training loop takes this lock before it reads the latest checkpoint and keeps
    it until its last file is written. The lock is an ``fcntl.flock`` (:class:`carv3d.io.FileLock`):
    a process killed with kill -9 releases it, so there is never a stale lock to delete by hand.

    Once the lock is held, no other carv3d process writes checkpoints here, so temporary files that
    a killed write left behind are stale and are removed
    (:func:`carv3d.checkpoint.remove_stale_temporaries`, and those of run.json / config.yaml / metrics.jsonl).

    Raises:
        RunLockedError: another process holds the lock (the message names its pid and host).
        RunDirError: the lock file cannot be created (a read-only run directory).
    """
    lock = FileLock(run_dir / LOCK_FILE)
    try:
        lock.acquire()
    except LockHeld as held:
        pid, host = held.holder.get("pid", "?"), held.holder.get("host", "this machine")
        raise RunLockedError(
            f"run {run_dir} is already being trained by process {pid} on {host}; two trainings of one run "
            f"would overwrite each other's checkpoints. Wait for it to finish or stop it (kill {pid}), then "
            f"`carv3d train --resume {run_dir}`."
        ) from None
    except OSError as err:
        raise RunDirError(f"cannot create the lock file {run_dir / LOCK_FILE} ({err.strerror or err}); "
                          f"training needs a writable run directory. Fix its permissions or copy the run elsewhere.") from None
    try:
        remove_stale_temporaries(run_dir)
        stems = (re.escape(Path(STATUS_FILE).stem), re.escape(Path(CONFIG_FILE).stem), re.escape(Path(METRICS_FILE).stem))
        for tmp in temporaries_of(run_dir, stems):
            tmp.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


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
    """Update run.json atomically (fsynced: after a crash it holds the last complete update)."""
    status = read_status(run_dir)
    status.update(fields)
    with reporting_full_disk(run_dir / STATUS_FILE, f"The checkpoints are intact. Free some space, then continue "
                             f"with `carv3d train --resume {run_dir}`."):
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
