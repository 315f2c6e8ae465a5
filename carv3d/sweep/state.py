"""What a sweep remembers between invocations, and what a (re-)run will do with each run.

The sweep directory::

    <output_dir>/<name>/
      sweep.yaml           the sweep file as last run
      sweep_state.json     per run: its axes, status, error message and seconds of the last attempt
      sweep.lock           held (flock) while a sweep runs here; names its pid and host
      runs/<run name>/     ordinary carv3d run directories (``carv3d export`` etc. work on them)
      logs/<run name>.log  each run's log (worker processes and Ray tasks)
      abandoned/           run directories that crashed before their first checkpoint
      summary.csv, summary.md, summary_<axis>.png

Re-running a sweep decides per run (:func:`plan_runs`), from the run directory alone:

======================================  ===========================================================
run directory                           action
======================================  ===========================================================
missing                                 ``train``
run.json ``finished`` at ≥ train.steps  ``skip``
run.json ``diverged``                   ``skip`` (deterministic; delete the directory to retry)
no checkpoint yet                       ``restart``: moved to abandoned/, trained anew
anything else                           ``resume`` from the latest checkpoint (to the new
                                        train.steps when the sweep file raised it)
======================================  ===========================================================

A run directory whose config differs from the sweep's (other than train.steps) stops the sweep
before anything runs: the sweep file changed under existing results.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from carv3d.checkpoint import CHECKPOINT_DIR, LATEST_FILE
from carv3d.io import FileLock, LockHeld, atomic_write_text
from carv3d.run_dir import CONFIG_FILE, load_run_config, read_status
from carv3d.sizing import explicit_keys, sized_for_cpu
from carv3d.sweep.spec import RunSpec, SweepError, SweepSpec

STATE_FILE = "sweep_state.json"
LOCK_FILE = "sweep.lock"
# Keys that may differ between a run directory and the sweep without making it another run.
VOLATILE_KEYS = ("train.steps", "train.progress", "train.output_dir", "train.run_name")


@dataclass
class RunResult:
    """The outcome of one attempt at a run (or of skipping it).

    ``status`` is the run's status after the attempt: ``finished``, ``failed`` (an exception; no
    usable run, ``error`` says why), ``diverged``, ``interrupted`` or ``skipped`` (already done).
    ``seconds`` is the attempt's wall clock as the sweep measured it.
    """

    name: str
    status: str
    error: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        return cls(**{k: data[k] for k in ("name", "status", "error", "seconds") if k in data})


@dataclass(frozen=True)
class PlannedRun:
    """What the sweep will do with one run: ``train``, ``resume``, ``restart`` or ``skip``."""

    run: RunSpec
    action: str
    reason: str
    resume_overrides: tuple[str, ...] = ()


def _flat(cfg: DictConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def config_differences(stored: DictConfig, wanted: DictConfig) -> list[str]:
    """``["train.seed: 0 → 1", ...]``: keys whose values differ, ignoring :data:`VOLATILE_KEYS`
    and the keys the run sized for a CPU (:mod:`carv3d.sizing`) that the sweep does not set."""
    a, b = _flat(stored), _flat(wanted)
    explicit = explicit_keys(wanted)  # None: a config without a record, nothing sized
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in VOLATILE_KEYS and a.get(k) != b.get(k)
            and not (explicit is not None and k not in explicit and sized_for_cpu(k, a.get(k)))]


def plan_runs(spec: SweepSpec) -> list[PlannedRun]:
    """Decide each run's action from its run directory (see the table in the module doc).

    Raises:
        SweepError: a run directory that is not a carv3d run, or whose config differs from the
            sweep's; nothing has run yet when this is raised.
    """
    planned: list[PlannedRun] = []
    conflicts: list[str] = []
    for run in spec.runs:
        run_dir = spec.run_dir(run)
        wanted = spec.configs[run.name]
        if not run_dir.exists():
            planned.append(PlannedRun(run, "train", "new"))
            continue
        if not (run_dir / CONFIG_FILE).is_file():
            raise SweepError(f"'{run_dir}' is in the sweep's runs/ folder but is not a carv3d run (no {CONFIG_FILE}); "
                             "move it away and re-run the sweep.")
        differences = config_differences(load_run_config(run_dir), wanted)
        if differences:
            conflicts.append(f"{run.name}: {'; '.join(differences[:3])}{' ...' if len(differences) > 3 else ''}")
            continue
        status = read_status(run_dir)
        target = int(wanted.train.steps)
        state, step = status.get("status", ""), int(status.get("step", 0))
        if state == "finished" and step >= target:
            planned.append(PlannedRun(run, "skip", "finished"))
        elif state == "diverged":
            planned.append(PlannedRun(run, "skip", "diverged; delete its run directory to retry"))
        elif not (run_dir / CHECKPOINT_DIR / LATEST_FILE).is_file():
            planned.append(PlannedRun(run, "restart", f"{state or 'no status'} without a checkpoint"))
        else:
            planned.append(PlannedRun(run, "resume", f"{state or 'no status'} at step {step}",
                                      (f"train.steps={target}",)))
    if conflicts:
        listing = "\n  ".join(conflicts[:5]) + ("\n  ..." if len(conflicts) > 5 else "")
        raise SweepError(f"{len(conflicts)} existing run(s) in {spec.runs_dir} were made with another config than "
                         f"the sweep file now gives them:\n  {listing}\nGive the sweep a new 'name:' to keep both, "
                         "or delete those run directories.")
    return planned


def abandon(run_dir: Path, sweep_dir: Path) -> Path:
    """Move a run directory that cannot be resumed to ``abandoned/`` (never delete results)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = sweep_dir / "abandoned" / f"{run_dir.name}-{stamp}"
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(target)
    return target


# ---------------------------------------------------------------------------------------- state file
def read_state(sweep_dir: Path) -> dict[str, RunResult]:
    path = sweep_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text()).get("runs", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {name: RunResult.from_dict({"name": name, **record}) for name, record in runs.items()}


def write_state(spec: SweepSpec, results: dict[str, RunResult]) -> None:
    """Write ``sweep_state.json`` atomically: the sweep's runs, their axes and last results."""
    runs = {}
    for run in spec.runs:
        record: dict[str, Any] = {"axes": run.axes, "run_dir": f"runs/{run.name}"}
        if run.name in results:
            record.update({k: v for k, v in results[run.name].to_dict().items() if k != "name"})
        else:
            record["status"] = "pending"
        runs[run.name] = record
    payload = {"name": spec.name, "sweep_file": str(spec.file),
               "updated": _dt.datetime.now().isoformat(timespec="seconds"), "runs": runs}
    atomic_write_text(spec.directory / STATE_FILE, json.dumps(payload, indent=2, default=str))


# ---------------------------------------------------------------------------------------- lock
@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Hold ``sweep.lock`` so that two sweeps never run the same runs at once.

    The same flock-based lock as a run directory's (:class:`carv3d.io.FileLock`): it ends with its
    process, however that process ends, so a killed sweep never leaves a lock to delete by hand.
    """
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK_FILE
    lock = FileLock(path)
    try:
        lock.acquire()
    except LockHeld as held:
        raise SweepError(f"another sweep (pid {held.holder.get('pid', '?')} on {held.holder.get('host', '?')}) is "
                         f"running in {sweep_dir}; wait for it to finish, or stop it, and run this sweep again.") from None
    try:
        yield
    finally:
        lock.release()
