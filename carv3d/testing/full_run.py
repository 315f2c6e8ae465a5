"""A complete ``carv3d train`` run as a user starts it, timed from outside (``bench_speed --full-run-steps``).

The run is the console script's entry point (``carv3d.cli:entry``) in a fresh Python process, so
imports, the teacher load, compiling, CUDA-graph capture, training, validation sheets, checkpoints,
the turntable and the mesh export are all on the clock. The only addition is an exit hook that
writes ``torch.cuda.max_memory_allocated`` to a file (the run itself does not report peak memory).

Phases come from what the run leaves behind, each timed against the process start:

- its log lines, stamped as they arrive (``run directory`` ends the start-up before the first step;
  ``export: sampling the density`` starts the mesh export; ``outputs in`` ends the outputs);
- its files' modification times (the last checkpoint ends training and the final save; the last
  validation sheet and ``turntable.mp4`` follow);
- ``run.json``'s training clock (time inside steps only) and ``metrics.jsonl`` (the training clock at
  every logged step, K over the run, the section means).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from carv3d.estimator.timing import MIN_STEPS_FOR_OUTLIERS, OUTLIER_FACTOR

# The console script's entry, plus an exit hook for the allocator's peak (a no-op without CUDA).
CLI_WITH_PEAK = r"""
import atexit, os, sys
def _peak():
    path = os.environ.get("CARV3D_PEAK_FILE")
    torch = sys.modules.get("torch")
    if not path or torch is None:
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            with open(path, "w") as handle:
                handle.write("%d %d" % (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
    except Exception:
        pass
atexit.register(_peak)
sys.argv = ["carv3d"] + sys.argv[1:]
from carv3d.cli import entry
entry()
"""

MARKERS = {  # log line → phase mark (first match wins)
    "run_directory": re.compile(r"\[carv3d\] run directory (\S+)"),
    "export_start": re.compile(r"\[carv3d\] export: sampling the density"),
    "outputs_done": re.compile(r"\[carv3d\] outputs in "),
}


def run_cli(args: Sequence[str], timeout_s: float, log_path: Path, env: Optional[dict[str, str]] = None,
            cwd: Optional[Path] = None) -> dict[str, Any]:
    """Run ``carv3d ARGS`` in a new process; every output line is stamped with seconds since the start.

    Returns ``exit`` (None when killed at ``timeout_s``), ``timed_out``, ``wall_s``, ``lines``
    ([seconds, text]), ``start_epoch`` (time.time() at the start), ``peak_gpu_bytes`` /
    ``peak_gpu_reserved_bytes`` (None without CUDA). The log also goes to ``log_path``.
    """
    env = dict(os.environ if env is None else env)
    peak_file = log_path.with_suffix(".peak")
    peak_file.unlink(missing_ok=True)
    env["CARV3D_PEAK_FILE"] = str(peak_file)
    env.setdefault("PYTHONUNBUFFERED", "1")
    lines: list[list[Any]] = []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start_epoch = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_PEAK, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, env=env,
                            cwd=str(cwd) if cwd else None)  # our process group: stopping ours stops it too

    def read() -> None:
        with log_path.open("w") as handle:
            for line in proc.stdout:  # type: ignore[union-attr]
                stamp = time.perf_counter() - started
                lines.append([round(stamp, 3), line.rstrip("\n")])
                handle.write(f"{stamp:9.3f} {line}")
                handle.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        code: Optional[int] = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:  # SIGTERM first: the run saves a checkpoint and writes its outputs; SIGKILL after 20 s
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        code = None
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    peak = reserved = None
    if peak_file.is_file():
        try:
            peak, reserved = (int(v) for v in peak_file.read_text().split())
        except ValueError:
            pass
    return {"exit": code, "timed_out": timed_out, "wall_s": wall, "lines": lines, "start_epoch": start_epoch,
            "peak_gpu_bytes": peak, "peak_gpu_reserved_bytes": reserved}


def _mark(lines: list[list[Any]], name: str) -> Optional[float]:
    for stamp, text in lines:
        if MARKERS[name].search(text):
            return float(stamp)
    return None


def run_directory(lines: list[list[Any]]) -> Optional[Path]:
    for _, text in lines:
        match = MARKERS["run_directory"].search(text)
        if match:
            return Path(match.group(1))
    return None


def _mtime(path: Path, start_epoch: float) -> Optional[float]:
    return path.stat().st_mtime - start_epoch if path.is_file() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return rows


def phases(result: dict[str, Any]) -> dict[str, Any]:
    """The run's phases (seconds since the process started) from ``run_cli``'s result.

    ``startup_s`` (to the run directory: imports, teacher load, scene, optimiser), ``first_step_s``
    (an estimate: the training clock at the first logged step minus the steps before it at the
    steady rate), ``time_to_first_step_s``, ``training_clock_s`` (run.json: time inside steps),
    ``steps_per_s`` (steps / training clock) and ``steps_per_s_steady`` (between the first and the
    last logged step: the first step's compile and capture left out; K changes of auto-K and their
    CUDA-graph captures kept in), ``steps_per_s_settled`` and ``one_off_s`` (those one-off events
    split off: :func:`one_off_split`), ``training_end_s`` (the last checkpoint written), ``outputs_s``
    (training end → ``outputs in``: final sheet, turntable, export), ``export_s``, ``exit_s``.
    """
    lines, start = result["lines"], result["start_epoch"]
    out: dict[str, Any] = {"wall_s": result["wall_s"], "exit": result["exit"], "timed_out": result["timed_out"]}
    run_dir = run_directory(lines)
    out["run_dir"] = str(run_dir) if run_dir else None
    out["startup_s"] = _mark(lines, "run_directory")
    status = {}
    rows: list[dict[str, Any]] = []
    if run_dir is not None and run_dir.is_dir():
        try:
            status = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            status = {}
        rows = read_jsonl(run_dir / "metrics.jsonl")
    out["status"] = status.get("status")
    out["steps_done"] = status.get("step", rows[-1]["step"] if rows else None)
    out["training_clock_s"] = status.get("elapsed_seconds", rows[-1].get("elapsed_seconds") if rows else None)
    out["outputs_failed"] = status.get("outputs_failed")
    out["backends"] = status.get("backends")
    if out["steps_done"] and out["training_clock_s"]:
        out["steps_per_s"] = out["steps_done"] / out["training_clock_s"]
    timed = [r for r in rows if r.get("elapsed_seconds") is not None]
    steady = None
    if len(timed) >= 2 and timed[-1]["elapsed_seconds"] > timed[0]["elapsed_seconds"]:
        steady = (timed[-1]["step"] - timed[0]["step"]) / (timed[-1]["elapsed_seconds"] - timed[0]["elapsed_seconds"])
    out["steps_per_s_steady"] = steady
    out.update(one_off_split(timed))
    if timed and steady:
        out["first_step_s"] = max(timed[0]["elapsed_seconds"] - (timed[0]["step"] - 1) / steady, 0.0)
    elif timed and timed[0]["step"] == 1:
        out["first_step_s"] = timed[0]["elapsed_seconds"]
    else:
        out["first_step_s"] = None
    if out["startup_s"] is not None and out["first_step_s"] is not None:
        out["time_to_first_step_s"] = out["startup_s"] + out["first_step_s"]
    draws = [int(r["noise_draws"]) for r in rows if r.get("noise_draws") is not None]
    out["noise_draws_logged"] = {str(k): draws.count(k) for k in sorted(set(draws))}
    out["noise_draws_path"] = _changes([(r["step"], int(r["noise_draws"])) for r in rows if r.get("noise_draws") is not None])
    sections = [k for k in (rows[-1] if rows else {}) if k.startswith("time_") and k.endswith("_ms")]
    out["split_ms_mean"] = {k[5:-3]: sum(r.get(k) or 0.0 for r in rows) / len(rows) for k in sections} if rows else {}
    if run_dir is not None:
        checkpoints = sorted((run_dir / "checkpoints").glob("*.pt")) if (run_dir / "checkpoints").is_dir() else []
        out["training_end_s"] = _mtime(checkpoints[-1], start) if checkpoints else None
        out["checkpoint_mb"] = checkpoints[-1].stat().st_size / 1e6 if checkpoints else None
        sheets = sorted((run_dir / "validation").glob("step_*.png")) if (run_dir / "validation").is_dir() else []
        out["validation_sheets"] = len(sheets)
        out["final_sheet_s"] = _mtime(sheets[-1], start) if sheets else None
        out["turntable_s"] = _mtime(run_dir / "turntable.mp4", start)
        mesh = run_dir / "mesh"
        out["mesh_files"] = sorted(p.name for p in mesh.iterdir()) if mesh.is_dir() else []
    out["export_start_s"] = _mark(lines, "export_start")
    out["outputs_done_s"] = _mark(lines, "outputs_done")
    if out.get("export_start_s") is not None and out["outputs_done_s"] is not None:
        out["export_s"] = out["outputs_done_s"] - out["export_start_s"]
    if out.get("training_end_s") is not None and out["outputs_done_s"] is not None:
        out["outputs_s"] = out["outputs_done_s"] - out["training_end_s"]
    if out.get("final_sheet_s") is not None and out.get("training_end_s") is not None \
            and out["final_sheet_s"] > out["training_end_s"]:
        out["final_sheet_after_checkpoint_s"] = out["final_sheet_s"] - out["training_end_s"]
    if out.get("startup_s") is not None and out.get("training_end_s") is not None and out["training_clock_s"]:
        # wall clock of the loop beyond its steps: logging, mid-run sheets and checkpoints, the final save
        out["loop_overhead_s"] = out["training_end_s"] - out["startup_s"] - out["training_clock_s"]
    out["log_tail"] = [text for _, text in lines[-12:]]
    return out


# An interval between logged steps whose time per step exceeds OUTLIER_FACTOR times the median
# interval's holds a one-off (a compile, a CUDA-graph capture): the estimator's rule for steady steps.
ONE_OFF_FACTOR = OUTLIER_FACTOR


def one_off_split(timed: list[dict[str, Any]]) -> dict[str, Any]:
    """The training clock between logged steps, split into settled steps and one-off events.

    Each interval between consecutive logged rows gives seconds per step. An interval over
    :data:`ONE_OFF_FACTOR` × the median interval's seconds per step held a one-off event (a compile,
    a capture): its time beyond the median rate is ``one_off_s``, counted once, and the settled rate
    ``steps_per_s_settled`` comes from the other intervals. A projection to a longer run then adds
    the one-offs once instead of spreading them over every step (``steps_per_s_steady`` does).
    Empty with fewer than three intervals (no median to speak of).
    """
    pairs = [(b["step"] - a["step"], b["elapsed_seconds"] - a["elapsed_seconds"])
             for a, b in zip(timed, timed[1:]) if b["step"] > a["step"]]
    if len(pairs) < MIN_STEPS_FOR_OUTLIERS:
        return {}
    rates = sorted(seconds / steps for steps, seconds in pairs)
    median = rates[len(rates) // 2]
    settled = [(n, t) for n, t in pairs if t / n <= ONE_OFF_FACTOR * median]
    events = [(n, t) for n, t in pairs if t / n > ONE_OFF_FACTOR * median]
    settled_steps, settled_seconds = sum(n for n, _ in settled), sum(t for _, t in settled)
    return {"steps_per_s_settled": settled_steps / settled_seconds if settled_seconds > 0 else None,
            "one_off_s": sum(t - n * median for n, t in events), "one_off_intervals": len(events)}


def _changes(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """[(step, K), ...] at each logged step → only where K changed."""
    path: list[list[int]] = []
    for step, k in pairs:
        if not path or path[-1][1] != k:
            path.append([step, k])
    return path


def projection(run: dict[str, Any], total_steps: int) -> dict[str, Any]:
    """A ``total_steps`` run projected from a shorter one (a projection, not a measurement).

    ``time_to_first_step + one_off_s + (total_steps − 1) / steps_per_s_settled
    + loop_overhead_s · E_total / E_n + outputs_s``: the one-off events (compiles, captures;
    :func:`one_off_split`) once, the other steps at the settled rate, and the loop's time outside
    its steps (mid-run validation sheets and checkpoints, ``loop_overhead_s``) scaled by the number
    of those events, ``E = sheets + checkpoints``, in the longer run against the measured one. A
    run too short to split (fewer than three logged intervals) is projected at
    ``steps_per_s_steady``, one-offs spread over its steps, and says so.
    """
    split = run.get("steps_per_s_settled") is not None and run.get("one_off_s") is not None
    rate_key = "steps_per_s_settled" if split else "steps_per_s_steady"
    needed = ("time_to_first_step_s", rate_key, "outputs_s")
    missing = [k for k in needed if run.get(k) is None]
    if missing:
        return {"total_steps": total_steps, "projected_s": None, "missing": missing}
    policy = run.get("policy", {})
    events_n = int(policy.get("validation_sheets_at_n", 0)) + int(policy.get("checkpoints_at_n", 0))
    events_total = (int(policy.get(f"validation_sheets_at_{total_steps}", 0))
                    + int(policy.get(f"checkpoints_at_{total_steps}", 0)))
    overhead = run.get("loop_overhead_s")
    loop = max(float(overhead), 0.0) * events_total / events_n if overhead is not None and events_n > 0 else 0.0
    one_off = run["one_off_s"] if split else 0.0
    value = (run["time_to_first_step_s"] + one_off + (total_steps - 1) / run[rate_key]
             + loop + run["outputs_s"])
    formula = ("time_to_first_step_s + one_off_s + (total_steps - 1) / steps_per_s_settled" if split
               else "time_to_first_step_s + (total_steps - 1) / steps_per_s_steady") \
        + " + loop_overhead_s * events_total / events_n + outputs_s"
    return {"total_steps": total_steps, "projected_s": value, "formula": formula,
            "inputs": {"time_to_first_step_s": run["time_to_first_step_s"], "one_off_s": one_off,
                       rate_key: run[rate_key], "steps_s": (total_steps - 1) / run[rate_key],
                       "loop_overhead_s": overhead, "events_n": events_n, "events_total": events_total,
                       "loop_overhead_projected_s": loop, "outputs_s": run["outputs_s"]},
            "notes": "events are validation sheets and checkpoints, each assumed to cost what the measured "
                     "run's cost on average" + ("" if overhead is not None and events_n > 0 else
                                               " (not measured here: counted as 0)")
                     + "; the one-off events (a compile, a CUDA-graph capture for each K auto-K visits) are "
                     "counted as the measured run had them: a longer run may visit further K, each with its own capture"
                     + ("" if split else "; too few logged intervals to split them off, so they are "
                                          "spread over the steps and the projection is high")}


def step_policy(cfg: Any, steps: int, total_steps: int) -> dict[str, Any]:
    """How the config's K policy and output intervals apply at ``steps`` (and at ``total_steps``)."""
    train, est = cfg.train, cfg.estimator

    def sheets(n: int) -> int:  # mid-run sheets, plus the final one when n is not on the interval
        every = int(train.val_every)
        mid = n // every if every > 0 else 0
        return mid + (0 if every > 0 and n % every == 0 else 1)

    def checkpoints(n: int) -> int:
        every = int(train.checkpoint_every)
        mid = n // every if every > 0 else 0
        return mid + (0 if every > 0 and n % every == 0 else 1)

    auto = str(est.noise_draws) == "auto"
    return {
        "noise_draws": str(est.noise_draws), "upstream_samples": int(est.upstream_samples),
        "auto_k": {"start": 4, "min": int(est.min_noise_draws), "max": int(est.max_noise_draws),
                   "every": int(est.auto_every),
                   "possible_changes_at_n": steps // int(est.auto_every) if auto else 0} if auto else None,
        "val_every": int(train.val_every), "checkpoint_every": int(train.checkpoint_every),
        "log_every": int(train.log_every), "turntable_frames": int(train.turntable_frames),
        "validation_sheets_at_n": sheets(steps), f"validation_sheets_at_{total_steps}": sheets(total_steps),
        "checkpoints_at_n": checkpoints(steps), f"checkpoints_at_{total_steps}": checkpoints(total_steps),
        "export_at_end": bool(cfg.export.at_end), "export_resolution": int(cfg.export.resolution),
    }
