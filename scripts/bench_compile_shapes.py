#!/usr/bin/env python
"""What auto-K's batch sizes cost a compiled teacher: one compile per K, or one for all. Writes JSON.

    python scripts/bench_compile_shapes.py --out OUT/compile_shapes.json       # ~5 min on one H100
    python scripts/bench_compile_shapes.py --device cpu --tiny --out tiny.json # checks the script (CPU, eager)

auto-K changes the number of noise draws a few times early in a run (configs/sd21.yaml: K = 4 from
step 10, 8 from step 60, 16 from step 110 in a logged run), so the guided U-Net call sees the batches
2K = 8, 16 and 32. ``teacher.compile=full`` with static shapes traces and compiles the U-Net again
for each. This script measures, at Stable Diffusion 2.1-base scale (random weights of its shapes,
``carv3d.testing.random_sd``), fp16, channels-last, the U-Net call exactly as the teacher builds it
(:func:`carv3d.teacher.graphs.build_unet_call`, CUDA graph included), once per mode in a fresh process
with an empty compile cache (a new machine):

- ``static``: ``torch.compile(dynamic=False)``, one graph per batch;
- ``dynamic``: the batch dimension marked dynamic (``FastPaths.dynamic_batch``), one graph for all.

For each batch, in the order auto-K visits them: ``first_call_s`` (tracing, compiling and the CUDA
graph's capture: what a run waits for when K changes), ``ms_per_call`` (median of ``--repeat``
replays, CUDA events), Dynamo's compiled-frame count so far, and the output's largest difference
from the eager U-Net on the same inputs, relative to the output's largest magnitude (fp16 both).
"""

from __future__ import annotations

import argparse
import json
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

MODES = ("dynamic", "static")


def log(message: str) -> None:
    print(f"[bench_compile_shapes {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Rewritten after every step, so a killed benchmark keeps what it measured."""
    from carv3d.io import write_json_report

    write_json_report(path, report)


# ------------------------------------------------------------------ one mode (a child process)
def one_mode(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from carv3d.teacher.fast import FastPaths
    from carv3d.teacher.graphs import build_unet_call
    from carv3d.testing.timing import call_times_ms

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if args.tiny:
        from carv3d.testing.tiny_teachers import make_tiny_unet

        unet = make_tiny_unet(4, 8)
    else:
        from carv3d.testing.random_sd import make_unet

        unet = make_unet("sd21")
    dtype = torch.float16 if cuda else torch.float32
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    channels = unet.config.in_channels
    size = unet.config.sample_size
    hidden_shape = (77, unet.config.cross_attention_dim)
    built_s = time.perf_counter() - STARTED

    def eager_reference(sample: Any, t: Any, hidden: Any) -> Any:
        return unet(sample, t, encoder_hidden_states=hidden).sample

    # compile only on CUDA (the teacher compiles nowhere else); on a CPU the script checks itself eagerly
    fast = FastPaths(cuda_graph=cuda, channels_last=cuda, compile="full" if cuda else "off",
                     dynamic_batch=args.one == "dynamic")
    call = build_unet_call(unet, fast)
    counters = torch._dynamo.utils.counters
    rows = []
    for batch in args.batches:
        generator = torch.Generator(device="cpu").manual_seed(batch)
        sample = torch.randn(batch, channels, size, size, generator=generator).to(device, dtype)
        t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        hidden = torch.randn(batch, *hidden_shape, generator=generator).to(device, dtype)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = call(sample, t, hidden)
        if cuda:
            torch.cuda.synchronize(device)
        first = time.perf_counter() - t0
        with torch.no_grad():
            times = call_times_ms(lambda: call(sample, t, hidden), device, args.repeat, warmup=2)
            reference = eager_reference(sample.contiguous(), t, hidden)
        scale = reference.float().abs().max().item()
        row = {
            "batch": batch, "noise_draws": batch // 2, "first_call_s": first,
            "ms_per_call": statistics.median(times), "ms_per_call_min": min(times),
            "frames_compiled": int(counters["stats"].get("unique_graphs", 0)),
            "max_rel_diff_vs_eager": (out.float() - reference.float()).abs().max().item() / max(scale, 1e-12),
        }
        rows.append(row)
        log(f"{args.one}: batch {batch}: first call {first:.1f} s, {row['ms_per_call']:.2f} ms/call, "
            f"{row['frames_compiled']} graphs, rel diff {row['max_rel_diff_vs_eager']:.2e}")
    return {
        "mode": args.one, "fast_paths": fast.describe() + (", dynamic batch" if fast.dynamic_batch else ""),
        "model_build_s": built_s, "rows": rows,
        "compile_s_total": sum(r["first_call_s"] for r in rows),
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
    }


def child(args: argparse.Namespace, mode: str, work: Path) -> dict[str, Any]:
    out = work / f"{mode}.json"
    log_path = work / f"{mode}.log"
    cache = work / f"cache_{mode}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    command = [sys.executable, str(Path(__file__).resolve()), "--one", mode, "--device", args.device,
               "--batches", ",".join(str(b) for b in args.batches), "--repeat", str(args.repeat),
               "--out", str(out)] + (["--tiny"] if args.tiny else [])
    started = time.perf_counter()
    with log_path.open("w") as handle:
        try:
            code: Optional[int] = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT,
                                                  env=env, timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            code = None
    entry: dict[str, Any] = {"mode": mode, "exit": code, "process_s": time.perf_counter() - started}
    if out.is_file():
        entry.update(json.loads(out.read_text()))
    else:
        entry["log_tail"] = log_path.read_text().strip().splitlines()[-15:]
    return entry


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    parser.add_argument("--batches", default="8,16,32", help="U-Net batches (2K) in the order a run visits them")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net (checks the script)")
    parser.add_argument("--child-timeout", type=float, default=400.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    args.modes = [m for m in str(args.modes).split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.one:
        write_json(args.out, one_mode(args))
        return 0
    import torch

    report: dict[str, Any] = {
        "benchmark": "compile_shapes: the guided U-Net call at auto-K's batches, compiled per batch or once",
        "command": "python scripts/bench_compile_shapes.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu",
        "batches": args.batches, "scale": "tiny" if args.tiny else "sd21", "modes": {},
    }
    with tempfile.TemporaryDirectory(prefix="carv3d-compile-shapes-") as tmp:
        for mode in args.modes:
            log(f"{mode}: a fresh process, empty compile cache")
            report["modes"][mode] = child(args, mode, Path(tmp))
            write_json(args.out, report)
    log(f"wrote {args.out}")
    return 0 if all(m.get("exit") == 0 for m in report["modes"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
