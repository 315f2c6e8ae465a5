#!/usr/bin/env python
"""What `teacher.compile` costs and buys over a whole run: cold and warm compile caches, full and
regional compilation, at Stable Diffusion 2.1-base scale. Writes JSON.

    python scripts/bench_compile.py --out docs/bench_compile_h100.json     # ~6 min on one H100/H200
    python scripts/bench_compile.py --device cpu --tiny --out tiny.json   # checks the script (CPU, eager only)

Each measurement is a fresh process (``--one``), as a user's run is: it loads the random-weight
SD-shaped teacher (``carv3d.testing.random_sd``, built once into ``--model-dir``), builds the
Trainer of configs/sd21.yaml at a fixed K with ``teacher.compile=MODE`` and the compile cache in a
given folder, and records

- ``startup_s``: process start → the end of the first training step (imports, teacher load,
  tracing and compiling, CUDA-graph capture, the first step),
- ``ms_per_step``: the median step after ``--warmup`` more steps (CUDA events),
- ``cache_files``: files in the cache folder afterwards.

Modes: ``off``; ``full`` and ``regional`` each twice on one cache folder — first empty (cold: a
new machine), then again (warm: the next run on that machine). From these, the wall clock of a
1,000- and a 10,000-step run is ``startup_s + steps · ms_per_step`` (a projection: validation,
checkpoints and export are the same for every mode and left out).

``--probe-encoder`` (on by default on CUDA) explains the compiled VAE encoder's lost speed-up in
a process's second bench_speed configuration: it times the compiled encode forward+backward, then
runs what bench_speed runs between two configurations (the FLOP count of the encoder under
``FlopCounterMode``), and times the encode again, recording Dynamo's counters and its
recompile / graph-break log around each phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

STARTED = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")


def log(message: str) -> None:
    print(f"[bench_compile {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Rewritten after every run, so a killed benchmark keeps what it measured."""
    from carv3d.io import write_json_report

    write_json_report(path, report)


# ------------------------------------------------------------------ one run (a child process)
def one_run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from carv3d.config import load_config
    from carv3d.log import setup_logging
    from carv3d.train import Trainer

    setup_logging()
    device = torch.device(args.device)
    overrides = [
        f"teacher.pretrained={args.model_dir}", "estimator.preset=carv", f"estimator.noise_draws={args.draws}",
        f"train.device={device}", f"teacher.compile={args.one}", f"teacher.compile_cache={args.cache_dir}",
        "teacher.compile_after=0",  # the first step compiles, as this script's startup_s means
        "train.progress=false", "train.tensorboard=false", "train.seed=0",
    ]
    if args.tiny:
        from carv3d.testing.tiny_teachers import TINY_SD_SCENE_OVERRIDES

        overrides += TINY_SD_SCENE_OVERRIDES
    cfg = load_config(REPO_ROOT / "configs" / "sd21.yaml", overrides, "a red cube")
    trainer = Trainer(cfg)
    trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    startup = time.perf_counter() - STARTED
    for _ in range(args.warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    trainer.timing_metrics()  # reset the section timers: the split covers the timed steps only
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            trainer.train_step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(1000 * (time.perf_counter() - t0))
    split = trainer.timing_metrics()
    cache = Path(args.cache_dir)
    return {
        "mode": args.one, "noise_draws": args.draws, "startup_s": startup, "ms_per_step": statistics.median(times),
        "split_ms": {k.replace("time_", "").replace("_ms", ""): v for k, v in split.items()},
        "fast_paths": trainer.distill.teacher.fast.describe(),
        "cache_files": sum(1 for p in cache.rglob("*") if p.is_file()) if cache.is_dir() else 0,
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def child(args: argparse.Namespace, mode: str, cache_dir: Path, log_path: Path) -> dict[str, Any]:
    out = log_path.with_suffix(".json")
    command = [sys.executable, str(Path(__file__).resolve()), "--one", mode, "--model-dir", str(args.model_dir),
               "--cache-dir", str(cache_dir), "--device", args.device, "--draws", str(args.draws),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--out", str(out)] + (["--tiny"] if args.tiny else [])
    started = time.perf_counter()
    with log_path.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, timeout=args.child_timeout)
    entry: dict[str, Any] = {"mode": mode, "exit": code, "process_s": time.perf_counter() - started}
    if out.is_file():
        entry.update(json.loads(out.read_text()))
    else:
        entry["log_tail"] = log_path.read_text().strip().splitlines()[-15:]
    return entry


def projections(entry: dict[str, Any]) -> dict[str, float]:
    return {f"run_{steps}_steps_s": entry["startup_s"] + steps * entry["ms_per_step"] / 1000 for steps in (1000, 10000)}


# ------------------------------------------------------------------ the encoder probe
class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:400])


def probe_encoder(args: argparse.Namespace) -> dict[str, Any]:
    """Compiled encode forward+backward → bench_speed's FLOP count → the same encode again."""
    import torch
    import torch._dynamo.utils as dynamo_utils

    from torch.utils.flop_counter import FlopCounterMode

    from carv3d.config import DiffusersTeacherConfig
    from carv3d.teacher import load_teacher

    device = torch.device(args.device)
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    capture = _Capture()
    for name in ("torch._dynamo", "torch._dynamo.guards", "torch.__recompiles", "torch.__graph_breaks"):
        logging.getLogger(name).addHandler(capture)
    teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(args.model_dir), compile="full", cuda_graph="on",
                                                  compile_cache=str(Path(args.model_dir) / "probe_cache")), device)
    size = int(teacher.image_size)
    image = torch.rand(1, 3, size, size, device=device)

    def encode_ms(repeat: int = 10) -> float:
        times = []
        for _ in range(repeat):
            x = image.clone().requires_grad_(True)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            teacher.encode(x).float().square().mean().backward()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def counters() -> dict[str, Any]:
        return {group: dict(values) for group, values in dynamo_utils.counters.items() if values}

    def forward_ms(repeat: int = 10) -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                teacher.encode(image)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        return statistics.median(times)

    compiled_fn = teacher._encode_call if hasattr(teacher, "_encode_call") else None
    original = getattr(compiled_fn, "_torchdynamo_orig_callable", None)

    def cache_entries() -> Any:
        try:
            from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

            return len(_debug_get_cache_entry_list(original.__code__)) if original is not None else "no compiled fn found"
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"[:200]

    phases: dict[str, Any] = {"encode_call": repr(compiled_fn)[:200]}
    t0 = time.perf_counter()
    encode_ms(2)  # compiles
    phases["compile_s"] = time.perf_counter() - t0
    phases["compiled_ms"] = encode_ms()
    phases["compiled_forward_ms"] = forward_ms()
    phases["cache_entries_after_compile"] = cache_entries()
    phases["counters_after_compile"] = counters()
    def count_flops(fn: Any) -> int:  # bench_speed's FLOP count, as it ran before the fix
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    # An unrelated computation under FlopCounterMode: does the mode itself change later calls?
    with FlopCounterMode(display=False):
        torch.randn(64, 64, device=device) @ torch.randn(64, 64, device=device)
    phases["after_unrelated_flop_mode_ms"] = encode_ms()
    mark = len(capture.lines)
    render = torch.rand(1, 3, 64, 64, device=device, requires_grad=True)  # bench_speed counts at the render size
    phases["flops"] = count_flops(lambda: teacher.encode(render).sum().backward())  # as bench_speed did
    phases["log_during_flop_count"] = capture.lines[mark:]
    phases["counters_after_flop_count"] = counters()
    phases["cache_entries_after_flop_count"] = cache_entries()
    mark = len(capture.lines)
    phases["after_flop_count_ms"] = encode_ms()
    phases["after_flop_count_forward_ms"] = forward_ms()
    phases["log_after_flop_count"] = capture.lines[mark:]
    phases["counters_at_end"] = counters()
    # The same fresh: a second compiled teacher whose first call is under FlopCounterMode.
    torch._dynamo.reset()
    teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(args.model_dir), compile="full", cuda_graph="on",
                                                  compile_cache=str(Path(args.model_dir) / "probe_cache")), device)
    compiled_fn = teacher._encode_call if hasattr(teacher, "_encode_call") else None
    original = getattr(compiled_fn, "_torchdynamo_orig_callable", None)
    phases["fresh_flops_first"] = count_flops(lambda: teacher.encode(render).sum().backward())
    phases["fresh_cache_entries_after_flop_count"] = cache_entries()
    phases["fresh_after_flop_first_ms"] = encode_ms()
    phases["fresh_cache_entries_at_end"] = cache_entries()
    phases["fresh_counters_at_end"] = counters()
    eager = load_teacher(DiffusersTeacherConfig(pretrained=str(args.model_dir), compile="off", cuda_graph="on"), device)
    teacher = eager
    phases["eager_ms"] = encode_ms()
    return phases


# ------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_compile.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models (a CPU check of the script)")
    parser.add_argument("--draws", type=int, default=8, help="K of the measured step")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default=None, help="default: off,regional,full on CUDA; off on a CPU; none: only the encoder probe")
    parser.add_argument("--model-dir", default=None, help="reuse (or build into) this folder")
    parser.add_argument("--child-timeout", type=float, default=400.0)
    parser.add_argument("--probe-encoder", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: this compile mode
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.one:
        write_json(Path(args.out), one_run(args))
        return 0
    import torch

    report: dict[str, Any] = {"command": " ".join(["scripts/bench_compile.py"] + (argv if argv is not None else sys.argv[1:])),
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                              "noise_draws": args.draws, "runs": [], "status": "running"}
    out = Path(args.out)
    holder = None
    if args.model_dir is None:
        holder = tempfile.TemporaryDirectory(prefix="carv3d-compile-")
        args.model_dir = holder.name
    folder = Path(args.model_dir) / ("tiny" if args.tiny else "sd21")
    if not (folder / "unet").is_dir():
        t0 = time.perf_counter()
        if args.tiny:
            from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion

            build_tiny_stable_diffusion(folder, seed=0)
        else:
            from carv3d.testing.random_sd import build_random_stable_diffusion

            build_random_stable_diffusion(folder, scale="sd21", seed=0, device=torch.device(args.device))
        report["model_build_s"] = time.perf_counter() - t0
    args.model_dir = str(folder)
    cuda = args.device.startswith("cuda")
    modes = [m for m in (args.modes or ("off,regional,full" if cuda else "off")).split(",") if m and m != "none"]
    logs = Path(tempfile.mkdtemp(prefix="carv3d-compile-logs-"))
    for mode in modes:
        cache = Path(tempfile.mkdtemp(prefix=f"carv3d-cache-{mode}-"))
        for state in (("cold",) if mode == "off" else ("cold", "warm")):
            log(f"{mode} ({state} cache) ...")
            try:
                entry = child(args, mode, cache, logs / f"{mode}_{state}.log")
            except subprocess.TimeoutExpired:
                entry = {"mode": mode, "exit": None, "error": f"over {args.child_timeout:.0f} s"}
            entry["cache"] = state
            if "ms_per_step" in entry:
                entry.update(projections(entry))
                log(f"{mode} {state}: startup {entry['startup_s']:.1f} s, {entry['ms_per_step']:.1f} ms/step")
            else:
                log(f"{mode} {state}: failed: {entry.get('log_tail') or entry.get('error')}")
            report["runs"].append(entry)
            write_json(out, report)
    if args.probe_encoder == "on" or (args.probe_encoder == "auto" and cuda):
        try:
            report["encoder_probe"] = probe_encoder(args)
        except Exception as err:  # noqa: BLE001 — recorded; the runs above stand
            report["encoder_probe"] = {"error": f"{type(err).__name__}: {err}"[:2000]}
    report["status"] = "done"
    report["elapsed_s"] = time.perf_counter() - STARTED
    write_json(out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "encoder_probe"}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
