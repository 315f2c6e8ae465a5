#!/usr/bin/env python
"""Peak resident memory of whole training runs, and where it goes, on this machine.

    python scripts/bench_memory.py --out docs/bench_memory_cpu.json
    python scripts/bench_memory.py --cases demo_train default_train --steps 5 --out mem.json
    python scripts/bench_memory.py --cli --cases demo_full --out mem_cli.json

Each case runs in a fresh subprocess. Its **whole-process peak** (imports, teacher, training and
every end-of-run output) is the child's ``ru_maxrss`` from ``os.wait4``: what ``/usr/bin/time -v``
calls "Maximum resident set size".

Where it goes: by default the child is this script in ``--probe`` mode, which runs the same code
as ``carv3d train`` (``load_config`` → ``Trainer`` → ``Trainer.run``) with the Linux high-water
mark (VmHWM) reset before each phase (``/proc/self/clear_refs`` ← 5) and read after it:

- ``load``: imports, teacher, scene, optimiser (everything before the first step);
- per step, the step's own timed sections (``render``, ``encode``, ``teacher``, ``backward``,
  ``optimizer``; the maximum over the steps) and the whole ``step``;
- ``validation_sheet``, ``turntable``, ``export`` (the end-of-run outputs).

A phase's peak is the process's resident size at its highest during the phase (so it includes what
was resident before it: the baseline is reported as ``start``). ``--cli`` runs the real
``carv3d train`` command instead (whole-process peak only). Writes JSON with the machine, torch and
the exact command of each case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

QUIET = ["train.progress=false", "train.tensorboard=false", "train.checkpoint_every=0"]
NO_OUTPUTS = ["train.val_every=0", "train.turntable_frames=0", "export.at_end=false"]

# The default config's own values of the keys CPU sizing changes (carv3d.sizing.CPU_SETTINGS), stated.
GPU_SIZES = ["estimator.upstream_samples=2", "estimator.max_noise_draws=16", "scene.grid.n_levels=16",
             "scene.grid.log2_hashmap_size=19", "scene.grid.per_level_scale=1.447269", "scene.mlp_width=64",
             "render.width=64", "render.height=64", "render.samples_per_ray=64"]

# name → (--config, --prompt, overrides); steps are added from --steps.
CASES: dict[str, tuple[Optional[str], Optional[str], list[str]]] = {
    # the demo without sheets during the run, turntable or mesh (the final sheet is always written)
    "demo_train": ("configs/demo_cpu.yaml", None, NO_OUTPUTS),
    # the demo with every output: sheets, 24-frame turntable, mesh
    "demo_full": ("configs/demo_cpu.yaml", None, []),
    # README's first command (the default config) without turntable or mesh; the final sheet stays
    "default_train": (None, "a red cube", NO_OUTPUTS),
    # README's first command as written (turntable and mesh included)
    "default_full": (None, "a red cube", []),
    # the default config with its GPU sizes stated (no CPU sizing): what the lean paths do alone
    "default_gpu_sizes_train": (None, "a red cube", NO_OUTPUTS + GPU_SIZES),
}


# ---------------------------------------------------------------------------------------------- probe
def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) if match else -1


class HighWater:
    """The process's resident high-water mark (VmHWM), resettable per phase (Linux >= 4.0).

    Resetting VmHWM also resets what ``ru_maxrss`` reports, so the whole-process peak is kept here:
    before every reset the mark is folded into the process peak and into every open phase.
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self.process_peak_kb = 0
        self._open: list[dict[str, float]] = []
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False

    def fold(self) -> None:
        mark = _status_kb("VmHWM")
        self.process_peak_kb = max(self.process_peak_kb, mark)
        for running in self._open:
            running["peak_kb"] = max(running["peak_kb"], mark)

    def reset(self) -> None:
        self.fold()
        if self.resettable:
            Path("/proc/self/clear_refs").write_text("5")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of the block as phase ``name`` (the maximum over repeated phases)."""
        start = _status_kb("VmRSS")
        self.reset()
        running = {"peak_kb": 0.0}
        self._open.append(running)
        try:
            yield
        finally:
            self.fold()
            self._open = [other for other in self._open if other is not running]
            entry = self.phases.setdefault(name, {"start_mb": start / 1024, "peak_mb": 0.0, "count": 0})
            entry["peak_mb"] = max(entry["peak_mb"], running["peak_kb"] / 1024)
            entry["count"] += 1


class MemoryTimer:
    """Wraps the step's StepTimer: each timed section is also a memory phase."""

    def __init__(self, timer: Any, water: HighWater) -> None:
        self._timer, self._water = timer, water

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with self._water.phase(name), self._timer(name):
            yield

    def __getattr__(self, name: str) -> Any:
        return getattr(self._timer, name)


def probe(config: Optional[str], prompt: Optional[str], overrides: list[str], out: Path) -> None:
    """Run one training like ``carv3d train`` with the phases measured; write them to ``out``."""
    water = HighWater()
    with water.phase("load"):
        from carv3d import outputs
        from carv3d.config import load_config
        import carv3d.export.from_scene as from_scene
        from carv3d.log import setup_logging
        from carv3d.run_dir import create_run_dir, run_lock
        from carv3d.train import Trainer

        setup_logging()
        cfg = load_config(config, overrides, prompt)
        trainer = Trainer(cfg)
    trainer.distill.timer = MemoryTimer(trainer.distill.timer, water)
    step = trainer.train_step

    def measured_step():
        with water.phase("step"):
            return step()

    trainer.train_step = measured_step

    def wrap(module: Any, name: str, phase: str) -> None:
        original = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with water.phase(phase):
                return original(*args, **kwargs)

        setattr(module, name, wrapped)

    wrap(outputs, "write_validation", "validation_sheet")
    wrap(outputs, "write_turntable", "turntable")
    wrap(from_scene, "export_scene", "export")
    trainer.run_dir = create_run_dir(cfg)
    started = time.perf_counter()
    with run_lock(trainer.run_dir):
        trainer.run()
    water.fold()
    out.write_text(json.dumps({"phases": water.phases, "resettable": water.resettable,
                               "process_peak_mb": water.process_peak_kb / 1024,
                               "run_seconds": time.perf_counter() - started,
                               "resolved": {"upstream_samples": int(cfg.estimator.upstream_samples),
                                            "max_noise_draws": int(cfg.estimator.max_noise_draws),
                                            "render": [int(cfg.render.width), int(cfg.render.samples_per_ray)],
                                            "val_resolution": int(cfg.train.val_resolution)}}))


# ---------------------------------------------------------------------------------------------- driver
def _address_space_limit(gb: Optional[float]):
    """A preexec_fn capping the child's address space (RLIMIT_AS), so a run that would need more fails
    with an allocation error instead of taking the machine; None: no cap."""
    if not gb:
        return None

    def apply() -> None:
        import resource

        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_case(name: str, steps: int, cli: bool, workdir: Path, limit_gb: Optional[float] = None) -> dict[str, Any]:
    config, prompt, extra = CASES[name]
    overrides = [f"train.steps={steps}", *QUIET, *extra, f"train.output_dir={workdir / name}"]
    args = ([f"--config={config}"] if config else []) + ([f"--prompt={prompt}"] if prompt else []) + overrides
    shown = "carv3d train " + " ".join(a if " " not in a else f'"{a}"' for a in args[:-1])  # without the tmp dir
    probe_out = workdir / f"{name}.json"
    if cli:
        cmd = [sys.executable, "-c", "from carv3d.cli import entry; entry()", "train", *args]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(probe_out), "--probe-config",
               config or "", "--probe-prompt", prompt or "", "--", *overrides]
    started = time.perf_counter()
    with open(workdir / f"{name}.log", "w") as log:
        child = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_address_space_limit(limit_gb))
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    result: dict[str, Any] = {"command": shown, "steps": steps, "exit_code": code, "seconds": round(seconds, 1),
                              "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "mode": "cli" if cli else "probe",
                              "address_space_limit_gb": limit_gb}
    log_text = (workdir / f"{name}.log").read_text()
    failed_outputs = [line.strip() for line in log_text.splitlines() if "could not write" in line]
    if failed_outputs:  # an output that failed (e.g. an allocation above the cap) is logged, not raised
        result["failed_outputs"] = failed_outputs
    if code != 0:
        result["log_tail"] = log_text[-2000:]
    if not cli and probe_out.is_file():
        data = json.loads(probe_out.read_text())
        result["phases"] = {k: {"start_mb": round(v["start_mb"], 1), "peak_mb": round(v["peak_mb"], 1),
                                "count": v["count"]} for k, v in data["phases"].items()}
        result["resolved"] = data["resolved"]
        result["phases_measured"] = data["resettable"]
        # the probe resets the high-water mark per phase, which resets ru_maxrss too: its own record
        result["peak_rss_mb"] = round(max(result["peak_rss_mb"], data["process_peak_mb"]), 1)
    print(f"{name}: peak {result['peak_rss_mb']:.0f} MB, {seconds:.0f} s, exit {code}", flush=True)
    return result


def machine() -> dict[str, Any]:
    import torch

    mem = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "mem_total_gb": round(int(mem.group(1)) / 2**20, 1) if mem else None}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="which runs to measure")
    parser.add_argument("--steps", type=int, default=20, help="training steps per case (default 20)")
    parser.add_argument("--default-steps", type=int, default=None,
                        help="training steps of the default_* cases (default: --steps)")
    parser.add_argument("--cli", action="store_true", help="run the real `carv3d train` (whole-process peak only)")
    parser.add_argument("--out", default="bench_memory.json", help="JSON file to write")
    parser.add_argument("--label", default="", help="a note stored in the JSON (e.g. before/after)")
    parser.add_argument("--limit-gb", type=float, default=None,
                        help="cap each run's address space (RLIMIT_AS) at this many GiB: a run that needs more "
                             "fails its allocation instead of exhausting the machine")
    parser.add_argument("--keep", default=None, help="keep the runs and logs in this folder (default: a temporary one)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-config", default="", help=argparse.SUPPRESS)
    parser.add_argument("--probe-prompt", default="", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(args.probe_config or None, args.probe_prompt or None, args.overrides, Path(args.probe))
        return 0

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="carv3d-mem-") as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.cases:
            steps = args.default_steps if name.startswith("default") and args.default_steps is not None else args.steps
            results[name] = run_case(name, steps, args.cli, workdir, args.limit_gb)
    report = {"label": args.label, "machine": machine(), "commit": _commit(), "cases": results,
              "method": "whole-process peak: ru_maxrss of the child (os.wait4); phases: VmHWM reset per phase"}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["exit_code"] == 0 for r in results.values()) else 1


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
