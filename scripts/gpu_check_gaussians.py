#!/usr/bin/env python
"""Gaussian splats on a CUDA machine: gsplat against carv3d's torch rasteriser, gsplat's JIT time,
render speed at 512², a short world-quality run on the embedded teacher, and (separately) the
distillation step at Stable Diffusion 2.1-base scale.

    python scripts/gpu_check_gaussians.py OUT_DIR                       # env, jit, agreement, timing, quality (≤ 4 min)
    python scripts/gpu_check_gaussians.py OUT_DIR --sections sd21       # the SD 2.1-scale step (≤ 4 min)
    python scripts/gpu_check_gaussians.py OUT_DIR --cpu-smoke           # every section, tiny, on the CPU

Writes ``OUT_DIR/gaussians_gpu_check.json`` (``..._sd21.json`` for the sd21 section, ``..._cpu_smoke.json``
for the smoke run), rewritten after every section; a section that fails records its error and the
others still run. Sections:

- ``env``: torch, CUDA, the card, gsplat's version.
- ``jit``: seconds to import gsplat and to build or load its CUDA extension (first use).
- ``agreement``: the same Gaussians and cameras through both rasterisers (gsplat; torch on the same
  device): max |Δ| of images and alpha, and ‖Δg‖ / ‖g‖ of the gradients of a random linear loss with
  respect to means, log-scales, quaternions, opacity logits, features and the projected means (the
  view-space gradient of density control), the share of equal radii; ``passed`` against tolerances.
- ``timing``: gsplat forward and forward + backward of N ∈ {10k, 100k} Gaussians at 512² (median ms of
  CUDA-event-timed repeats), the torch rasteriser for 10k, and a GaussianScene render + backward.
- ``quality``: the six world prompts of ``bench_world_quality`` trained side by side (6 processes, as
  the NeRF's docs/quality_h200.json) with the default (carv) estimator preset and ``scene.type=gaussians``,
  evaluated (16 views, 64 px, no mesh) after 5, 10, 15, 20 and 27.5 s of training clock — half the
  NeRF's 55 s: the curve, the bar (IoU ≥ 0.9, best match 6/6, fronts right) and the NeRF's numbers.
- ``sd21``: random-weight SD 2.1-base teacher, 512² Gaussian render, K = 1, 8, 16 (R = 1): ms per step
  and its split (render / encode / teacher / backward / optimizer), peak memory; and a 1,000-step run
  end to end (startup, training, export) with its wall clock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ("a red cube", "a blue sphere", "a green torus", "a blue house", "a yellow duck", "an orange chair")
QUALITY_CHECKPOINTS = (5.0, 10.0, 15.0, 20.0, 27.5)  # seconds of training clock; the NeRF's run took ≈ 55 s
# The Gaussian keys of the quality run on top of the default (GPU) config; recorded in the JSON.
# The pixel teacher's view-space gradients are larger than DreamGaussian's SD-latent ones (its 0.01 would
# split nearly every Gaussian every 50 steps): the threshold is scaled to them (configs/gaussians_demo_cpu.yaml).
# A budget of 4× the initial 5,000 Gaussians: past it, only the largest gradients still clone or split.
QUALITY_OVERRIDES = ("scene.type=gaussians", "scene.density.grad_threshold=0.5", "scene.density.max_gaussians=20000",
                     "train.turntable_frames=0", "train.progress=false", "train.tensorboard=false", "train.val_every=0",
                     "export.at_end=false")
RUN_OVERRIDES = ("train.turntable_frames=0", "train.progress=false", "train.tensorboard=false", "train.val_every=0",
                 "export.at_end=false")
NERF_CHECKPOINTS = (5.0, 10.0, 15.0, 20.0, 27.5, 40.0, 55.0)  # the NeRF side by side, to its 55 s
TOLERANCE = {"image_max_abs": 2e-4, "alpha_max_abs": 2e-4, "gradient_relative": 2e-3, "radii_equal_share": 0.999}


def write_report(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def section(report: dict, path: Path, name: str, fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        report[name] = fn()
    except Exception as err:  # one failing section never costs the others
        report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    if isinstance(report[name], dict):
        report[name]["section_seconds"] = round(time.perf_counter() - started, 2)
    write_report(path, report)
    print(f"[gpu_check_gaussians] {name}: {time.perf_counter() - started:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------ sections
def env_section(device) -> dict:
    import torch

    from carv3d.scene.gaussians_gsplat import gsplat_installed

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "gsplat_installed": gsplat_installed()}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
    if info["gsplat_installed"]:
        import importlib.metadata

        info["gsplat"] = importlib.metadata.version("gsplat")
    return info


def jit_section(device) -> dict:
    from carv3d.devices import warm_up_gsplat

    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    started = time.perf_counter()
    import gsplat  # noqa: F401

    imported = time.perf_counter() - started
    return {"import_seconds": round(imported, 2), "first_use_seconds": round(warm_up_gsplat() or 0.0, 2),
            "note": "first_use_seconds is the JIT build on a fresh machine, a load from torch's cache otherwise"}


def random_gaussians(n: int, device, seed: int = 0, extent: float = 0.5):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2 * extent
    log_scales = (0.01 + 0.04 * torch.rand(n, 3, generator=g)).log()
    quats = torch.randn(n, 4, generator=g)
    opacity_logits = torch.randn(n, generator=g)
    return [t.to(device) for t in (means, log_scales, quats, opacity_logits)]


def cameras(batch: int, device, seed: int = 1):
    import torch

    from carv3d.cameras import make_cameras

    g = torch.Generator().manual_seed(seed)
    elevation = -10 + 70 * torch.rand(batch, generator=g)
    azimuth = -180 + 360 * torch.rand(batch, generator=g)
    return make_cameras(elevation, azimuth, torch.full((batch,), 1.6), torch.full((batch,), 50.0)).to(device)


def both_rasterisers(n: int, batch: int, size: int, channels: int, device, seed: int = 0) -> dict:
    """Images and gradients of one random scene through gsplat and the torch rasteriser."""
    import torch

    from carv3d.scene.gaussians_gsplat import rasterize_gsplat
    from carv3d.scene.gaussians_model import covariance
    from carv3d.scene.gaussians_raster import camera_matrices, project, rasterize

    params = random_gaussians(n, device, seed)
    features = torch.rand(batch, n, channels, generator=torch.Generator().manual_seed(seed + 2)).to(device)
    cams = cameras(batch, device, seed + 3)
    viewmats, ks = camera_matrices(cams, size, size)
    weights = torch.randn(batch, size, size, channels + 1, generator=torch.Generator().manual_seed(seed + 4)).to(device)
    out = {}
    for name in ("gsplat", "torch"):
        leaves = [p.clone().requires_grad_(True) for p in params] + [features.clone().requires_grad_(True)]
        means, log_scales, quats, opacity_logits, feats = leaves
        if name == "gsplat":
            images, alpha, meta = rasterize_gsplat(means, quats, log_scales.exp(), torch.sigmoid(opacity_logits), feats,
                                                   viewmats, ks, size, size)
            means2d, radii = meta["means2d"], meta["radii"]
        else:
            opacities = torch.sigmoid(opacity_logits)
            projection = project(means, covariance(quats, log_scales.exp()), viewmats, ks, size, size, opacities)
            images, alpha = rasterize(projection, opacities, feats, size, size)
            means2d, radii = projection.means2d, projection.radii
        means2d.retain_grad()
        loss = (torch.cat([images, alpha], dim=-1) * weights).sum()
        loss.backward()
        out[name] = {"images": images.detach(), "alpha": alpha.detach(), "radii": radii.detach(),
                     "grads": {k: v.grad for k, v in zip(("means", "log_scales", "quats", "opacity_logits", "features"),
                                                          leaves)} | {"means2d": means2d.grad}}
    return out


def agreement_section(device) -> dict:
    import torch

    from carv3d.scene.gaussians_gsplat import gsplat_installed

    if device.type != "cuda" or not gsplat_installed():
        return {"skipped": "needs CUDA and gsplat"}
    cases = []
    for n, batch, size, channels in ((500, 2, 64, 4), (5000, 2, 128, 4), (20000, 1, 256, 7)):
        res = both_rasterisers(n, batch, size, channels, device)
        ref, ours = res["gsplat"], res["torch"]
        case = {"gaussians": n, "cameras": batch, "size": size, "channels": channels,
                "image_max_abs": float((ref["images"] - ours["images"]).abs().max()),
                "alpha_max_abs": float((ref["alpha"] - ours["alpha"]).abs().max()),
                "alpha_mean": float(ref["alpha"].mean()),
                "radii_equal_share": float((ref["radii"].to(torch.int32) == ours["radii"]).all(-1).float().mean()),
                "gradient_relative": {}}
        for key, g_ref in ref["grads"].items():
            g_ours = ours["grads"][key]
            if g_ref is None or g_ours is None:
                case["gradient_relative"][key] = None
                continue
            case["gradient_relative"][key] = float((g_ref - g_ours).norm() / g_ref.norm().clamp_min(1e-30))
        worst = max(v for v in case["gradient_relative"].values() if v is not None)
        case["passed"] = (case["image_max_abs"] <= TOLERANCE["image_max_abs"]
                          and case["alpha_max_abs"] <= TOLERANCE["alpha_max_abs"]
                          and worst <= TOLERANCE["gradient_relative"]
                          and case["radii_equal_share"] >= TOLERANCE["radii_equal_share"])
        cases.append(case)
    return {"tolerance": TOLERANCE, "cases": cases, "passed": all(c["passed"] for c in cases)}


def timed_ms(fn: Callable[[], Any], device, repeats: int = 20, warmup: int = 3, max_seconds: float = 20.0) -> dict:
    """Median and min milliseconds of ``fn`` (CUDA events on CUDA)."""
    from carv3d.testing.timing import call_times_ms

    times = sorted(call_times_ms(fn, device, repeats, warmup, max_seconds))
    return {"median_ms": round(times[len(times) // 2], 3), "min_ms": round(times[0], 3), "repeats": len(times)}


def timing_section(device, smoke: bool) -> dict:
    import torch

    from carv3d.config import load_config
    from carv3d.scene import build_scene
    from carv3d.scene.gaussians_gsplat import gsplat_installed, rasterize_gsplat
    from carv3d.scene.gaussians_model import covariance
    from carv3d.scene.gaussians_raster import camera_matrices, project, rasterize

    size = 64 if smoke else 512
    result: dict[str, Any] = {"size": size}
    cams = cameras(1, device)
    viewmats, ks = camera_matrices(cams, size, size)

    def bench(backend: str, n: int, backward: bool) -> dict:
        means, log_scales, quats, opacity_logits = [p.requires_grad_(True) for p in random_gaussians(n, device)]
        colours = torch.rand(1, n, 3, device=device, requires_grad=True)

        def run():
            opacities = torch.sigmoid(opacity_logits)
            if backend == "gsplat":
                images, alpha, _ = rasterize_gsplat(means, quats, log_scales.exp(), opacities, colours, viewmats, ks,
                                                    size, size)
            else:
                proj = project(means, covariance(quats, log_scales.exp()), viewmats, ks, size, size, opacities)
                images, alpha = rasterize(proj, opacities, colours, size, size)
            if backward:
                (images.sum() + alpha.sum()).backward()

        with torch.no_grad() if not backward else torch.enable_grad():
            return timed_ms(run, device, repeats=5 if backend == "torch" else 20)

    counts = (200, 1000) if smoke else (10_000, 100_000)
    if device.type == "cuda" and gsplat_installed():
        for n in counts:
            result[f"gsplat_{n}_forward"] = bench("gsplat", n, backward=False)
            result[f"gsplat_{n}_forward_backward"] = bench("gsplat", n, backward=True)
    result[f"torch_{counts[0]}_forward_backward"] = bench("torch", counts[0], backward=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = load_config(overrides=["scene.type=gaussians", f"scene.n_points={counts[0]}", f"render.width={size}",
                                 f"render.height={size}"])
    scene = build_scene(cfg.scene, cfg.render, device, 0)
    generator = torch.Generator(device=device).manual_seed(0)

    def scene_step():
        out = scene.render(cams, generator=generator, shading="albedo")
        out.rgb.sum().backward()

    result["scene_render_backward"] = {"rasterizer": scene.rasterizer, "gaussians": counts[0],
                                       **timed_ms(scene_step, device, repeats=10)}
    if device.type == "cuda":
        result["scene_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result


def quality_job(job: dict) -> dict:
    """Train one world prompt in slices of the training clock, evaluating after each (a worker process)."""
    try:
        import torch

        from carv3d.config import load_config
        from carv3d.train import Trainer
        from carv3d.world.evaluate import evaluate_scene, truth_lighting_for

        cfg = load_config(None, list(job["overrides"]), job["prompt"])
        started = time.perf_counter()
        trainer = Trainer(cfg)
        startup = time.perf_counter() - started
        curve = []
        for budget in job["checkpoints"]:
            trainer.train_until(budget)
            trainer.scene.eval()
            with torch.no_grad():
                result = evaluate_scene(trainer.scene, job["prompt"], views=job["views"], resolution=job["resolution"],
                                        compare_all_objects=job["compare_all"],
                                        truth_lighting=truth_lighting_for(str(cfg.render.shading)))
            trainer.scene.train()
            curve.append({"seconds": round(trainer.elapsed_seconds, 2), "step": trainer.step,
                          "gaussians": len(trainer.scene.gaussians) if hasattr(trainer.scene, "gaussians") else None,
                          "silhouette_iou": result["silhouette_iou"],
                          "best_match": result["best_match"], "best_match_is_prompted": result["best_match_is_prompted"],
                          "front_matches_front": result["front_matches_front"]})
        return {"prompt": job["prompt"], "scene": job["scene"], "startup_seconds": round(startup, 2),
                "backends": trainer.scene.backends,
                "curve": curve, **{k: curve[-1][k] for k in ("silhouette_iou", "best_match_is_prompted",
                                                             "front_matches_front", "seconds", "step", "gaussians")}}
    except Exception as err:
        return {"prompt": job["prompt"], "scene": job.get("scene"), "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-3000:]}


def quality_section(device, smoke: bool, parallel: int, extra: list[str], with_nerf: bool = False) -> dict:
    from carv3d.devices import warm_up_gsplat
    from carv3d.workers import run_in_workers

    warm_up_gsplat()  # build or load the extension once here, not in six workers at once
    overrides = list(QUALITY_OVERRIDES) + [f"train.device={device.type}", "train.steps=100000000", *extra]
    checkpoints = (1.0, 2.0) if smoke else QUALITY_CHECKPOINTS
    prompts = PROMPTS[:2] if smoke else PROMPTS
    if smoke:
        overrides += ["scene.n_points=200", "render.width=16", "render.height=16", "estimator.max_noise_draws=2"]
    evaluation = {"views": 12, "resolution": 16, "compare_all": False} if smoke else \
        {"views": 16, "resolution": 64, "compare_all": True}
    jobs = [{"prompt": p, "overrides": overrides, "checkpoints": checkpoints, "scene": "gaussians", **evaluation}
            for p in prompts]
    if with_nerf:  # the default NeRF config side by side, same machine, same moment
        from carv3d.devices import warm_up_cuda_extensions

        warm_up_cuda_extensions()
        nerf_overrides = list(RUN_OVERRIDES) + [f"train.device={device.type}", "train.steps=100000000"]
        if smoke:
            nerf_overrides += ["render.width=16", "render.height=16", "estimator.max_noise_draws=2"]
        jobs += [{"prompt": p, "overrides": nerf_overrides, "checkpoints": checkpoints if smoke else NERF_CHECKPOINTS,
                  "scene": "nerf", **evaluation} for p in prompts]
    rows: list[dict] = []
    run_in_workers(jobs, 1 if smoke else parallel * (2 if with_nerf else 1), 2, rows.append, quality_job)
    nerf_rows = [r for r in rows if r.get("scene") == "nerf"]
    rows = [r for r in rows if r.get("scene") != "nerf"]
    rows.sort(key=lambda r: PROMPTS.index(r["prompt"]))
    nerf_rows.sort(key=lambda r: PROMPTS.index(r["prompt"]))
    done = [r for r in rows if "error" not in r]
    fronts = [r["front_matches_front"] for r in done if r["front_matches_front"] is not None]
    mean_iou = sum(r["silhouette_iou"] for r in done) / len(done) if done else None
    nerf = None
    nerf_file = REPO_ROOT / "docs" / "quality_h200.json"  # tracked: present in any checkout
    if nerf_file.is_file():
        data = json.loads(nerf_file.read_text())
        nerf = {"file": "docs/quality_h200.json", "bar": data.get("bar"),
                "seconds": [r.get("seconds") for r in data.get("rows", [])]}
    return {"overrides": overrides, "checkpoints_seconds": list(checkpoints), "parallel": parallel,
            "evaluation": evaluation, "rows": rows,
            "bar": {"mean_silhouette_iou": mean_iou, "iou_met": mean_iou is not None and mean_iou >= 0.9,
                    "best_match_all_prompted": bool(done) and all(bool(r["best_match_is_prompted"]) for r in done),
                    "fronts_right": f"{sum(fronts)}/{len(fronts)}", "prompts_done": len(done)},
            "nerf_reference": nerf, "nerf_side_by_side": nerf_rows or None}


def sd21_section(device, smoke: bool) -> dict:
    import torch

    from carv3d.config import load_config
    from carv3d.step import DistillationStep
    from carv3d.testing.random_sd import temporary_random_stable_diffusion
    from carv3d.train import train

    started = time.perf_counter()
    folder, path = temporary_random_stable_diffusion("sd21") if not smoke else (None, None)
    if smoke:
        from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion
        import tempfile

        folder = tempfile.TemporaryDirectory()
        path = build_tiny_stable_diffusion(Path(folder.name) / "tiny", seed=0)
    built = time.perf_counter() - started
    size = 64 if smoke else 512
    base = [f"teacher.pretrained={path}", "scene.type=gaussians", f"render.width={size}", f"render.height={size}",
            f"scene.n_points={200 if smoke else 5000}",
            "render.shading=albedo", "render.background=random", "estimator.upstream_samples=1",
            f"train.device={device.type}"]
    if not smoke:
        base.append("teacher.resolution=512")
    result: dict[str, Any] = {"model_build_seconds": round(built, 1), "size": size, "steps": {}}
    try:
        for k in (1, 2) if smoke else (1, 8, 16):
            cfg = load_config(None, base + [f"estimator.noise_draws={k}"], "a red cube")
            step = DistillationStep.from_config(cfg, device)
            params = step.parameters()
            optimizer = torch.optim.Adam(step.scene.parameter_groups(cfg.optim), eps=1e-15)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def one(i=[0]):
                optimizer.zero_grad(set_to_none=True)
                step(i[0])
                with step.timer("optimizer"):
                    optimizer.step()
                i[0] += 1

            for _ in range(3):
                one()
            step.timing_metrics(1)  # reset the section clocks after the warm-up
            timing = timed_ms(one, device, repeats=3 if smoke else 20, warmup=0)
            split = step.timing_metrics(timing["repeats"])
            result["steps"][f"K={k}"] = {**timing, "split_ms": {k2: round(v, 3) for k2, v in split.items()},
                                        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
                                        if device.type == "cuda" else None, "parameters": sum(p.numel() for p in params)}
            del step, optimizer
        out_dir = Path(folder.name) / "runs"
        steps = 5 if smoke else 1000
        cfg = load_config(REPO_ROOT / "configs" / "gaussians_sd21.yaml",
                          [f"teacher.pretrained={path}", f"train.steps={steps}", f"train.output_dir={out_dir}",
                           "train.progress=false", "train.tensorboard=false", f"train.device={device.type}"]
                          + (["render.width=64", "render.height=64", "teacher.resolution=0", "train.turntable_frames=2",
                              "scene.n_points=200",
                              "train.val_resolution=32", "export.resolution=32"] if smoke else []),
                          "a red cube")
        t0 = time.perf_counter()
        run_dir = train(cfg)
        total = time.perf_counter() - t0
        status = json.loads((run_dir / "run.json").read_text())
        result["end_to_end"] = {"steps": steps, "wall_seconds": round(total, 1),
                                "training_seconds": round(status.get("elapsed_seconds", math.nan), 1),
                                "outputs_failed": status.get("outputs_failed"), "bar_seconds": 180,
                                "files": sorted(p.name for p in (run_dir / "mesh").glob("*"))}
    finally:
        folder.cleanup()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for the JSON report")
    parser.add_argument("--sections", default="env,jit,agreement,timing,quality",
                        help="comma-separated: env, jit, agreement, timing, quality, sd21")
    parser.add_argument("--cpu-smoke", action="store_true", help="every section tiny, on the CPU (checks the script)")
    parser.add_argument("--parallel", type=int, default=6, help="quality: prompts trained side by side")
    parser.add_argument("--with-nerf", action="store_true",
                        help="quality: also train the default NeRF side by side to 55 s (needs nerfacc's build, ~65 s)")
    parser.add_argument("--quality-overrides", nargs="*", default=[], metavar="key=value",
                        help="quality: more config overrides (e.g. scene.density.grad_threshold=0.3)")
    args = parser.parse_args()

    import torch

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if smoke and args.sections == parser.get_default("sections"):
        sections = ["env", "jit", "agreement", "timing", "quality", "sd21"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_cpu_smoke" if smoke else ("_sd21" if sections == ["sd21"] else "")
    path = out / f"gaussians_gpu_check{suffix}.json"
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    report: dict[str, Any] = {"command": " ".join(["python", "scripts/gpu_check_gaussians.py", *sys.argv[1:]]),
                              "commit": commit.stdout.strip() or None,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": sections}
    runners = {"env": lambda: env_section(device), "jit": lambda: jit_section(device),
               "agreement": lambda: agreement_section(device), "timing": lambda: timing_section(device, smoke),
               "quality": lambda: quality_section(device, smoke, args.parallel, list(args.quality_overrides),
                                                  args.with_nerf),
               "sd21": lambda: sd21_section(device, smoke)}
    for name in sections:
        if name not in runners:
            print(f"unknown section '{name}'; expected some of {', '.join(runners)}", file=sys.stderr)
            return 2
        section(report, path, name, runners[name])
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
