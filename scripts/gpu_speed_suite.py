#!/usr/bin/env python
"""The speed measurements of issues #15 and #18 in one call on one GPU, within about 8 minutes.

    python scripts/gpu_speed_suite.py --out OUT_DIR                 # one H100/H200, ≤ --budget-s (480 s)
    python scripts/gpu_speed_suite.py --out /tmp/suite --tiny       # checks the suite on a CPU (tiny models)

Each part is a subprocess of ``scripts/bench_speed.py`` with its own timeout, writing its own JSON
into OUT_DIR; ``OUT_DIR/suite.json`` (rewritten after every part) says what ran, for how long, and
why a part was cut or skipped. A part that fails or runs out of time costs only itself. Parts, in
order (SD 2.1-base shapes with random weights, built once into a work folder outside OUT_DIR):

1. ``prepare`` (prepare.json): the random-weight SD 2.1 folder, nerfacc's and gsplat's CUDA
   extensions (built on a fresh machine, loaded otherwise), side by side; their seconds.
2. ``profile`` (profile.json): ``bench_speed --profile``: the NeRF step of configs/sd21.yaml at K = 8,
   fast teacher, Triton hash grid, occupancy grid: the top-10 kernels by device time with their
   section; ``profile_markdown`` is the table for docs/BENCHMARKS.md.
3. ``nerf`` (nerf_speed.json): the NeRF step, K = 1, 8, 16, fast teacher, Triton grid, occupancy grid.
4. ``gaussians`` (gaussians_speed.json): the Gaussian step of configs/gaussians_sd21.yaml (512²,
   gsplat when installed), K = 1, 8, 16: ms/step, split, peak memory — beside the NeRF's rows.
5. ``gaussians_full_run`` (gaussians_full_run.json): ``carv3d train --config configs/gaussians_sd21.yaml``,
   1,000 steps, end to end, compile cache empty (cold: a user's first run; a 1,000-step run does not
   compile the teacher, see ``AUTO_COMPILE_MIN_STEPS``); the bar is ≤ 180 s.
6. ``nerf_full_run`` (nerf_full_run.json): ``carv3d train --config configs/sd21.yaml`` with as many
   steps as the remaining time fits (from the ``nerf`` part's K = 8 rate), with
   ``teacher.compile=full teacher.channels_last=unet`` (what the 10,000-step run it projects to resolves
   ``auto`` to) on an
   empty compile cache, and its projection to 10,000 steps.

Every part's timeout is its cap, shortened so that the parts after it keep their minimum
(``PARTS``; the NeRF full run takes what is left); a part whose time is gone is skipped and says so.
On a fresh machine ``prepare`` builds nerfacc and gsplat (up to ~2.5 min): the later parts shrink
(each bench_speed skips the configurations its time does not cover) rather than the Gaussian run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "scripts" / "bench_speed.py"
# name → (cap s, minimum s kept for it by the parts before it); on CUDA. Typical times on an H100:
# prepare 20 s warm / up to ~150 s on a fresh machine (gsplat's JIT), profile ~60 s, nerf ~70 s,
# gaussians ~70 s, the 1,000-step Gaussian run ~150–200 s cold.
PARTS: dict[str, tuple[float, float]] = {
    "prepare": (200.0, 30.0), "profile": (90.0, 40.0), "nerf": (110.0, 50.0), "gaussians": (110.0, 50.0),
    "gaussians_full_run": (230.0, 150.0), "nerf_full_run": (200.0, 60.0),
}
OPTIONAL = {"nerf_full_run"}  # takes what is left: the parts before it keep no time for it
# Time a part gets even when that leaves the later parts less than their minimum: every later part
# needs nerfacc's and gsplat's builds, so a prepare cut short only moves their cost into the first
# part that uses them (2026-12-06, --budget-s 350: prepare got 60 s, both builds were killed, the
# NeRF part then paid nerfacc's build and timed out). Fresh builds, side by side: ~70–110 s.
FLOORS: dict[str, float] = {"prepare": 120.0}
TINY_PARTS: dict[str, tuple[float, float]] = {name: (600.0, 30.0) for name in PARTS}


def log(message: str) -> None:
    print(f"[gpu_speed_suite {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from carv3d.io import write_json_report

    write_json_report(path, data)


def part_timeout(name: str, remaining: float, parts: dict[str, tuple[float, float]], selected: list[str]) -> float:
    """``name``'s cap, shortened so that every selected part after it keeps its minimum, but not
    below the part's floor (:data:`FLOORS`) while the remaining time allows it."""
    later = [p for p in selected[selected.index(name) + 1:] if p not in OPTIONAL]
    timeout = min(parts[name][0], remaining - sum(parts[p][1] for p in later))
    return max(timeout, min(FLOORS.get(name, 0.0), parts[name][0], remaining))


def run(argv: list[str], timeout: float, log_path: Path) -> dict[str, Any]:
    """A subprocess (its own process group: a timeout also stops the `carv3d train` it started)."""
    started = time.perf_counter()
    with log_path.open("w") as handle:
        proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                start_new_session=True)
        timed_out = False
        try:
            code: Optional[int] = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = None
    tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
    return {"exit": code, "timed_out": timed_out, "seconds": round(time.perf_counter() - started, 1),
            "timeout_s": round(timeout, 1), "log": str(log_path), "log_tail": tail}


PREPARE = r"""
import json, sys, time
from pathlib import Path
what, target, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
started = time.perf_counter()
out = {"what": what}
try:
    if what == "models":
        folder = target / ("tiny" if device == "cpu" else "sd21")
        if (folder / "unet").is_dir():
            out["reused"] = True
        elif device == "cpu":
            from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion
            build_tiny_stable_diffusion(folder, seed=0)
        else:
            from carv3d.testing.random_sd import build_random_stable_diffusion
            build_random_stable_diffusion(folder, scale="sd21", seed=0, device=device)
        out["folder"] = str(folder)
    elif what == "nerfacc":
        from carv3d.devices import warm_up_nerfacc
        out["warm_up_s"] = warm_up_nerfacc()
    elif what == "gsplat":
        from carv3d.devices import warm_up_gsplat
        from carv3d.scene.gaussians_gsplat import gsplat_installed
        out["installed"] = gsplat_installed()
        out["warm_up_s"] = warm_up_gsplat() if out["installed"] else None
    out["status"] = "ok"
except Exception as err:
    out["status"] = "error"
    out["reason"] = (type(err).__name__ + ": " + str(err))[:1000]
out["seconds"] = time.perf_counter() - started
print("PREPARE " + json.dumps(out))
"""


def prepare(args: argparse.Namespace, timeout: float, logs: Path) -> dict[str, Any]:
    """Models, nerfacc and gsplat side by side (three processes), each recorded."""
    whats = ["models"] + ([] if args.tiny else ["nerfacc", "gsplat"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]]
                                                                          if os.environ.get("PYTHONPATH") else [])))
    procs = {}
    started = time.perf_counter()
    for what in whats:
        handle = (logs / f"prepare_{what}.log").open("w")
        procs[what] = (subprocess.Popen([sys.executable, "-c", PREPARE, what, str(args.work / "models"), args.device],
                                        stdout=handle, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT), env=env,
                                        start_new_session=True), handle)
    result: dict[str, Any] = {}
    for what, (proc, handle) in procs.items():
        try:
            proc.wait(timeout=max(timeout - (time.perf_counter() - started), 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        handle.close()
        lines = (logs / f"prepare_{what}.log").read_text(errors="replace").splitlines()
        found = [json.loads(line[8:]) for line in lines if line.startswith("PREPARE ")]
        result[what] = found[-1] if found else {"status": "timed out" if proc.returncode is None or proc.returncode < 0
                                                 else f"exit {proc.returncode}", "log_tail": lines[-8:]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def bench_argv(args: argparse.Namespace, out: Path, *extra: str) -> list[str]:
    base = [sys.executable, str(BENCH), "--out", str(out), "--model-dir", str(args.work / "models")]
    if args.tiny:
        base += ["--tiny", "--device", "cpu"]
    return base + list(extra)


def nerf_full_run_steps(args: argparse.Namespace, timeout: float, out_dir: Path) -> tuple[Optional[int], str]:
    """As many steps as fit ``timeout``: (timeout − start-up − outputs − margin) × the K = 8 rate × 0.8."""
    if args.tiny:
        return 3, "tiny: a fixed 3 steps"
    rate, startup, outputs = 8.0, 90.0, 60.0  # defaults: the 2026-12 H100 numbers, rounded to the safe side
    try:
        rows = json.loads((out_dir / "nerf_speed.json").read_text())["results"]
        k8 = [r for r in rows if r.get("status") == "ok" and r.get("noise_draws") == 8]
        if k8:
            rate = 0.8 * k8[0]["it_per_s"]  # auto-K visits K up to 16
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    try:
        run = json.loads((out_dir / "gaussians_full_run.json").read_text())["full_run"]["runs"][0]
        startup = max(run.get("time_to_first_step_s") or startup, startup)  # + the NeRF run's compile
    except (OSError, json.JSONDecodeError, KeyError, IndexError):
        pass
    steps = int((timeout - 40.0 - startup - outputs) * rate) // 10 * 10
    how = f"({timeout:.0f} s − 40 − start-up {startup:.0f} − outputs {outputs:.0f}) × {rate:.2f} steps/s"
    return (min(steps, 10000), how) if steps >= 50 else (None, f"too little time: {how} < 50 steps")


def part_command(name: str, args: argparse.Namespace, timeout: float, out_dir: Path) -> tuple[Optional[list[str]], str]:
    """The part's bench_speed command (None and why when it cannot run)."""
    out = out_dir / {"profile": "profile.json", "nerf": "nerf_speed.json", "gaussians": "gaussians_speed.json",
                     "gaussians_full_run": "gaussians_full_run.json", "nerf_full_run": "nerf_full_run.json"}[name]
    tiny = args.tiny
    grid, sampler = ("torch", "stratified") if tiny else ("triton", "occupancy_grid")
    draws = "1,2" if tiny else "1,8,16"
    timing = ["--warmup", "1", "--steps", "1"] if tiny else ["--warmup", "5", "--steps", "15"]
    budget = ["--budget-s", str(max(timeout - 40.0, 10.0))]
    if name == "profile":
        return bench_argv(args, out, "--profile", "--teachers", "fast", "--grids", grid, "--samplers", "auto",
                          "--profile-draws", "2" if tiny else "8", "--profile-steps", "1" if tiny else "3",
                          *(["--warmup", "1", "--steps", "1"] if tiny else ["--warmup", "8", "--steps", "10"])), ""
    if name == "nerf":
        return bench_argv(args, out, "--teachers", "fast", "--grids", grid, "--samplers", sampler, "--draws", draws,
                          *timing, *budget), ""
    if name == "gaussians":
        return bench_argv(args, out, "--scene", "gaussians", "--teachers", "fast", "--draws", draws, *timing,
                          *budget), ""
    full = ["--full-run-caches", "cold",
            "--full-run-cache-dir", str(args.work / "compile_cache"), "--full-run-timeout", str(max(timeout - 45.0, 10.0)),
            *budget]
    sets = ["train.log_every=1"] if tiny else []
    if name == "gaussians_full_run":
        steps = 3 if tiny else 1000
        note = ""
        if not tiny and importlib.util.find_spec("gsplat") is None:
            steps, note = 100, "gsplat is not installed: the torch rasteriser at 512², 100 steps instead of 1,000"
        return bench_argv(args, out, "--full-run-steps", str(steps), "--full-run-config", "configs/gaussians_sd21.yaml",
                          *full, "--full-run-set", *sets), note
    steps, how = nerf_full_run_steps(args, timeout, out_dir)
    if steps is None:
        return None, how
    # A shortened run would start eager (teacher.compile=auto compiles runs of AUTO_COMPILE_MIN_STEPS or
    # more): it compiles as the projected 10,000-step run of configs/sd21.yaml does, so the projection
    # holds that run's compile time and compiled rate.
    return bench_argv(args, out, "--full-run-steps", str(steps), "--full-run-config", "configs/sd21.yaml", *full,
                      "--full-run-set", *sets, "teacher.compile=full", "teacher.channels_last=unet"), how


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the JSON files (and the parts' logs)")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the suite, measures nothing")
    parser.add_argument("--budget-s", type=float, default=None, help="all parts together (default 480; tiny 1500)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in order: {', '.join(PARTS)}")
    parser.add_argument("--work-dir", default=None,
                        help="models and compile cache (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out_dir = Path(args.out)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    selected = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in selected if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    selected = [p for p in PARTS if p in selected]  # the order of PARTS
    args.device = "cpu" if args.tiny else "cuda"
    parts = TINY_PARTS if args.tiny else PARTS
    budget = args.budget_s if args.budget_s is not None else (1500.0 if args.tiny else 480.0)
    holder = None
    if args.work_dir:
        args.work = Path(args.work_dir)
        args.work.mkdir(parents=True, exist_ok=True)
    else:
        holder = tempfile.mkdtemp(prefix="carv3d-speed-suite-")
        args.work = Path(holder)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    suite: dict[str, Any] = {
        "command": " ".join(["python", "scripts/gpu_speed_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": commit.stdout.strip() or None, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny,
        "budget_s": budget, "parts": {}, "status": "running",
    }
    path = out_dir / "suite.json"
    write_json(path, suite)
    try:
        for name in selected:
            remaining = budget - (time.perf_counter() - started)
            timeout = part_timeout(name, remaining, parts, selected)
            entry: dict[str, Any] = {"timeout_s": round(timeout, 1)}
            if timeout < parts[name][1] * (0.5 if name == "prepare" else 1.0):
                entry.update(status="skipped", reason=f"{remaining:.0f} s left, {timeout:.0f} s for this part "
                                                      f"(its minimum {parts[name][1]:.0f} s)")
            elif name == "prepare":
                log(f"prepare (≤ {timeout:.0f} s)")
                entry.update(status="ok", json=str(out_dir / "prepare.json"), **prepare(args, timeout, logs))
                write_json(out_dir / "prepare.json", entry)
            else:
                command, note = part_command(name, args, timeout, out_dir)
                if note:
                    entry["note"] = note
                if command is None:
                    entry.update(status="skipped", reason=note)
                else:
                    log(f"{name} (≤ {timeout:.0f} s): {' '.join(command[1:])}")
                    entry["command"] = " ".join(["python"] + [str(Path(c).relative_to(REPO_ROOT))
                                                            if c.startswith(str(REPO_ROOT)) else c for c in command[1:]])
                    entry.update(run(command, timeout, logs / f"{name}.log"))
                    entry["status"] = ("ok" if entry["exit"] == 0 else "timed out" if entry["timed_out"]
                                       else f"exit {entry['exit']}")
                    entry["json"] = command[command.index("--out") + 1]
            log(f"{name}: {entry['status']} {entry.get('reason', '')} ({entry.get('seconds', 0)} s)")
            suite["parts"][name] = entry
            suite["elapsed_s"] = round(time.perf_counter() - started, 1)
            write_json(path, suite)
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)
    suite["status"] = "finished"
    suite["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(path, suite)
    states = ", ".join(f"{name} {entry['status']}" for name, entry in suite["parts"].items())
    log(f"done in {suite['elapsed_s']:.0f} s: {states}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
