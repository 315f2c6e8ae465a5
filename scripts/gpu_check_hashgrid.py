#!/usr/bin/env python
"""GPU check of the Triton hash-grid backend: correctness against the torch grid, then speed.

    python scripts/gpu_check_hashgrid.py OUT_DIR                 # on a CUDA machine (≈ 2–3 min)
    python scripts/gpu_check_hashgrid.py OUT_DIR --cpu-smoke     # the same sections, tiny, on the CPU
                                                                 # (Triton's interpreter; ≈ 1 min)

Writes ``OUT_DIR/gpu_check_hashgrid.json`` after every section (each in try/except: a failing
section records its error and the next one runs). Sections:

1. ``correctness``: at the NeRF's real grid (configs/sd21.yaml's ``scene.grid``: 16 levels × 2
   features, 2^19 rows, base 16, scale 1.447269) on N random points plus the corners of the cube,
   with an O(1) random table copied into both backends, for float32 and float16 tables: forward
   values, the table gradient and the position gradient of Σ y·u (u random), each as the largest
   absolute difference divided by the largest reference magnitude. float16 tables are also compared
   with a float64 torch reference (``err_vs_fp64``) for both backends: the torch grid sums in fp16,
   the kernels in fp32. ``ok`` applies the tolerances in ``TOLERANCES``.
2. ``render``: ``scene.render`` + backward of one 64² view of configs/sd21.yaml's scene (occupancy
   grid sampler, random shading, learned background; built by ``build_scene`` as the trainer does)
   for each backend: median ms of render, backward and both (CUDA events), the points the encoding
   saw per render, and the difference between the two backends' images and table gradients on
   the same views. Bar: render + backward ≤ 8 ms. Also the triton backend with
   ``scene.compile_head=true`` (its compile happens in the warm-up iterations, not timed; on CUDA
   only, so the CPU smoke run times it uncompiled; ``--no-compile-head`` leaves it out).
3. ``encode``: the encoding alone, forward and forward+backward, at the render's point count, at
   64²×48 and at 547,832 points (the count bench_speed recorded per step), for the torch backend
   and the Triton kernels at 64..512 points per program.
4. ``profile``: torch.profiler over 64² render + backward iterations with the triton backend: the
   top-15 kernels by device time and the kernel launches per iteration (where to fuse next).
5. ``bench_speed``: ``scripts/bench_speed.py --quick --grids torch,triton --samplers occupancy_grid
   --teachers fast`` in a subprocess (the full training step at SD 2.1-base shapes), its JSON copied
   to OUT_DIR/bench_speed_quick.json and its results summarised here.

The JSON's ``summary`` lists the numbers to read first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if "--cpu-smoke" in sys.argv:  # the interpreter must be on before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from carv3d.testing.timing import median_ms  # noqa: E402

TOLERANCES = {  # relative to the largest reference magnitude
    "float32": {"forward": 1e-5, "grad_table": 1e-4, "grad_x": 1e-4},
    # one fp16 rounding of the result (2^-11) with room; the position gradient goes through fp16 θ
    "float16": {"forward": 2e-3, "grad_table": 4e-3, "grad_x": 4e-3},
}
RENDER_BAR_MS = 8.0
BENCH_POINTS = 547_832  # encoded points per step in docs/bench_speed_h200_repeat.json (64², occupancy grid)


def log(message: str) -> None:
    print(f"[gpu_check_hashgrid {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    from carv3d.io import write_json_report

    write_json_report(path, report)


def timed(device: torch.device, fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` (CUDA events on GPU, wall clock on CPU)."""
    return median_ms(fn, device, repeat, warmup)


def grid_args(grid_cfg: Any) -> tuple:
    return (int(grid_cfg.n_levels), int(grid_cfg.n_features_per_level), int(grid_cfg.log2_hashmap_size),
            int(grid_cfg.base_resolution), float(grid_cfg.per_level_scale))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------ sections
def section_correctness(args: argparse.Namespace, device: torch.device, grid_cfg: Any) -> dict[str, Any]:
    from carv3d.scene.hashgrid import HashGridEncoding
    from carv3d.scene.hashgrid_triton import TritonHashGridEncoding

    n = args.points
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=gen)
    x[:8] = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.float32)  # corners
    x = x.to(device)
    ref64 = HashGridEncoding(*grid_args(grid_cfg), device=device).double()
    with torch.no_grad():
        ref64.params.copy_(torch.rand(ref64.params.shape, generator=gen, dtype=torch.float64).to(device) * 2 - 1)
    upstream = torch.randn(n, ref64.n_output_dims, generator=gen).to(device)
    out: dict[str, Any] = {"points": n, "grid": list(grid_args(grid_cfg)), "tolerances": TOLERANCES}

    def run(enc: torch.nn.Module, u: torch.Tensor) -> dict[str, torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        enc.params.grad = None
        y = enc(xg)
        (y.double() * u.double()).sum().backward()
        return {"forward": y.detach(), "grad_table": enc.params.grad.detach(), "grad_x": xg.grad.detach(),
                "dtype": str(y.dtype)}

    for dtype in (torch.float32, torch.float16):
        name = str(dtype).replace("torch.", "")
        ref = HashGridEncoding(*grid_args(grid_cfg), device=device).to(dtype)
        tri = TritonHashGridEncoding(*grid_args(grid_cfg), device=device).to(dtype)
        with torch.no_grad():
            ref.params.copy_(ref64.params.to(dtype))
            tri.params.copy_(ref.params)
        u = upstream.to(dtype).float()  # ∂L/∂y reaches both backends in the table's dtype
        r, t = run(ref, u), run(tri, u)
        with torch.no_grad():
            ref64.params.copy_(ref.params.double())  # the same (representable) values in float64
        r64 = run(ref64, u)
        entry: dict[str, Any] = {"output_dtype": {"torch": r["dtype"], "triton": t["dtype"]}}
        for key in ("forward", "grad_table", "grad_x"):
            entry[key] = {
                "triton_vs_torch": rel_err(t[key], r[key]),
                "err_vs_fp64": {"torch": rel_err(r[key], r64[key]), "triton": rel_err(t[key], r64[key])},
                "tolerance": TOLERANCES[name][key],
            }
            entry[key]["ok"] = entry[key]["triton_vs_torch"] <= TOLERANCES[name][key] or (
                entry[key]["err_vs_fp64"]["triton"] <= TOLERANCES[name][key])
        entry["forward"]["bit_identical_fraction"] = float((t["forward"] == r["forward"]).double().mean())
        entry["ok"] = all(entry[k]["ok"] for k in ("forward", "grad_table", "grad_x"))
        out[name] = entry
        del ref, tri, r, t, r64
    out["ok"] = all(out[k]["ok"] for k in ("float32", "float16"))
    return out


def build_scene_for(backend: str, device: torch.device, overrides: list[str]) -> tuple[Any, Any]:
    from carv3d.config import load_config
    from carv3d.scene import build_scene

    cfg = load_config(REPO_ROOT / "configs" / "sd21.yaml",
                      [f"scene.grid.backend={backend}", f"train.device={device}", *overrides], "a red cube")
    return cfg, build_scene(cfg.scene, cfg.render, device, seed=0)


def section_render(args: argparse.Namespace, device: torch.device, overrides: list[str]) -> dict[str, Any]:
    from carv3d.cameras import CameraSampler

    from carv3d.devices import warm_up_nerfacc

    out: dict[str, Any] = {"bar_ms": RENDER_BAR_MS, "views": args.render_iters,
                           "nerfacc_warm_up_seconds": warm_up_nerfacc()}  # its JIT build, not timed below
    first: dict[str, Any] = {}
    variants = [("torch", "torch", []), ("triton", "triton", [])]
    if args.compile_head:  # scene.compile_head: torch.compile of the MLP and activation (compiles first)
        variants.append(("triton+compile_head", "triton", ["scene.compile_head=true"]))
    for label, backend, extra in variants:
        cfg, scene = build_scene_for(backend, device, overrides + extra)
        sampler = CameraSampler.from_config(cfg.camera)
        host = torch.Generator().manual_seed(0)
        dev_gen = torch.Generator(device=device).manual_seed(1)
        counted = {"n": 0}
        scene.field.encoding.register_forward_hook(lambda m, inp, o: counted.__setitem__("n", counted["n"] + inp[0].shape[0]))
        render_ms, backward_ms, total_ms, points = [], [], [], []
        # compiled variants: more untimed views, so that every graph (with and without grad, with
        # and without normals) is compiled before the timing starts
        warmup = args.render_warmup + (5 if extra and not args.cpu_smoke else 0)
        for i in range(warmup + args.render_iters):
            scene.before_step(i)
            cams = sampler.sample(1, host, "cpu").to(device)
            shading = scene.sample_shading(host)
            for p in scene.parameters():
                p.grad = None
            counted["n"] = 0
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if device.type == "cuda" else None
            t0 = time.perf_counter()
            if events:
                events[0].record()
            rendered = scene.render(cams, generator=dev_gen, shading=shading)
            if events:
                events[1].record()
            t1 = time.perf_counter()
            loss = (rendered.rgb * torch.linspace(-1, 1, rendered.rgb.numel(), device=device).view_as(rendered.rgb)).sum()
            loss.backward()
            if events:
                events[2].record()
                events[2].synchronize()
            t2 = time.perf_counter()
            if i == 0:  # the same first view on both backends: images and gradients side by side
                first[label] = {"rgb": rendered.rgb.detach().float().cpu(),
                                  "grad": scene.field.encoding.params.grad.detach().float().cpu()}
            if i >= warmup:
                if events:
                    render_ms.append(events[0].elapsed_time(events[1]))
                    backward_ms.append(events[1].elapsed_time(events[2]))
                else:
                    render_ms.append(1000 * (t1 - t0))
                    backward_ms.append(1000 * (t2 - t1))
                total_ms.append(render_ms[-1] + backward_ms[-1])
                points.append(counted["n"])
        out[label] = {
            "render_ms_median": statistics.median(render_ms), "backward_ms_median": statistics.median(backward_ms),
            "render_backward_ms_median": statistics.median(total_ms), "render_backward_ms_min": min(total_ms),
            "encoded_points_per_render_median": statistics.median(points),
            "hash_grid_backend": scene.backends["hash_grid"], "sampler": scene.backends["sampler"],
            "head_compiled": scene.field.head_compiled,
            "shadings": "random (albedo / lambertian / textureless; normals by central differences)",
        }
        del scene
    out["speedup"] = out["torch"]["render_backward_ms_median"] / out["triton"]["render_backward_ms_median"]
    out["bar_met"] = out["triton"]["render_backward_ms_median"] <= RENDER_BAR_MS
    out["first_view"] = {label: {"rgb_max_abs_diff_vs_torch": float((first[label]["rgb"] - first["torch"]["rgb"]).abs().max()),
                                 "grad_table_rel_err_vs_torch": rel_err(first[label]["grad"], first["torch"]["grad"])}
                         for label in first if label != "torch"}
    return out


def section_profile(args: argparse.Namespace, device: torch.device, overrides: list[str]) -> dict[str, Any]:
    """torch.profiler over a few 64² render + backward iterations on the triton backend: the kernels
    that take the time once the encoding is fused (where to fuse next)."""
    from torch.profiler import ProfilerActivity, profile

    from carv3d.cameras import CameraSampler

    cfg, scene = build_scene_for("triton", device, overrides)
    sampler = CameraSampler.from_config(cfg.camera)
    host, dev_gen = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(1)

    def iteration(i: int) -> None:
        scene.before_step(i)
        cams = sampler.sample(1, host, "cpu").to(device)
        rendered = scene.render(cams, generator=dev_gen, shading=scene.sample_shading(host))
        for p in scene.parameters():
            p.grad = None
        rendered.rgb.square().sum().backward()

    for i in range(3):
        iteration(i)
    iters = 2 if args.cpu_smoke else 8
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for i in range(3, 3 + iters):
            iteration(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    device_time = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)  # noqa: E731
    if device.type == "cuda":  # the kernels themselves (an op's own entry would count its kernels twice)
        from torch.autograd import DeviceType

        timed_events = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA and device_time(e) > 0]
        timed_events = timed_events or [e for e in events if device_time(e) > 0]  # another profiler's events
    else:
        timed_events = list(events)
    key = device_time if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in timed_events) or 1.0
    top = sorted(timed_events, key=key, reverse=True)[:15]
    return {
        "iterations": iters, "time_kind": "self device time" if device.type == "cuda" else "self CPU time",
        "total_ms_per_iteration": total / 1000.0 / iters,
        "kernels_per_iteration": sum(e.count for e in timed_events) / iters,
        "top": [{"name": e.key[:120], "calls_per_iteration": e.count / iters, "ms_per_iteration": key(e) / 1000.0 / iters,
                 "share": key(e) / total} for e in top],
    }


def section_encode(args: argparse.Namespace, device: torch.device, grid_cfg: Any, render_points: Any) -> dict[str, Any]:
    from carv3d.scene.hashgrid import HashGridEncoding
    from carv3d.scene.hashgrid_triton import DEFAULT_BLOCK_POINTS, TritonHashGridEncoding

    sizes = {"64x64x48": 64 * 64 * 48, "bench_speed_step": BENCH_POINTS} if not args.cpu_smoke else {"smoke": 512}
    if render_points and not args.cpu_smoke:
        sizes = {"render_64x64": int(render_points), **sizes}
    torch_enc = HashGridEncoding(*grid_args(grid_cfg), device=device)
    triton_enc = TritonHashGridEncoding(*grid_args(grid_cfg), device=device)
    blocks = (64, 128, 256, 512) if not args.cpu_smoke else (128,)
    out: dict[str, Any] = {"repeat": args.repeat, "blocks": list(blocks)}
    for label, n in sizes.items():
        x = torch.rand(n, 3, generator=torch.Generator().manual_seed(1)).to(device)
        u = torch.randn(n, torch_enc.n_output_dims, generator=torch.Generator().manual_seed(2)).to(device)
        entry: dict[str, Any] = {"points": n}

        def fwd_bwd(enc: torch.nn.Module) -> None:
            enc.params.grad = None
            (enc(x) * u).sum().backward()

        def fwd(enc: torch.nn.Module) -> None:
            with torch.no_grad():
                enc(x)

        entry["torch"] = {"forward_ms": timed(device, lambda: fwd(torch_enc), args.repeat),
                          "forward_backward_ms": timed(device, lambda: fwd_bwd(torch_enc), args.repeat)}
        for block in blocks:
            triton_enc.block_points = block
            entry[f"triton_block{block}"] = {"forward_ms": timed(device, lambda: fwd(triton_enc), args.repeat),
                                             "forward_backward_ms": timed(device, lambda: fwd_bwd(triton_enc), args.repeat)}
        best = min((k for k in entry if k.startswith("triton_")), key=lambda k: entry[k]["forward_backward_ms"])
        entry["best_triton"] = best
        entry["speedup_forward_backward"] = entry["torch"]["forward_backward_ms"] / entry[best]["forward_backward_ms"]
        out[label] = entry
    triton_enc.block_points = DEFAULT_BLOCK_POINTS
    return out


def section_bench_speed(args: argparse.Namespace, out_dir: Path, deadline: float) -> dict[str, Any]:
    target = out_dir / "bench_speed_quick.json"
    if args.cpu_smoke:  # the plumbing only: the interpreter is far too slow for a training step
        extra = ["--device", "cpu", "--tiny", "--grids", "torch", "--samplers", "stratified", "--teachers", "eager",
                 "--draws", "1", "--warmup", "1", "--steps", "1"]
    else:
        extra = ["--grids", "torch,triton", "--samplers", "occupancy_grid", "--teachers", "fast"]
    budget = max(deadline - time.time() - 15, 20)
    command = [sys.executable, "scripts/bench_speed.py", "--quick", *extra, "--out", str(target),
               "--budget-s", f"{max(budget - 40, 10):.0f}"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.time()
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=budget, env=env)
    out: dict[str, Any] = {"command": " ".join(command[1:]), "returncode": proc.returncode,
                           "seconds": time.time() - started, "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    if target.exists():
        report = json.loads(target.read_text())
        out["results"] = [{k: r.get(k) for k in ("name", "status", "reason", "ms_per_step_median", "it_per_s",
                                                  "split_ms", "peak_memory_gb", "hash_grid_backend", "sampler")}
                          for r in report.get("results", [])]
    return out


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for gpu_check_hashgrid.json (and bench_speed_quick.json)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=215.0, help="stop starting sections after this many seconds")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    parser.add_argument("--no-compile-head", dest="compile_head", action="store_false",
                        help="skip the render section's scene.compile_head=true variant (it adds its compile time)")
    args = parser.parse_args(argv)
    started = time.time()
    deadline = started + args.budget_s
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_check_hashgrid.json"

    from carv3d.config import load_config
    from carv3d.log import setup_logging

    setup_logging()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    # sizes: the real grid on the GPU, a tiny one through the interpreter
    smoke_overrides = ["scene.grid.n_levels=4", "scene.grid.log2_hashmap_size=10", "render.width=6", "render.height=6",
                       "render.samples_per_ray=6", "render.sampler=stratified", "scene.mlp_width=16"]
    overrides = smoke_overrides if args.cpu_smoke else []
    grid_cfg = load_config(REPO_ROOT / "configs" / "sd21.yaml", overrides, "a red cube").scene.grid
    args.points = 1024 if args.cpu_smoke else 1 << 20
    args.repeat = 1 if args.cpu_smoke else 20
    args.render_warmup, args.render_iters = (0, 1) if args.cpu_smoke else (5, 20)

    report: dict[str, Any] = {
        "command": " ".join(["scripts/gpu_check_hashgrid.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(), "torch": torch.__version__,
        "device": str(device), "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "cpu_smoke": args.cpu_smoke, "sections": {}, "status": "running",
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001 — recorded; the sections that need it fail below
        report["triton"] = f"unavailable: {err}"
    write_json(path, report)

    render_points = None
    skip = set(filter(None, args.skip.split(",")))
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("correctness", lambda: section_correctness(args, device, grid_cfg)),
        ("render", lambda: section_render(args, device, overrides)),
        ("encode", lambda: section_encode(args, device, grid_cfg, render_points)),
        ("profile", lambda: section_profile(args, device, overrides)),
        ("bench_speed", lambda: section_bench_speed(args, out_dir, deadline)),
    ]
    for name, run in sections:
        if name in skip:
            report["sections"][name] = {"status": "skipped", "reason": "--skip"}
        elif time.time() > deadline - 20:
            report["sections"][name] = {"status": "skipped", "reason": f"budget of {args.budget_s:.0f} s used up"}
        else:
            log(f"section {name}")
            t0 = time.time()
            try:
                result = run()
                result.update(status="ok", seconds=time.time() - t0)
            except Exception as err:  # noqa: BLE001 — one failing section must not lose the others
                result = {"status": "error", "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()[-3000:], "seconds": time.time() - t0}
            report["sections"][name] = result
            if name == "render" and result["status"] == "ok":
                render_points = result["triton"]["encoded_points_per_render_median"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"{name}: {report['sections'][name].get('status')} {report['sections'][name].get('error', '')}")
        report["summary"] = summarise(report["sections"])
        write_json(path, report)
    report["status"] = "finished"
    report["elapsed_seconds"] = time.time() - started
    write_json(path, report)
    log(f"done in {report['elapsed_seconds']:.0f} s: {json.dumps(report['summary'])}")
    return 0


def summarise(sections: dict[str, Any]) -> dict[str, Any]:
    """The numbers to read first (absent where a section did not run)."""
    s: dict[str, Any] = {}
    c = sections.get("correctness", {})
    if c.get("status") == "ok":
        s["correct"] = c["ok"]
        s["correct_fp32_forward_rel_err"] = c["float32"]["forward"]["triton_vs_torch"]
        s["correct_fp16_grad_table_err_vs_fp64"] = c["float16"]["grad_table"]["err_vs_fp64"]
    r = sections.get("render", {})
    if r.get("status") == "ok":
        s["render_backward_ms"] = {b: r[b]["render_backward_ms_median"] for b in r if isinstance(r[b], dict)
                                   and "render_backward_ms_median" in r[b]}
        s["render_backward_bar_8ms_met"] = r["bar_met"]
        s["render_points"] = r["triton"]["encoded_points_per_render_median"]
    e = sections.get("encode", {})
    if e.get("status") == "ok":
        s["encode_forward_backward_ms"] = {
            label: {"torch": v["torch"]["forward_backward_ms"], v["best_triton"]: v[v["best_triton"]]["forward_backward_ms"]}
            for label, v in e.items() if isinstance(v, dict) and "torch" in v}
    p = sections.get("profile", {})
    if p.get("status") == "ok":
        s["profile_top3"] = [(t["name"][:60], round(t["share"], 3)) for t in p["top"][:3]]
        s["profile_kernels_per_render_backward"] = p["kernels_per_iteration"]
    b = sections.get("bench_speed", {})
    if b.get("results"):
        s["bench_speed_ms_per_step"] = {r["name"]: r.get("ms_per_step_median") for r in b["results"]}
    return s


if __name__ == "__main__":
    sys.exit(main())
