"""One run of a sweep as a self-contained job: what every backend executes.

A :class:`RunJob` is plain data (JSON-able) so that it can travel to a worker process or a Ray
task on another machine: the run's resolved config as YAML text, the run directory and the action.
:func:`execute_job` runs it and never raises for a failed run — a failure is a
:class:`~carv3d.sweep.state.RunResult` with ``status="failed"`` and the error message, so the sweep
goes on. Only Ctrl-C propagates.

For workers that do not share the sweep directory's filesystem (a Ray cluster without a shared
disk), :func:`pack_dir` and :func:`unpack_dir` move a run directory as a ``.tar.gz`` in memory.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from carv3d.errors import TrainingDivergedError, UserError
from carv3d.log import logger
from carv3d.sweep.state import RunResult


@dataclass
class RunJob:
    """Everything a worker needs to run one run.

    Attributes:
        name: the run name (the run directory's name).
        action: ``train`` (a new run directory) or ``resume`` (continue ``run_dir``).
        config_yaml: the resolved config (for ``train``); ``train.output_dir`` is the runs folder.
        run_dir: absolute path of the run directory.
        resume_overrides: ``key=value`` overrides for ``resume`` (e.g. a raised ``train.steps``).
        log_path: append the run's log here (None: log only to the process's handlers).
        explicit_keys: the keys the sweep's layers set (its base file, overrides, axes); the
            worker sizes the others for its device (:mod:`carv3d.sizing`). None: all are set.
    """

    name: str
    action: str
    config_yaml: str
    run_dir: str
    resume_overrides: list[str] = field(default_factory=list)
    log_path: Optional[str] = None
    explicit_keys: Optional[list[str]] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunJob":
        return cls(**data)


def config_from_yaml(text: str, output_dir: Optional[str] = None, explicit: Optional[list[str]] = None):
    """Rebuild a resolved config from its YAML text (validated against this machine's schema).

    ``explicit``: the keys its user set (:attr:`RunJob.explicit_keys`); None counts every key as set.
    """
    from omegaconf import OmegaConf

    from carv3d.config import load_config
    from carv3d.sizing import restore_explicit

    layer = OmegaConf.create(text)
    if output_dir is not None:
        layer.train.output_dir = output_dir
    # As data: load_config picks each seam's schema from its `type` (a Gaussian scene's keys are
    # not the NeRF's), then validates every key against it.
    cfg = load_config(base=layer)
    if explicit is not None:
        restore_explicit(cfg, explicit)
    return cfg


def execute_job(job: RunJob, output_dir: Optional[str] = None) -> RunResult:
    """Train or resume one run; return its outcome instead of raising.

    Args:
        job: the run.
        output_dir: run into this folder instead of ``job.run_dir``'s parent (a worker without the
            sweep's filesystem trains into a temporary folder and ships the run back).
    """
    from carv3d.run_dir import read_status
    from carv3d.train import resume, train

    run_dir = Path(output_dir) / job.name if output_dir else Path(job.run_dir)
    handler: Optional[logging.Handler] = None
    if job.log_path:
        Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(job.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s [carv3d] %(message)s"))
        logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    started = time.perf_counter()
    environment = dict(os.environ)
    logger.info("sweep run %s: %s", job.name, job.action)
    try:
        if job.action == "resume":
            resume(run_dir, job.resume_overrides)
        elif job.action == "train":
            train(config_from_yaml(job.config_yaml, output_dir, job.explicit_keys))
        else:
            raise ValueError(f"unknown job action {job.action!r}")
        status, error = read_status(run_dir).get("status", "finished"), ""
    except TrainingDivergedError as err:
        status, error = "diverged", str(err)
        _log_failure(handler, f"sweep run {job.name} diverged: {err}")
    except UserError as err:
        status, error = "failed", str(err)
        _log_failure(handler, f"sweep run {job.name} failed: {err}")
    except Exception as err:  # a bug in one run must not stop the sweep; the log keeps the traceback
        status, error = "failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if job.log_path:
            error += f" (traceback in {job.log_path})"
        _log_failure(handler, f"sweep run {job.name} failed:\n{traceback.format_exc()}")
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        as_a_fresh_process(environment)
    return RunResult(job.name, status, error, time.perf_counter() - started)


def as_a_fresh_process(environment: dict[str, str]) -> None:
    """Leave this process for the next run as a new one would be: the environment as before the run
    (a run sets e.g. ``TORCHINDUCTOR_CACHE_DIR`` from its own ``teacher.compile_cache``), no
    compiled graphs held (torch.compile keeps at most a few variants of a function per process and
    runs the rest uncompiled, silently; kernels still come from the on-disk cache), the run's
    objects collected and CUDA's cached blocks released."""
    os.environ.clear()
    os.environ.update(environment)
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _log_failure(handler: Optional[logging.Handler], message: str) -> None:
    """A failure goes to the run's log file only; the sweep reports it on the terminal once.

    Without a log file of its own (a worker process, whose stderr is the log file) it goes to the
    carv3d logger."""
    if handler is None:
        logger.error(message)
    else:
        handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None))


# ---------------------------------------------------------------------------------------- moving runs
def pack_dir(directory: Path) -> bytes:
    """A directory as ``.tar.gz`` bytes, its entries relative to the directory itself."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return buffer.getvalue()


def unpack_dir(data: bytes, directory: Path) -> Path:
    """Replace ``directory`` with the contents of :func:`pack_dir` bytes, atomically on one disk.

    The archive is extracted next to ``directory`` first; the old directory is removed only after
    the new one is complete. Entries that would escape the directory are refused (tar's ``data``
    filter).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.incoming-", dir=directory.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            tar.extractall(staging, filter="data")
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{time.time_ns()}")
            directory.rename(old)
        staging.rename(directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory
