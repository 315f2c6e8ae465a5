#!/usr/bin/env python
"""Speed of a full carv3d training step at Stable Diffusion scale, against the card's physical floor.

    python scripts/bench_speed.py --out docs/bench_speed_h200.json            # the default run (H200: ~5–7 min)
    python scripts/bench_speed.py --quick --out quick.json                     # K ∈ {1, 8}, fewer steps
    python scripts/bench_speed.py --device cpu --quick --tiny --out tiny.json  # tiny models, CPU check (~1 min)

What one step is: configs/sd21.yaml's training step — a 64² render of the hash-grid NeRF,
upsampled to 512², VAE encode, one K-draw classifier-free-guided U-Net call of 2K rows, backward
through encode and render, Adam — run by ``carv3d.train.Trainer.train_step`` itself, with the CARV
estimator preset at a fixed K. The teacher is a random-weight model with SD 2.1-base's published
shapes (``carv3d.testing.random_sd``; ``--scale sd15`` for SD 1.5), saved with ``save_pretrained``
into a temporary folder and loaded through ``teacher.pretrained=<folder>``: the measured code is
carv3d's own. Configurations: K ∈ {1, 4, 8, 16} × hash grid {torch, tcnn} × sampler {stratified,
occupancy_grid} × teacher {eager, fast}; an unavailable backend is recorded as such.

Per configuration (medians over ``--steps`` steps after ``--warmup`` steps; CUDA events, no host
sync between timed steps): ms/step, it/s, the split render / encode / teacher / backward / optimizer
(the Trainer's own event timers, read after the timed steps), peak GPU memory
(``torch.cuda.max_memory_allocated`` over the configuration, model weights included), and the
physical floor of a step:

    floor = (U-Net FLOPs + VAE encode forward+backward FLOPs) / matmul rate + hash-grid bytes / bandwidth

with FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real modules at the step's
shapes, the matmul rate measured here on a large fp16/bf16 matmul, the bandwidth on a large copy,
and the hash-grid bytes modelled from the points the encoding saw in one step (see
``grid_bytes_per_step``). The JSON is rewritten after every configuration, so a timeout loses nothing.

``--scene gaussians`` (or ``nerf,gaussians``): the same rows for configs/gaussians_sd21.yaml's step —
a 512² render of 3D Gaussians (``--rasterizers``: auto = gsplat on CUDA when installed, else the
torch rasteriser), no upsampling, VAE encode, the same teacher call — with the same split and peak
memory fields, plus ``rasterizer`` and ``render_size``; its floor counts FLOPs only (no hash grid).
``--tiny`` scales the render as it scales the teacher (512² → 64²).

Two more modes, one at a time instead of the sweep:

    python scripts/bench_speed.py --profile --grids triton --out profile.json       # K = 8, fast teacher
    python scripts/bench_speed.py --full-run-steps 300 --out full.json             # configs/sd21.yaml
    python scripts/bench_speed.py --full-run-steps 1000 --full-run-config configs/gaussians_sd21.yaml --out g.json

- ``--profile``: the first of ``--teachers``/``--grids``/``--samplers`` (default fast/auto/auto) at
  ``--profile-draws`` K (8): ``--warmup`` steps, ``--steps`` steps timed without the profiler, then
  ``--profile-steps`` (3) under ``torch.profiler`` (CUDA activity on CUDA): the top ``--profile-top``
  (10) kernels by self device time (CPU: operators by self CPU time) with calls, total ms, ms per
  step, % of the profiled step's wall clock and the step section each belongs to
  (``carv3d.testing.profile``); ``profile_markdown`` is the table for docs/BENCHMARKS.md
  (``python scripts/tables.py profile FILE``).
- ``--full-run-steps N``: ``carv3d train --config FULL_RUN_CONFIG teacher.pretrained=<the random-weight
  folder> train.steps=N`` end to end in a fresh process, once per ``--full-run-caches`` (cold: an
  empty ``teacher.compile_cache`` folder; warm: the same folder again): wall clock, start-up, the
  first step, training clock and steps/s, K over the run (auto-K), validation, checkpoint and export
  times, peak GPU memory, and a projection to ``--full-run-total`` (10,000) steps with its formula
  (``carv3d.testing.full_run``; ``python scripts/tables.py fullrun FILE``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402

from carv3d.testing.timing import median_ms  # noqa: E402

TARGETS = {
    "it_per_s_at_k8_min": 20.0,  # fast teacher, CARV default estimator, K = 8
    "peak_gb_max": 12.0,
    "k16_step_over_floor_max": 2.0,
}


def log(message: str) -> None:
    print(f"[bench_speed {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomic rewrite, so a reader (or a killed run) never sees half a file."""
    from carv3d.io import write_json_report

    write_json_report(path, report)


# ------------------------------------------------------------------ the card
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median seconds of ``fn`` (CUDA events on GPU)."""
    return median_ms(fn, device, repeat) / 1000.0


def measure_card(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Dense matmul rate (fp16, bf16; fp32 on CPU) and copy bandwidth, measured here."""
    out: dict[str, Any] = {}
    n = 8192 if device.type == "cuda" else (512 if tiny else 1024)
    dtypes = (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        seconds = time_op(lambda: torch.matmul(a, b, out=c), device, repeat=20 if device.type == "cuda" else 3)
        out[f"matmul_tflops_{str(dtype).replace('torch.', '')}"] = 2 * n**3 / seconds / 1e12
        del a, b, c
    numel = (1 << 28) if device.type == "cuda" else (1 << 22)  # 1 GiB / 16 MiB of float32
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_op(lambda: dst.copy_(src), device, repeat=20 if device.type == "cuda" else 3)
    out["copy_bandwidth_gb_s"] = 2 * src.numel() * 4 / seconds / 1e9  # read + write
    del src, dst
    out["matmul_size"] = n
    out["matmul_tflops_best"] = max(v for k, v in out.items() if k.startswith("matmul_tflops_"))
    return out


# ------------------------------------------------------------------ FLOPs and bytes
def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def teacher_flops(teacher: Any, noise_draws: int, guidance_scale: float, render_size: int) -> dict[str, int]:
    """FLOPs of one step's U-Net call (K draws, CFG doubles the rows) and VAE encode forward+backward.

    Calls the modules directly (not a CUDA-graph replay, which the counter cannot see), with Dynamo
    off: a compiled function called under ``FlopCounterMode`` is marked to run eagerly for the rest
    of the process (carv3d.teacher.compiling.eager_under_dispatch_modes).
    """
    c, h, w = teacher.latent_shape
    device, dtype = teacher.device, teacher.dtype
    rows = noise_draws * (1 if guidance_scale == 1.0 else 2)
    sample = torch.randn(rows, c, h, w, device=device, dtype=dtype)
    t = torch.full((rows,), 500, device=device, dtype=torch.long)
    hidden = torch.randn(rows, 77, int(teacher.unet.config.cross_attention_dim), device=device, dtype=dtype)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # regional compile: compiled blocks
        unet = count_flops(lambda: teacher.unet(sample, t, encoder_hidden_states=hidden))
    image = torch.rand(1, 3, render_size, render_size, device=device, requires_grad=True)
    with torch.compiler.set_stance("force_eager"):
        vae = count_flops(lambda: teacher.encode(image).sum().backward())
    return {"unet": unet, "vae_encode_forward_backward": vae}


def grid_bytes_per_step(field: Any, points: int) -> dict[str, Any]:
    """A model of the hash grid's memory traffic in one step (lower bound, no cache reuse counted).

    Forward gathers 8 corners × F features × 4 bytes per level per point; backward scatters the same
    (read + write); Adam reads param, grad, m, v and writes param, m, v of the whole table
    (7 × table bytes), and zeroing the grad writes it once more.
    """
    encoding = field.encoding
    levels = int(getattr(encoding, "n_levels", 16))
    features = int(getattr(encoding, "n_features_per_level", 2))
    table_bytes = sum(p.numel() * p.element_size() for p in encoding.parameters())
    gather = points * levels * 8 * features * 4
    total = gather * 3 + table_bytes * 8
    return {"points": points, "levels": levels, "table_bytes": table_bytes, "bytes": total}


# ------------------------------------------------------------------ one configuration
BASE_CONFIGS = {"nerf": "configs/sd21.yaml", "gaussians": "configs/gaussians_sd21.yaml"}


# Teacher modes a sweep times side by side on one card (`--teachers`), as the teacher.* keys each sets.
# `fast` is the eager teacher with its CUDA graph (the CUDA default for runs too short to compile),
# with --compile / --channels-last added on request; `compiled-cl-unet` is what teacher.compile=auto
# gives a long Stable Diffusion run; the compiled modes compare the compile with and without
# channels-last tensors (U-Net and VAE, or the U-Net only) in one process, against `fast`.
TEACHER_MODES: dict[str, dict[str, str]] = {
    "eager": {"cuda_graph": "off", "channels_last": "off", "compile": "off"},
    "fast": {"cuda_graph": "auto"},
    # compile_after=0: the compiled rows time compiled steps (a run compiles a shape after 150 calls)
    "compiled": {"cuda_graph": "auto", "channels_last": "off", "compile": "full", "compile_after": "0"},
    "compiled-cl": {"cuda_graph": "auto", "channels_last": "on", "compile": "full", "compile_after": "0"},
    # the U-Net channels-last, the VAE encoder NCHW (its compiled backward copied NHWC gradients:
    # docs/profile_compiled_cl_links_h100.json)
    "compiled-cl-unet": {"cuda_graph": "auto", "channels_last": "unet", "compile": "full", "compile_after": "0"},
}


def teacher_keys(args: argparse.Namespace, teacher_mode: str) -> dict[str, str]:
    """The teacher.* values of one mode (``fast`` takes --channels-last and --compile)."""
    keys = dict(TEACHER_MODES[teacher_mode])
    keys.setdefault("channels_last", "on" if args.channels_last else "off")
    keys.setdefault("compile", "full" if args.compile else "off")
    keys.setdefault("compile_after", "0")  # a timed step is a compiled one when compiling at all
    return keys


def config_overrides(args: argparse.Namespace, folder: Path, k: int, grid: Optional[str], sampler: Optional[str],
                     teacher_mode: str, scene: str = "nerf", rasterizer: Optional[str] = None) -> list[str]:
    keys = teacher_keys(args, teacher_mode)
    overrides = [
        f"teacher.pretrained={folder}", "estimator.preset=carv", f"estimator.noise_draws={k}",
        f"train.device={args.device}",
        *(f"teacher.{key}={value}" for key, value in keys.items()),
        f"train.sync_free={'off' if teacher_mode == 'eager' else 'auto'}",
        "train.progress=false", "train.tensorboard=false", "train.seed=0",
    ]
    if scene == "nerf":
        overrides += [f"scene.grid.backend={grid}", f"render.sampler={sampler}"]
    else:
        overrides += [f"scene.rasterizer={rasterizer}"]
    from carv3d.testing.tiny_teachers import TINY_SD_GAUSSIAN_OVERRIDES, TINY_SD_SCENE_OVERRIDES

    if args.tiny:
        overrides += TINY_SD_SCENE_OVERRIDES if scene == "nerf" else TINY_SD_GAUSSIAN_OVERRIDES
    return overrides + list(args.set)


def cases(args: argparse.Namespace, teacher_mode: str) -> list[dict[str, Any]]:
    """The configurations of one teacher mode: per scene, (grid × sampler) or rasterizer, × K."""
    out = []
    for scene in args.scenes:
        if scene == "nerf":
            backends = [(g, s, None) for g in args.grid_list for s in args.sampler_list]
        else:
            backends = [(None, None, r) for r in args.rasterizer_list]
        for grid, sampler, rasterizer in backends:
            for k in args.draws:
                name = (f"{teacher_mode}/{grid}/{sampler}/K{k}" if scene == "nerf"
                        else f"{teacher_mode}/gaussians-{rasterizer}/K{k}")
                entry = {"name": name, "scene": scene, "teacher": teacher_mode, "grid": grid,
                         "sampler_requested": sampler, "noise_draws": k}
                if scene != "nerf":
                    entry["rasterizer_requested"] = rasterizer
                out.append(entry)
    return out


def fresh_trainer(cfg: Any, teacher: Any) -> Any:
    """A Trainer on the shared teacher, with the previous configuration's memory freed and the
    device's peak-memory counter reset, so that its peak is its own."""
    from carv3d.train import Trainer

    if teacher.device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(teacher.device)
    return Trainer(cfg, teacher=teacher)


def run_config(args: argparse.Namespace, cfg: Any, teacher: Any, card: dict[str, Any],
               flops_cache: dict[Any, dict[str, int]]) -> dict[str, Any]:
    device = teacher.device
    trainer = fresh_trainer(cfg, teacher)
    k = int(cfg.estimator.noise_draws)

    nerf = cfg.scene.type == "nerf"
    points = {"n": 0}
    hook = (trainer.scene.field.encoding.register_forward_hook(
        lambda m, inp, out: points.__setitem__("n", points["n"] + inp[0].shape[0])) if nerf else None)
    trainer.train_step()  # first step: builds lazy state (occupancy grid, nerfacc kernels, CUDA graphs)
    if hook is not None:
        hook.remove()
    for _ in range(max(args.warmup - 1, 0)):
        trainer.train_step()
    synchronize(device)
    trainer.timing_metrics()  # reset the section timers: the split covers the timed steps only

    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(args.steps)]
        wall = time.perf_counter()
        for start, end in events:
            start.record()
            trainer.train_step()
            end.record()
        synchronize(device)
        wall = time.perf_counter() - wall
        step_seconds = [s.elapsed_time(e) / 1000.0 for s, e in events]
    else:
        step_seconds = []
        wall = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainer.train_step()
            step_seconds.append(time.perf_counter() - t0)
        wall = time.perf_counter() - wall
    split = trainer.timing_metrics()

    render_size = int(cfg.render.width)
    if (k, render_size) not in flops_cache:
        flops_cache[(k, render_size)] = teacher_flops(teacher, k, float(cfg.teacher.guidance_scale), render_size)
    flops = flops_cache[(k, render_size)]
    grid = grid_bytes_per_step(trainer.scene.field, points["n"]) if nerf else None
    rate = card["matmul_tflops_best"] * 1e12
    floor_ms = 1000.0 * ((flops["unet"] + flops["vae_encode_forward_backward"]) / rate
                         + (grid["bytes"] if grid else 0) / (card["copy_bandwidth_gb_s"] * 1e9))
    median = statistics.median(step_seconds)
    result = {
        "guidance": str(cfg.guidance.type),  # vsd (--set guidance.type=vsd): the floor counts the teacher's calls only
        "ms_per_step_median": 1000.0 * median,
        "ms_per_step_mean": 1000.0 * statistics.fmean(step_seconds),
        "ms_per_step_min": 1000.0 * min(step_seconds),
        "it_per_s": 1.0 / median,
        "it_per_s_wall": args.steps / wall,  # includes host overheads between steps
        "split_ms": {k.replace("time_", "").replace("_ms", ""): v for k, v in split.items()},
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "flops": flops,
        "hash_grid": grid,
        "floor_ms": floor_ms,
        "step_over_floor": 1000.0 * median / floor_ms,
        "hash_grid_backend": trainer.scene.backends.get("hash_grid"),
        "sampler": trainer.scene.backends.get("sampler"),
        "rasterizer": trainer.scene.backends.get("rasterizer"),
        "render_size": [int(cfg.render.height), int(cfg.render.width)],
        "scene_parameters": sum(p.numel() for p in trainer.scene.parameters()),
        "fast_paths": teacher.fast.describe(),
        "sync_free": trainer.sync_free,
        "cuda_graph_replays": getattr(getattr(teacher, "_unet_call", None), "replays", None),
    }
    del trainer
    return result


def check_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Each target against the configurations it is about (the NeRF, fast teacher; K = 8 / 16)."""
    done = [r for r in results if r.get("status") == "ok" and r.get("scene", "nerf") == "nerf"]
    fast = [r for r in done if r["teacher"] == "fast"] or done
    out: dict[str, Any] = {"targets": TARGETS}
    k8 = [r for r in fast if r["noise_draws"] == 8]
    if k8:
        best = max(k8, key=lambda r: r["it_per_s"])
        out["best_it_per_s_at_k8"] = {"value": best["it_per_s"], "config": best["name"],
                                      "met": best["it_per_s"] >= TARGETS["it_per_s_at_k8_min"]}
    peaks = [r for r in fast if r.get("peak_memory_gb") is not None]
    if peaks:
        worst = max(peaks, key=lambda r: r["peak_memory_gb"])
        out["largest_peak_gb"] = {"value": worst["peak_memory_gb"], "config": worst["name"],
                                  "met": worst["peak_memory_gb"] <= TARGETS["peak_gb_max"]}
    k16 = [r for r in fast if r["noise_draws"] == 16]
    if k16:
        best = min(k16, key=lambda r: r["step_over_floor"])
        out["best_k16_step_over_floor"] = {"value": best["step_over_floor"], "config": best["name"],
                                           "met": best["step_over_floor"] <= TARGETS["k16_step_over_floor_max"]}
    return out


# ------------------------------------------------------------------ --profile
def run_profile(args: argparse.Namespace, cfg: Any, teacher: Any, name: str) -> dict[str, Any]:
    """Warm steps, then ``--profile-steps`` steps under torch.profiler: the top kernels, split by section."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from carv3d.testing.profile import annotated_sections, kernel_summary, kineto_links

    device = teacher.device
    trainer = fresh_trainer(cfg, teacher)
    for _ in range(max(args.warmup, 1)):  # the first builds lazy state and captures the CUDA graph
        trainer.train_step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):  # the same steps without the profiler, for comparison (one sync at the end)
        trainer.train_step()
    synchronize(device)
    unprofiled_ms = 1000.0 * (time.perf_counter() - t0) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # One step under a warming profiler first (CUPTI's start-up stays out of the window), then the
    # profiled steps as one recorded window, timed between two synchronisations.
    with annotated_sections(trainer.distill):
        with profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1),
                     record_shapes=True) as prof:  # shapes: which copy, which convolution
            trainer.train_step()
            synchronize(device)
            prof.step()
            trainer.timing_metrics()  # reset: the split below covers the profiled steps
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                trainer.train_step()
            synchronize(device)
            wall = time.perf_counter() - t0
            split = trainer.timing_metrics()
            prof.step()
    step_ms = 1000.0 * wall / args.profile_steps
    summary = kernel_summary(prof.events(), device.type, args.profile_steps, step_ms, top=args.profile_top,
                             links=kineto_links(prof))
    result = {
        "status": "ok", "config": name, "device": str(device), "noise_draws": int(cfg.estimator.noise_draws),
        "scene": str(cfg.scene.type), "guidance": str(cfg.guidance.type), "render_size": [int(cfg.render.height), int(cfg.render.width)],
        "backends": dict(trainer.scene.backends), "fast_paths": teacher.fast.describe(),
        "sync_free": trainer.sync_free, "unprofiled_step_ms": unprofiled_ms, "profiled_wall_ms": 1000.0 * wall,
        "split_ms": {k.replace("time_", "").replace("_ms", ""): v for k, v in split.items()},
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        **summary,
    }
    del trainer, prof
    return result


# ------------------------------------------------------------------ --full-run-steps
def run_full(args: argparse.Namespace, folder: Path, report: dict[str, Any], out_path: Path) -> None:
    """``carv3d train --config CONFIG`` end to end in a fresh process, cold then warm compile cache."""
    import shutil

    from omegaconf import OmegaConf

    from carv3d.config import load_config
    from carv3d.testing.full_run import phases, projection, run_cli, step_policy
    from carv3d.testing.tiny_teachers import (TINY_RUN_OUTPUT_OVERRIDES, TINY_SD_GAUSSIAN_OVERRIDES,
                                              TINY_SD_SCENE_OVERRIDES)

    config = Path(args.full_run_config)
    config = config if config.is_absolute() else REPO_ROOT / config
    scene = str(load_config(config, [], args.prompt).scene.type)
    work = Path(tempfile.mkdtemp(prefix="carv3d-full-run-"))
    cache = Path(args.full_run_cache_dir) if args.full_run_cache_dir else work / "compile_cache"
    cache.mkdir(parents=True, exist_ok=True)
    n = int(args.full_run_steps)
    overrides = [f"teacher.pretrained={folder}", f"train.steps={n}", f"train.device={args.device}",
                 f"train.output_dir={work / 'runs'}", f"teacher.compile_cache={cache}", "train.progress=false"]
    if args.tiny:
        overrides += (TINY_SD_SCENE_OVERRIDES if scene == "nerf" else TINY_SD_GAUSSIAN_OVERRIDES) + TINY_RUN_OUTPUT_OVERRIDES
    overrides += list(args.full_run_set)
    command = ["train", "--config", str(config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config),
               "--prompt", args.prompt, *overrides]
    section: dict[str, Any] = {
        "config": str(config.relative_to(REPO_ROOT)) if config.is_relative_to(REPO_ROOT) else str(config),
        "scene": scene, "steps": n, "projected_steps": args.full_run_total, "command": "carv3d " + " ".join(command),
        "how": "the console script's entry (carv3d.cli:entry) in a fresh process per run, plus an exit hook that "
               "records torch.cuda.max_memory_allocated; phases from its stamped log lines, its files' times, "
               "run.json and metrics.jsonl (carv3d/testing/full_run.py)",
        "cache_note": "cold = an empty teacher.compile_cache folder (Inductor's caches); nerfacc's and gsplat's "
                      "CUDA extension builds and Triton's own cache are outside it and are not emptied",
        "policy_from_config": step_policy(load_config(config, overrides, args.prompt), n, args.full_run_total),
        "runs": [],
    }
    report["full_run"] = section
    write_json(out_path, report)
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # an explicit one would win over teacher.compile_cache
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    logs = out_path.parent / f"{out_path.stem}_logs"
    started = time.perf_counter()
    for state in [c for c in args.full_run_caches.split(",") if c]:
        left = args.budget_s - (time.perf_counter() - started)
        entry: dict[str, Any] = {"cache": state, "cache_files_before": sum(1 for p in cache.rglob("*") if p.is_file())}
        if state == "cold" and entry["cache_files_before"]:
            entry["note"] = "the cache folder was not empty: not a cold start"
        elif state == "warm" and not entry["cache_files_before"]:
            entry["note"] = "the cache folder was empty: a cold start (on a CPU nothing is compiled)"
        if left < 30:
            entry.update(status="skipped", reason=f"time budget of {args.budget_s:.0f} s used up")
            section["runs"].append(entry)
            write_json(out_path, report)
            continue
        log(f"full run ({state} compile cache): carv3d {' '.join(command)}")
        try:
            result = run_cli(command, min(args.full_run_timeout, left), logs / f"{scene}_{state}.log", env=env,
                             cwd=REPO_ROOT)
            entry.update(phases(result))
            entry["status"] = ("ok" if result["exit"] == 0 else "timed out" if result["timed_out"]
                               else f"exit {result['exit']}")
            entry["peak_memory_gb"] = result["peak_gpu_bytes"] / 1e9 if result["peak_gpu_bytes"] is not None else None
            entry["peak_reserved_gb"] = (result["peak_gpu_reserved_bytes"] / 1e9
                                         if result["peak_gpu_reserved_bytes"] is not None else None)
            run_dir = Path(entry["run_dir"]) if entry.get("run_dir") else None
            if run_dir is not None and (run_dir / "config.yaml").is_file():  # the run's own (CPU sizing applied)
                entry["policy"] = step_policy(OmegaConf.load(run_dir / "config.yaml"), n, args.full_run_total)
            entry["projection"] = projection({**entry, "policy": entry.get("policy", section["policy_from_config"])},
                                             args.full_run_total)
        except Exception as err:  # noqa: BLE001 — recorded; the next run still goes
            entry.update(status="error", reason=f"{type(err).__name__}: {err}"[:500])
        entry["cache_files_after"] = sum(1 for p in cache.rglob("*") if p.is_file())
        section["runs"].append(entry)
        write_json(out_path, report)
        if entry.get("status") == "ok":
            proj = entry["projection"].get("projected_s")
            log(f"{state}: {entry['wall_s']:.1f} s wall, {entry.get('steps_per_s_steady') or 0:.2f} steps/s steady, "
                f"{entry.get('steps_per_s_settled') or 0:.2f} settled + {entry.get('one_off_s') or 0:.1f} s of one-offs, "
                f"first step at {entry.get('time_to_first_step_s') or float('nan'):.1f} s, outputs "
                f"{entry.get('outputs_s') or float('nan'):.1f} s; {args.full_run_total} steps projected "
                f"{proj if proj is None else round(proj)} s")
        else:
            log(f"{state}: {entry.get('status')} {entry.get('reason', '')} {entry.get('log_tail', [])[-3:]}")
    if not args.keep_runs:  # the runs and, unless --full-run-cache-dir named one, the compile cache
        shutil.rmtree(work, ignore_errors=True)
    else:
        section["runs_dir"] = str(work / "runs")
        write_json(out_path, report)


def reproject(path: Path) -> int:
    """Recompute every full run's projection in a ``--full-run-steps`` JSON with today's formula."""
    from carv3d.io import atomic_write_text
    from carv3d.testing.full_run import projection

    report = json.loads(path.read_text())
    section = report.get("full_run")
    if not section:
        print(f"error: {path} has no full runs (it is not a --full-run-steps report)", file=sys.stderr)
        return 2
    # a run stopped during its outputs (its time limit) borrows the outputs' time of a run that finished them
    finished = next((e for e in section["runs"] if e.get("outputs_s") is not None), None)
    for entry in section["runs"]:
        if "steps_done" in entry:
            previous = entry.get("projection") or {}
            # the figure the measuring run wrote, kept through any number of reprojections
            old = previous.get("reprojected", {}).get("as_measured_s", previous.get("projected_s"))
            borrowed = entry.get("outputs_s") is None and finished is not None
            run = {**entry, "policy": entry.get("policy", section["policy_from_config"])}
            if borrowed:
                run["outputs_s"] = finished["outputs_s"]
            entry["projection"] = projection(run, int(section["projected_steps"]))
            entry["projection"]["reprojected"] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "as_measured_s": old}
            if borrowed:
                entry["projection"]["outputs_s_from"] = f"the {finished['cache']} run (this one stopped before its outputs)"
            log(f"{entry['cache']}: {section['projected_steps']} steps projected "
                f"{entry['projection'].get('projected_s')} s (as measured: {old})")
    atomic_write_text(path, json.dumps(report, indent=2))
    return 0


# ------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_speed.json", help="JSON report, rewritten after every configuration")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--quick", action="store_true", help="K ∈ {1, 8} and fewer steps")
    parser.add_argument("--tiny", action="store_true", help="tiny random SD-shaped models and scene (CPU checks)")
    parser.add_argument("--scale", default="sd21", choices=("sd21", "sd15"), help="published shapes of the teacher")
    parser.add_argument("--scene", default="nerf",
                        help="nerf (configs/sd21.yaml), gaussians (configs/gaussians_sd21.yaml: 512² splats), or both: "
                             "nerf,gaussians")
    parser.add_argument("--draws", default=None, help="comma-separated K values (default 1,4,8,16; quick 1,8)")
    parser.add_argument("--grids", default=None, help="NeRF hash grids (default torch,tcnn; --profile: auto)")
    parser.add_argument("--samplers", default=None, help="NeRF samplers (default stratified,occupancy_grid; --profile: auto)")
    parser.add_argument("--rasterizers", default="auto", help="Gaussian rasterizers: auto, torch, gsplat (comma-separated)")
    parser.add_argument("--teachers", default=None,
                        help="comma-separated teacher modes: eager, fast, compiled (compile=full), compiled-cl "
                             "(compile=full with channels_last), compiled-cl-unet (compile=full, the U-Net "
                             "channels_last: what a long run resolves auto to) (default eager,fast; --profile: fast)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 8; quick 4)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30; quick 10)")
    parser.add_argument("--compile", action="store_true", help="fast teacher also uses teacher.compile (slow to start)")
    parser.add_argument("--channels-last", action="store_true",
                        help="fast teacher also uses teacher.channels_last=on (off eager, as the default "
                             "channels_last=auto does; the 2026-11-29 tables were measured with it on)")
    parser.add_argument("--model-dir", default=None, help="reuse (or build into) this folder instead of a temporary one")
    parser.add_argument("--budget-s", type=float, default=390.0,
                        help="skip the remaining configurations (full runs) once this many seconds have passed")
    profile = parser.add_argument_group("--profile: the top kernels of one configuration under torch.profiler")
    profile.add_argument("--profile", action="store_true",
                         help="profile the first of --teachers/--grids/--samplers (default fast/auto/auto) at "
                              "--profile-draws instead of the sweep")
    profile.add_argument("--profile-draws", type=int, default=8, help="K of the profiled step")
    profile.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 3; tiny 2)")
    profile.add_argument("--profile-top", type=int, default=10, help="rows of the kernel table")
    full = parser.add_argument_group("--full-run-steps: a complete `carv3d train` run, cold and warm compile cache")
    full.add_argument("--full-run-steps", type=int, default=None,
                      help="run `carv3d train --config FULL_RUN_CONFIG train.steps=N` end to end instead of the sweep")
    full.add_argument("--full-run-config", default="configs/sd21.yaml", help="configs/sd21.yaml or configs/gaussians_sd21.yaml")
    full.add_argument("--full-run-caches", default="cold,warm",
                      help="runs in order, on one teacher.compile_cache folder: cold (empty), warm (reused)")
    full.add_argument("--full-run-cache-dir", default=None, help="the compile cache folder (default: a new empty one)")
    full.add_argument("--full-run-timeout", type=float, default=560.0, help="seconds per run; a run past it is stopped")
    full.add_argument("--full-run-total", type=int, default=10000, help="steps of the projected full-length run")
    full.add_argument("--full-run-set", nargs="*", default=[], metavar="key=value", help="more overrides for the run")
    full.add_argument("--reproject", type=Path, default=None, metavar="JSON",
                      help="only recompute the projections of a --full-run-steps report with the current formula")
    full.add_argument("--keep-runs", action="store_true",
                      help="keep the run directories and the compile cache (default: removed)")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="more config overrides for the sweep and --profile (e.g. teacher.cuda_graph=off)")
    parser.add_argument("--prompt", default="a red cube")
    args = parser.parse_args(argv)
    if args.profile and args.full_run_steps:
        parser.error("--profile and --full-run-steps are separate modes: run them one at a time")
    args.scenes = [s for s in args.scene.split(",") if s]
    for scene in args.scenes:
        if scene not in BASE_CONFIGS:
            parser.error(f"--scene: unknown scene {scene!r}; expected nerf, gaussians or nerf,gaussians")
    args.grid_list = [g for g in (args.grids or ("auto" if args.profile else "torch,tcnn")).split(",") if g]
    args.sampler_list = [s for s in (args.samplers or ("auto" if args.profile else "stratified,occupancy_grid")).split(",") if s]
    args.teacher_list = [t for t in (args.teachers or ("fast" if args.profile else "eager,fast")).split(",") if t]
    unknown = [t for t in args.teacher_list if t not in TEACHER_MODES]
    if unknown:
        parser.error(f"--teachers: unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(TEACHER_MODES)}")
    # channels_last converts the shared U-Net and VAE in place (DiffusersTeacher.with_fast_paths), for
    # good: the modes that turn it on run after those that do not, so that each row has its own layout.
    args.teacher_list.sort(key=lambda mode: teacher_keys(args, mode)["channels_last"] != "off")
    args.rasterizer_list = [r for r in args.rasterizers.split(",") if r]
    args.draws = [int(v) for v in (args.draws or ("1,8" if args.quick else "1,4,8,16")).split(",")]
    # --tiny is a CPU check of the script, not a measurement: a few steps are enough.
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 4 if args.quick else 8)
    args.steps = args.steps if args.steps is not None else (3 if args.tiny else 10 if args.quick else 30)
    args.profile_steps = args.profile_steps or (2 if args.tiny else 3)
    return args


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[Any, Path]:
    from carv3d.testing.random_sd import build_random_stable_diffusion
    from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion

    holder = None
    if args.model_dir:
        root = Path(args.model_dir)
    else:
        holder = tempfile.TemporaryDirectory(prefix="carv3d-bench-")
        root = Path(holder.name)
    folder = root / ("tiny" if args.tiny else args.scale)
    if (folder / "unet").is_dir():
        log(f"reusing models in {folder}")
    elif args.tiny:
        build_tiny_stable_diffusion(folder, seed=0)
    else:
        build_random_stable_diffusion(folder, scale=args.scale, seed=0, device=device)
    return holder, folder


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.reproject:
        return reproject(args.reproject)
    started = time.perf_counter()
    from carv3d.config import load_config
    from carv3d.devices import resolve_device
    from carv3d.log import setup_logging
    from carv3d.teacher import load_teacher

    setup_logging()
    device = resolve_device(args.device, option="--device")
    args.device = str(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out_path = Path(args.out)
    card: dict[str, Any] = {}
    mode = "full_run" if args.full_run_steps else "profile" if args.profile else "sweep"
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "scale": "tiny" if args.tiny else args.scale, "mode": mode, "scenes": args.scenes,
        "base_config": ", ".join(BASE_CONFIGS[s] for s in args.scenes),
        "estimator": "carv preset, fixed K", "warmup_steps": args.warmup, "timed_steps": args.steps,
        "targets": TARGETS, "results": [], "status": "running",
    }
    if args.tiny:
        from carv3d.testing.tiny_teachers import TINY_SD_RENDER_SCALE

        report["tiny_render_scale"] = TINY_SD_RENDER_SCALE
    write_json(out_path, report)

    if mode == "sweep":
        log("measuring the card (matmul rate, copy bandwidth)")
        report["card"] = card = measure_card(device, args.tiny)
        log(f"card: {card}")
        write_json(out_path, report)

    t0 = time.perf_counter()
    holder, folder = build_models(args, device)
    report["model_build_seconds"] = time.perf_counter() - t0
    log(f"models in {folder} ({report['model_build_seconds']:.1f} s)")

    if mode == "full_run":
        try:
            run_full(args, folder, report, out_path)
        except Exception as err:  # noqa: BLE001 — recorded in the JSON
            report["full_run_error"] = f"{type(err).__name__}: {err}"[:2000]
            log(f"full run failed: {report['full_run_error']}")
    elif mode == "profile":
        scene = args.scenes[0]
        teacher_mode, grid, sampler = args.teacher_list[0], args.grid_list[0], args.sampler_list[0]
        rasterizer = args.rasterizer_list[0]
        name = (f"{teacher_mode}/{grid}/{sampler}/K{args.profile_draws}" if scene == "nerf"
                else f"{teacher_mode}/gaussians-{rasterizer}/K{args.profile_draws}")
        try:
            cfg = load_config(REPO_ROOT / BASE_CONFIGS[scene],
                              config_overrides(args, folder, args.profile_draws, grid, sampler, teacher_mode, scene,
                                               rasterizer), args.prompt)
            teacher = load_teacher(cfg.teacher, device)
            log(f"profiling {name}: {args.warmup} warm steps, {args.steps} timed, {args.profile_steps} profiled")
            report["profile"] = run_profile(args, cfg, teacher, name)
            from carv3d.testing.profile import profile_markdown

            report["profile_markdown"] = profile_markdown(report["profile"])
            log("\n" + report["profile_markdown"])
        except Exception as err:  # noqa: BLE001 — recorded in the JSON
            report["profile"] = {"status": "error", "config": name,
                                 "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:2000]}
            log(f"profile failed: {report['profile']['reason']}")
    else:
        run_sweep(args, report, out_path, folder, device, card, started)
    report["status"] = "finished"
    report["elapsed_seconds"] = time.perf_counter() - started
    write_json(out_path, report)
    log(f"done in {report['elapsed_seconds']:.0f} s; summary {json.dumps(report.get('summary', {}))}")
    if holder is not None:
        holder.cleanup()
    return 0


def run_sweep(args: argparse.Namespace, report: dict[str, Any], out_path: Path, folder: Path, device: torch.device,
              card: dict[str, Any], started: float) -> None:
    """Every configuration: teacher mode × scene × backends × K (one teacher load per mode)."""
    from carv3d.config import load_config
    from carv3d.errors import UserError
    from carv3d.scene.hashgrid import tinycudann_import_error
    from carv3d.teacher import load_teacher
    from carv3d.teacher.fast import prepare_compile_cache, resolve_fast_paths

    tcnn_error = tinycudann_import_error()
    flops_cache: dict[Any, dict[str, int]] = {}
    loaded = None  # one copy of the weights for all modes; eager first, then re-wrapped with fast paths
    for teacher_mode in args.teacher_list:
        teacher = None
        for entry in cases(args, teacher_mode):
            name, scene, grid, sampler, k = (entry["name"], entry["scene"], entry["grid"], entry["sampler_requested"],
                                             entry["noise_draws"])
            elapsed = time.perf_counter() - started
            if scene == "nerf" and grid == "tcnn" and tcnn_error:
                entry.update(status="unavailable", reason=f"tinycudann: {tcnn_error}")
            elif scene == "nerf" and sampler == "occupancy_grid" and device.type != "cuda":
                entry.update(status="unavailable", reason="the occupancy grid sampler needs CUDA")
            elif elapsed > args.budget_s:
                entry.update(status="skipped", reason=f"time budget of {args.budget_s:.0f} s used up")
            else:
                try:
                    cfg = load_config(REPO_ROOT / BASE_CONFIGS[scene],
                                      config_overrides(args, folder, k, grid, sampler, teacher_mode, scene,
                                                       entry.get("rasterizer_requested")), args.prompt)
                    if teacher is None:
                        t_load = time.perf_counter()
                        if loaded is None:
                            loaded = teacher = load_teacher(cfg.teacher, device)
                        else:
                            fast = resolve_fast_paths(cfg.teacher, device)
                            prepare_compile_cache(fast, cfg.teacher)
                            teacher = loaded.with_fast_paths(fast)
                        log(f"{teacher_mode} teacher ready in {time.perf_counter() - t_load:.1f} s "
                            f"(fast paths: {teacher.fast.describe()})")
                    t_cfg = time.perf_counter()
                    entry.update(status="ok", **run_config(args, cfg, teacher, card, flops_cache))
                    entry["seconds"] = time.perf_counter() - t_cfg
                except UserError as err:  # a backend that is missing here
                    entry.update(status="unavailable", reason=str(err).splitlines()[0])
                except Exception as err:  # noqa: BLE001 — record and go on: one failure must not lose the rest
                    entry.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            report["results"].append(entry)
            report["summary"] = check_targets(report["results"])
            report["elapsed_seconds"] = time.perf_counter() - started
            write_json(out_path, report)
            if entry["status"] == "ok":
                log(f"{name}: {entry['ms_per_step_median']:.1f} ms/step ({entry['it_per_s']:.1f} it/s), "
                    f"split {', '.join(f'{k2} {v:.1f}' for k2, v in entry['split_ms'].items())} ms, "
                    f"peak {entry['peak_memory_gb'] or 0:.2f} GB, floor {entry['floor_ms']:.1f} ms "
                    f"(×{entry['step_over_floor']:.1f})")
            else:
                log(f"{name}: {entry['status']} ({entry.get('reason', '')})")
        del teacher  # drops its CUDA graphs (and their memory pool) before the next mode
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
