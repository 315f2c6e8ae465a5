#!/usr/bin/env python
"""GPU check of variational score distillation (guidance.type vsd): correctness, step cost at SD 2.1
scale, a projection per asset, and VSD+CARV against SDS+CARV on the embedded world.

    python scripts/gpu_check_vsd.py OUT_DIR                  # CUDA, ≤ 4 min; writes OUT_DIR/gpu_check_vsd.json
    python scripts/gpu_check_vsd.py OUT_DIR --cpu-smoke      # tiny models on the CPU: checks the script runs

Sections (each in its own try/except: a failure is recorded in the JSON and the next one runs; the
JSON is rewritten after every section and every configuration):

1. ``correctness`` — the tiny SD-shaped teacher on the device, fp32 and the teacher's own dtype
   (fp16 on CUDA): the VSD residual against the teacher's guided call minus a merged-weights U-Net
   (peft ``merge_and_unload``: W + (α/r)·B·A written into the weights), fused (one mixed-batch call)
   and separate; fp32 with TF32 off (TF32's ~1e-3 error would hide a mismatch), the teacher's dtype
   as it runs; the copy's CUDA-graph call against the eager one across LoRA updates; ε̂_φ at
   initialisation against the teacher's conditional prediction; the LoRA loss on
   a fixed batch over 30 steps; a non-finite LoRA step skipped on the device (fused AdamW's
   ``found_inf``: weights and step count unchanged).
2. ``sd21_step`` — a random-weight teacher with SD 2.1-base's shapes (``carv3d.testing.random_sd``,
   loaded through ``teacher.pretrained``), ``Trainer.train_step`` of configs/vsd_sd21.yaml at
   K = 1, 4, 8 (CARV preset; teacher and LoRA calls as CUDA graphs), K = 8 with one fused eager call, plain VSD (R = K = 1,
   uniform t: threestudio's step), and SDS (configs/sd21.yaml at CFG 7.5) at K = 1, 8 for the
   overhead; optionally VSD K = 8 at 512² renders (ProlificDreamer's resolution after step 5000).
   Per configuration: median ms/step over CUDA events, the step's split (render, encode, teacher,
   particle, backward, optimizer; the Trainer's own timers) and peak GPU memory.
3. ``projection`` — hours per asset for ProlificDreamer's NeRF stage (25,000 steps: 5,000 at 64²
   renders, 20,000 at 512²) from the measured step times, without and with an iteration saving
   factor for CARV (``--iteration-saving``, default 2: the paper's SDS figure, REFERENCE §1 —
   an assumption for VSD until measured). Stated as a projection with its assumptions in the JSON.
4. ``world`` — VSD+CARV (configs/vsd_world.yaml) against SDS+CARV (the default config) at equal
   training wall clock (``Trainer.train_until``), a couple of prompts × seeds side by side in
   worker processes, scored by ``carv3d.world.evaluate.evaluate_scene`` (silhouette IoU, masked
   colour error, PSNR, best match, front/back).

5. ``variance`` (only with ``--sections variance``, ~2–3 min on its own): a VSD world run of
   ``--variance-steps`` steps, then ``carv3d variance``'s grid at its checkpoint with the run's LoRA
   held fixed: VSD's variance, cost and ECM with CARV against uniform t, R = 2, K = 1 (bar: ECM ≥ 3).

    python scripts/gpu_check_vsd.py OUT_DIR --sections variance --budget-s 600

Look at: ``correctness.*.ok`` (``*.graph_matches_eager_after_updates``: the CUDA-graph prediction and
training paths against eager), ``sd21_step.results[*].ms_per_step_median / split_ms / peak_memory_gb``,
``sd21_step.vsd_over_sds_at_K8``, ``projection.hours``, ``world.summary``, ``variance.best_ecm``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))
for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_key, "1")

import torch  # noqa: E402

PROLIFICDREAMER_STEPS = (5000, 20000)  # threestudio prolificdreamer.yaml: 64² until step 5000, then 512², 25,000 in all
WORLD_PROMPTS = ("a red cube", "a blue house")
METRICS = ("silhouette_iou", "masked_colour_error", "psnr", "best_match", "best_match_is_prompted",
           "front_matches_front")


def log(message: str) -> None:
    print(f"[gpu_check_vsd {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, report: dict[str, Any]) -> None:
    from carv3d.io import write_json_report

    write_json_report(path, report)


def section(report: dict[str, Any], path: Path, name: str, fn: Callable[[], Any]) -> None:
    """Run one section; its result or its error goes into the report, which is written either way."""
    started = time.perf_counter()
    log(f"section {name}")
    try:
        report[name] = fn()
    except Exception as err:  # noqa: BLE001 — record and go on: one failure must not lose the rest
        report[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        log(f"section {name} failed: {type(err).__name__}: {err}")
    if isinstance(report[name], dict):
        report[name]["seconds"] = round(time.perf_counter() - started, 1)
    write_json(path, report)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------ 1. correctness
def correctness(device: torch.device, workdir: Path) -> dict[str, Any]:
    from carv3d.config import DiffusersTeacherConfig
    from carv3d.estimator import Draws, VariationalScoreDistillation
    from carv3d.estimator.timing import StepTimer
    from carv3d.step import TeacherPredictor
    from carv3d.teacher import load_teacher
    from carv3d.teacher.lora import LoRAParticle
    from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion

    folder = build_tiny_stable_diffusion(workdir / "tiny_sd", seed=0)
    dtypes = ["float32"] + (["float16"] if device.type == "cuda" else [])
    # fp32 checks in true fp32: TF32 matmuls (which main() and the Trainer turn on for speed) carry
    # ~1e-3 relative error, which would hide a real mismatch at the fp32 tolerance.
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    out: dict[str, Any] = {"tf32_during_fp32_checks": False}
    for dtype in dtypes:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype != "float32" and tf32[0]
        teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(folder), dtype=dtype, cuda_graph="off"), device)
        tol = 2e-5 if dtype == "float32" else 2e-2  # relative to the largest |residual|
        g = torch.Generator().manual_seed(0)
        labels = ["front", "side", "back", "overhead"]
        c2w = torch.eye(4).repeat(4, 1, 1)
        c2w[:, :3, 3] = torch.randn(4, 3, generator=g)
        emb = teacher.embed("a red cube")
        cond = teacher.conditioning(emb, labels, c2w.to(device))
        plain = teacher.conditioning(emb, [None] * 4, c2w.to(device))
        x = torch.randn(8, *teacher.latent_shape, generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.linspace(20, 979, 8).long().to(device)
        a = teacher.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        idx = torch.arange(8, device=device) % 4
        draws = Draws(x=x, x_t=a.sqrt() * x + (1 - a).sqrt() * noise, t=t, noise=noise, upstream_index=idx)
        result: dict[str, Any] = {"tolerance_relative": tol}

        particle = LoRAParticle(teacher, lr=1e-2, seed=0)
        phi0 = particle.predict_particle(draws.x_t, t, plain.select(idx))
        cond0 = teacher.predict_noise(draws.x_t, t, plain.select(idx), 1.0)
        err = float((phi0 - cond0).abs().max() / cond0.abs().max())
        result["init_equals_teacher"] = {"max_relative_error": err, "ok": err <= tol}

        gen = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad():
            for p in particle.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
        merged = copy.deepcopy(particle.model).merge_and_unload().eval()
        with torch.no_grad():
            phi_ref = merged(draws.x_t.to(teacher.dtype), t, plain.cond[idx].to(teacher.dtype),
                             class_labels=c2w.to(device)[idx].reshape(-1, 16)).sample.float()
        expected = teacher.predict_noise(draws.x_t, t, cond.select(idx), 7.5) - phi_ref
        predictor = TeacherPredictor(teacher, cond, 7.5, StepTimer(device), particle, plain)
        guidance = VariationalScoreDistillation(particle)
        for fused in (True, False):
            particle.fused_call = fused
            residual = guidance.residual(draws, predictor)
            err = float((residual - expected).abs().max() / expected.abs().max())
            result[f"residual_{'fused' if fused else 'separate'}"] = {"max_relative_error": err, "ok": err <= tol}
        del merged

        particle = LoRAParticle(teacher, lr=1e-2, seed=0)
        rows = plain.select(idx)
        losses = [float(particle.update(x, t, noise, rows)) for _ in range(30)]
        result["loss_decreases"] = {"first": losses[0], "last": losses[-1], "ok": losses[-1] < 0.9 * losses[0]}

        before = [p.detach().clone() for p in particle.parameters()]
        steps_before = [float(s["step"]) for s in particle.optimizer.state.values()]
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        loss = particle.update(bad, t, noise, rows)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, particle.parameters()))
        steps_after = [float(s["step"]) for s in particle.optimizer.state.values()]
        result["nonfinite_step_skipped"] = {"loss": float(loss), "weights_unchanged": unchanged,
                                            "adam_steps_unchanged": steps_before == steps_after,
                                            "sync_free": particle.sync_free,
                                            "ok": unchanged and steps_before == steps_after}
        if device.type == "cuda":  # the copy's CUDA graph must follow the LoRA's in-place updates
            graphed_teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(folder), dtype=dtype,
                                                                  cuda_graph="on"), device)
            graphed, eager = LoRAParticle(graphed_teacher, lr=1e-2, seed=0), LoRAParticle(teacher, lr=1e-2, seed=0)
            result.update(graph_against_eager(graphed, eager, draws, x, t, noise, rows, tol))
            del graphed, eager, graphed_teacher
        result["ok"] = all(v["ok"] for v in result.values() if isinstance(v, dict) and "ok" in v)
        out[dtype] = result
        log(f"correctness {dtype}: {json.dumps(result)}")
        del particle, teacher
        gc.collect()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def graph_against_eager(graphed: Any, eager: Any, draws: Any, x: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor, rows: Any, tol: float) -> dict[str, Any]:
    """The LoRA copy's CUDA graphs against its eager calls, one property at a time.

    1. Predictions before any update agree.
    2. The graphed training forward + backward gives the eager gradients of the LoRA weights.
    3. The prediction graph follows in-place weight updates: after each eager AdamW step its weights
       are copied into the graphed copy, whose next replay must match the eager prediction.
    4. Independent AdamW steps on both (not a pass/fail check): AdamW with ε = 1e-15 turns any
       rounding difference in a near-zero gradient element into a step of up to ±lr, so two bitwise
       different but equally correct gradient computations give weights apart by ~lr; the prediction
       error after a few steps measures that amplification, not a graph fault.
    """
    out: dict[str, Any] = {}
    before = relative_error(graphed.predict_particle(draws.x_t, t, rows), eager.predict_particle(draws.x_t, t, rows))
    out["graph_matches_eager_before_updates"] = {"max_relative_error": before, "ok": before <= tol}
    gradients = []
    for particle in (graphed, eager):
        particle.optimizer.zero_grad(set_to_none=True)
        particle.loss(x, t, noise, rows).backward()
        gradients.append(torch.cat([p.grad.detach().flatten().float() for p in particle.parameters()
                                    if p.grad is not None]))
        particle.optimizer.zero_grad(set_to_none=True)
    grad_error = relative_error(gradients[0], gradients[1]) if gradients[0].shape == gradients[1].shape else float("inf")
    out["graph_gradients_match_eager"] = {"max_relative_error": grad_error, "elements": int(gradients[1].numel()),
                                          "graphed_training": bool(graphed._graph_training), "ok": grad_error <= tol}
    errors = []
    for _ in range(3):
        eager.update(x, t, noise, rows)
        with torch.no_grad():
            for g, e in zip(graphed.parameters(), eager.parameters()):
                g.copy_(e)
        errors.append(relative_error(graphed.predict_particle(draws.x_t, t, rows), eager.predict_particle(draws.x_t, t, rows)))
    replays = getattr(graphed._particle_call, "replays", 0)
    out["graph_follows_weight_updates"] = {"max_relative_error": max(errors), "replays": replays,
                                           "ok": max(errors) <= tol and replays > 0}
    twin = type(eager)(eager.teacher, lr=1e-2, seed=0)  # a fresh eager copy stepped alongside the graphed one
    fresh = type(graphed)(graphed.teacher, lr=1e-2, seed=0)
    drift = []
    for _ in range(3):
        fresh.update(x, t, noise, rows)
        twin.update(x, t, noise, rows)
        drift.append(relative_error(fresh.predict_particle(draws.x_t, t, rows), twin.predict_particle(draws.x_t, t, rows)))
    out["independent_adamw_steps"] = {"max_relative_error": max(drift), "note": "informational: AdamW amplification, "
                                      "see graph_against_eager's docstring"}
    del twin, fresh
    return out


# ------------------------------------------------------------------------------------ 2. SD 2.1 step
def step_configs(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(name, config file, overrides) of the timed configurations."""
    vsd, sds = str(REPO_ROOT / "configs" / "vsd_sd21.yaml"), str(REPO_ROOT / "configs" / "sd21.yaml")
    ks = (1, 2) if args.cpu_smoke else (1, 4, 8)
    k_top = ks[-1]
    rows = [(f"vsd/carv/K{k}", vsd, [f"estimator.noise_draws={k}"]) for k in ks]
    rows += [(f"vsd/carv/K{k_top}/fused_call", vsd, [f"estimator.noise_draws={k_top}", "guidance.fused_call=true"]),
             ("vsd/plain/K1", vsd, ["estimator.preset=sds", "estimator.t_max_schedule=[]"]),
             ("sds/carv/K1", sds, ["estimator.noise_draws=1", "teacher.guidance_scale=7.5"]),
             (f"sds/carv/K{k_top}", sds, [f"estimator.noise_draws={k_top}", "teacher.guidance_scale=7.5"])]
    if args.render_512 and not args.cpu_smoke:
        rows.append((f"vsd/carv/K{k_top}/render512", vsd, [f"estimator.noise_draws={k_top}", "render.width=512",
                                                           "render.height=512"]))
    return rows


def time_steps(trainer: Any, steps: int, device: torch.device) -> list[float]:
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            trainer.train_step()
            end.record()
        synchronize(device)
        return [s.elapsed_time(e) / 1000.0 for s, e in events]
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def sd21_step(args: argparse.Namespace, device: torch.device, workdir: Path, report: dict[str, Any],
              path: Path, deadline: float) -> dict[str, Any]:
    from carv3d.config import load_config
    from carv3d.teacher import load_teacher
    from carv3d.train import Trainer

    t0 = time.perf_counter()
    if args.cpu_smoke:
        from carv3d.testing.tiny_teachers import build_tiny_stable_diffusion

        folder, scale = build_tiny_stable_diffusion(workdir / "tiny_sd_step", seed=0), "tiny"
    else:
        from carv3d.testing.random_sd import build_random_stable_diffusion

        folder, scale = build_random_stable_diffusion(workdir / "sd21", scale="sd21", seed=0, device=device), "sd21"
    out: dict[str, Any] = {"scale": scale, "sampler": args.sampler, "warmup": args.warmup, "steps": args.steps,
                           "model_build_seconds": round(time.perf_counter() - t0, 1), "results": []}
    report["sd21_step"] = out
    smoke = ["render.width=16", "render.height=16", "render.samples_per_ray=8", "scene.grid.n_levels=4",
             "scene.grid.log2_hashmap_size=12", "teacher.resolution=0"] if args.cpu_smoke else []
    teachers: dict[str, Any] = {}
    for name, config, overrides in step_configs(args):
        entry: dict[str, Any] = {"name": name, "config": Path(config).name, "overrides": overrides}
        out["results"].append(entry)
        if time.perf_counter() > deadline:
            entry.update(status="skipped", reason="time budget used up")
            continue
        try:
            cfg = load_config(config, [f"teacher.pretrained={folder}", f"train.device={device}",
                                       f"render.sampler={args.sampler}", "train.progress=false",
                                       "train.tensorboard=false", "train.seed=0", *smoke, *overrides], "a red cube")
            key = f"{cfg.teacher.guidance_scale}/{cfg.teacher.cuda_graph}"
            if key not in teachers:
                teachers[key] = load_teacher(cfg.teacher, device)
            teacher = teachers[key]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            trainer = Trainer(cfg, teacher=teacher)
            big = int(cfg.render.width) > 64  # 512² renders: seconds per step, a few steps say enough
            warmup, steps = (1, 3) if big else (args.warmup, args.steps)
            for _ in range(warmup):
                trainer.train_step()
            synchronize(device)
            trainer.timing_metrics()  # the split covers the timed steps only
            seconds = time_steps(trainer, steps, device)
            split = trainer.timing_metrics()
            median = statistics.median(seconds)
            entry.update(status="ok", guidance=str(cfg.guidance.type), noise_draws=int(trainer.estimator.noise_draws),
                         timed_steps=steps,
                         ms_per_step_median=1000 * median, ms_per_step_min=1000 * min(seconds), it_per_s=1 / median,
                         split_ms={k.replace("time_", "").replace("_ms", ""): v for k, v in split.items()},
                         peak_memory_gb=(torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None),
                         fast_paths=teacher.fast.describe(), sampler_used=trainer.scene.backends.get("sampler"))
            del trainer
            log(f"{name}: {entry['ms_per_step_median']:.1f} ms/step, split {entry['split_ms']}, "
                f"peak {entry['peak_memory_gb']} GB")
        except Exception as err:  # noqa: BLE001
            entry.update(status="error", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            log(f"{name}: error {type(err).__name__}: {err}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_json(path, report)
    ok = {r["name"]: r for r in out["results"] if r.get("status") == "ok"}
    k_top = 2 if args.cpu_smoke else 8
    if f"vsd/carv/K{k_top}" in ok and f"sds/carv/K{k_top}" in ok:
        out[f"vsd_over_sds_at_K{k_top}"] = (ok[f"vsd/carv/K{k_top}"]["ms_per_step_median"]
                                            / ok[f"sds/carv/K{k_top}"]["ms_per_step_median"])
    return out


# ------------------------------------------------------------------------------------ 3. projection
def measured_saving(path: str, arm: str) -> tuple[float, str]:
    """CARV's step saving measured by ``scripts/bench_quality.py``: in its JSON ``path``, the baseline's
    steps in the budget over ``arm``'s steps to reach the baseline's final mean IoU (summary.overall).
    Returns the factor and where it came from, in words."""
    report = json.loads(Path(path).read_text())
    versus = report["summary"]["overall"]["versus_baseline"]
    if arm not in versus:
        raise SystemExit(f"--saving-arm {arm!r} is not an arm of {path} compared with its baseline; "
                         f"arms: {', '.join(versus)}")
    steps, baseline_steps = versus[arm]["steps_to_baseline_final_iou"], versus[arm]["baseline_steps_in_budget"]
    if not steps or not baseline_steps:
        raise SystemExit(f"{path}: {arm} never reached the baseline's final IoU; no step saving to take from it")
    baseline = report["settings"].get("baseline", "the baseline")
    return baseline_steps / steps, (f"measured by bench_quality ({path}): {arm} reached {baseline}'s final mean IoU "
                                    f"in {steps:.0f} steps against {baseline_steps:.0f}; measured for that "
                                    "guidance and teacher, assumed to hold for VSD at SD scale")


def projection(step: dict[str, Any], saving: float, cpu_smoke: bool,
               saving_source: str = "--iteration-saving; the paper's SDS figure, not yet measured for VSD") -> dict[str, Any]:
    ok = {r["name"]: r for r in step.get("results", []) if r.get("status") == "ok"}
    k_top = 2 if cpu_smoke else 8
    low, high = PROLIFICDREAMER_STEPS
    out: dict[str, Any] = {
        "assumptions": [
            f"ProlificDreamer's NeRF stage: {low + high} steps, {low} at 64² renders and {high} at 512² "
            "(threestudio configs/prolificdreamer.yaml); its geometry and texture stages are not included",
            "each step costs the median ms/step measured here (random-weight SD 2.1-base shapes, this card)",
            f"CARV needs 1/{saving:.3g} of the iterations for the same quality ({saving_source})",
            "without a 512² measurement, the 512² steps are costed at the 64² step time (an underestimate)",
        ],
        "iteration_saving": saving, "hours": {},
    }
    plain = ok.get("vsd/plain/K1")
    carv64 = ok.get(f"vsd/carv/K{k_top}")
    carv512 = ok.get(f"vsd/carv/K{k_top}/render512") or carv64
    if plain:
        out["hours"]["plain_vsd_K1_64px_all_steps"] = (low + high) * plain["ms_per_step_median"] / 3.6e6
    if carv64:
        total_ms = low * carv64["ms_per_step_median"] + high * carv512["ms_per_step_median"]
        out["hours"][f"vsd_carv_K{k_top}_no_saving"] = total_ms / 3.6e6
        out["hours"][f"vsd_carv_K{k_top}_with_saving"] = total_ms / saving / 3.6e6
        out["render512_measured"] = carv512 is not carv64
        out["target_hours"] = 1.0
        out["within_target"] = total_ms / saving / 3.6e6 <= 1.0
    return out


# ------------------------------------------------------------------------------------ 4. world
def world_run(job: dict[str, Any]) -> dict[str, Any]:
    """One world run in a worker: train for the budget on the training clock, evaluate the live scene."""
    try:
        from carv3d.config import load_config
        from carv3d.train import Trainer
        from carv3d.world.evaluate import evaluate_scene, truth_lighting_for

        cfg = load_config(job["config"], job["overrides"], job["prompt"])
        trainer = Trainer(cfg)
        trainer.train_until(job["budget"])
        trainer.scene.eval()
        result = evaluate_scene(trainer.scene, job["prompt"], views=job["views"], resolution=job["resolution"],
                                truth_lighting=truth_lighting_for(str(cfg.render.shading)))
        return {**{k: job[k] for k in ("prompt", "seed", "method")}, "steps": trainer.step,
                "train_seconds": round(trainer.elapsed_seconds, 2),
                "ms_per_step": 1000 * trainer.elapsed_seconds / max(trainer.step, 1),
                **{m: result.get(m) for m in METRICS}}
    except Exception as err:  # noqa: BLE001 — the parent records it
        return {**{k: job[k] for k in ("prompt", "seed", "method")}, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-2000:]}


def world(args: argparse.Namespace, device: torch.device, deadline: float) -> dict[str, Any]:
    from carv3d.devices import warm_up_nerfacc
    from carv3d.workers import run_in_workers

    common = ["train.progress=false", "train.tensorboard=false", "train.turntable_frames=0", "export.at_end=false",
              "train.val_every=0", "train.checkpoint_every=0", f"train.device={device}"]
    if args.cpu_smoke:
        configs = {"sds": str(REPO_ROOT / "configs" / "demo_cpu.yaml"), "vsd": str(REPO_ROOT / "configs" / "vsd_cpu.yaml")}
        common += ["render.width=16", "render.height=16", "render.samples_per_ray=16"]
        views, resolution, parallel = 12, 16, 1
    else:
        configs = {"sds": None, "vsd": str(REPO_ROOT / "configs" / "vsd_world.yaml")}
        common.append(f"render.sampler={args.world_sampler}")
        views, resolution, parallel = 16, 64, len(args.world_prompts) * args.world_seeds * 2
    warm = warm_up_nerfacc() if device.type == "cuda" and args.world_sampler != "stratified" else None
    jobs_n = len(args.world_prompts) * args.world_seeds * 2
    rounds = -(-jobs_n // parallel)
    remaining = deadline - time.perf_counter() - 25.0 * rounds  # start-up and evaluation per round
    budget = max(2.0, min(args.world_seconds, remaining / rounds))
    jobs = []
    for prompt in args.world_prompts:
        for seed in range(args.world_seeds):
            for method in ("sds", "vsd"):
                jobs.append({"prompt": prompt, "seed": seed, "method": method, "config": configs[method],
                             "overrides": [*common, f"train.seed={seed}"], "budget": budget, "views": views,
                             "resolution": resolution})
    rows: list[dict[str, Any]] = []
    threads = max(1, (os.cpu_count() or 1) // parallel)
    run_in_workers(jobs, parallel, threads, rows.append, worker=world_run)
    summary: dict[str, Any] = {}
    for method in ("sds", "vsd"):
        done = [r for r in rows if r["method"] == method and "error" not in r]
        summary[method] = {
            "runs": len(done),
            **{f"mean_{m}": (statistics.fmean(float(r[m]) for r in done if r.get(m) is not None)
                             if any(r.get(m) is not None for r in done) else None)
               for m in ("silhouette_iou", "masked_colour_error", "psnr", "best_match_is_prompted",
                         "front_matches_front", "steps", "ms_per_step")},
        }
    return {"budget_seconds_each": budget, "sampler": args.world_sampler, "nerfacc_warm_up_seconds": warm,
            "parallel": parallel, "configs": configs, "runs": rows, "summary": summary,
            "note": "equal training wall clock per run (Trainer.train_until); runs side by side share the device"}


# ------------------------------------------------------------------------------------ 5. variance (on request)
def variance(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """VSD's gradient variance with and without CARV at a mid-training VSD scene: train a world run
    (configs/vsd_world.yaml) for ``--variance-steps`` steps, then ``carv3d variance``'s measurement at
    its checkpoint with the run's LoRA held fixed. ECM of each row is against uniform t, R = 2, K = 1."""
    from carv3d.checkpoint import latest_checkpoint, load_checkpoint
    from carv3d.commands.variance import parse_rk
    from carv3d.config import load_config
    from carv3d.step import guidance_state, scene_state
    from carv3d.train import train
    from carv3d.variance import FrozenScene, format_table, mark_few_draws, measure

    config = str(REPO_ROOT / "configs" / ("vsd_cpu.yaml" if args.cpu_smoke else "vsd_world.yaml"))
    smoke = ["render.width=16", "render.height=16", "render.samples_per_ray=16"] if args.cpu_smoke else []
    cfg = load_config(config, [f"train.steps={args.variance_steps}", f"train.output_dir={workdir / 'runs'}",
                               "train.run_name=vsd_variance", "train.val_every=0", "export.at_end=false",
                               "train.turntable_frames=0", "train.progress=false", "train.tensorboard=false",
                               f"train.device={device}", f"render.sampler={args.world_sampler}", *smoke],
                      args.world_prompts[0])
    started = time.perf_counter()
    run_dir = train(cfg)
    train_seconds = time.perf_counter() - started
    state = load_checkpoint(latest_checkpoint(run_dir), map_location=device)
    run_cfg = load_config(run_dir / "config.yaml")
    scene = FrozenScene(run_cfg, device, scene_state(state), seed=0, guidance_state=guidance_state(state))
    report = measure(run_cfg, scene, args.variance_methods.split(","), parse_rk(args.variance_rk), args.variance_draws,
                     args.variance_pilot, camera_stratified=args.variance_camera_stratified, progress=False)
    mark_few_draws(report)
    log("variance (VSD):\n" + format_table(report))
    best = report["with_and_without_carv"].get("best")  # the best row with CARV
    return {"prompt": args.world_prompts[0], "config": Path(config).name, "train_steps": args.variance_steps,
            "train_seconds": train_seconds, "report": report, "best_ecm": best, "ecm_bar": 3.0,
            "ecm_bar_met": bool(best and best["ecm"] >= 3.0)}


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for gpu_check_vsd.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: check that every section runs")
    parser.add_argument("--budget-s", type=float, default=225.0, help="skip what is left after this many seconds")
    parser.add_argument("--sampler", default="stratified",
                        help="render.sampler of the step timings (occupancy_grid JIT-builds nerfacc on a fresh machine)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 10)")
    parser.add_argument("--no-render-512", dest="render_512", action="store_false",
                        help="skip the VSD step at 512² renders")
    parser.add_argument("--iteration-saving", type=float, default=2.0, help="CARV's assumed iteration saving factor")
    parser.add_argument("--saving-from", default=None, metavar="BENCH_QUALITY.json",
                        help="take the saving factor measured by scripts/bench_quality.py instead (with --saving-arm)")
    parser.add_argument("--saving-arm", default="preset_carv-guidance_type_sds",
                        help="the arm of --saving-from whose steps to the baseline's final IoU give the saving")
    parser.add_argument("--project-from", default=None, metavar="GPU_CHECK_VSD.json",
                        help="only recompute the projection from an earlier report's sd21_step (no device needed)")
    parser.add_argument("--world-prompts", nargs="+", default=list(WORLD_PROMPTS))
    parser.add_argument("--world-seeds", type=int, default=1)
    parser.add_argument("--world-seconds", type=float, default=45.0, help="training seconds per world run (at most)")
    parser.add_argument("--world-sampler", default="stratified", help="render.sampler of the world runs")
    parser.add_argument("--sections", default="correctness,sd21_step,projection,world",
                        help="comma-separated; 'variance' (not in the default: ~2-3 min more) measures VSD's ECM")
    parser.add_argument("--variance-steps", type=int, default=300, help="VSD training steps before the variance")
    parser.add_argument("--variance-rk", default="2x1,1x1,1x8,2x8")
    parser.add_argument("--variance-methods", default="uniform,is+stratified,adaptive")
    parser.add_argument("--variance-draws", type=int, default=48)
    parser.add_argument("--variance-pilot", type=int, default=16)
    parser.add_argument("--variance-camera-stratified", action="store_true",
                        help="camera strata across the renders of the rows with CARV, as the carv preset trains "
                             "(the plain rows keep independent cameras)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.cpu_smoke else 10)
    if args.cpu_smoke:
        args.world_prompts, args.world_seconds = args.world_prompts[:1], min(args.world_seconds, 4.0)
        args.variance_steps, args.variance_draws, args.variance_pilot = 2, 3, 2
        args.variance_rk, args.variance_methods = "2x1,1x2", "uniform,is+stratified"
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s
    from carv3d.log import setup_logging

    setup_logging()
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    path = Path(args.out_dir) / "gpu_check_vsd.json"
    sections = [s for s in args.sections.split(",") if s]
    command = " ".join(["scripts/gpu_check_vsd.py", *(argv if argv is not None else sys.argv[1:])])
    saving, saving_source = args.iteration_saving, "--iteration-saving; the paper's SDS figure, not yet measured for VSD"
    if args.saving_from:
        saving, saving_source = measured_saving(args.saving_from, args.saving_arm)
    if args.project_from:  # arithmetic on measured step times: a projection, written as its own report
        earlier = json.loads(Path(args.project_from).read_text())
        report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "step_times_from": args.project_from,
                  "step_times_measured_on": earlier.get("device_name"), "step_times_date": earlier.get("date"),
                  "projection": projection(earlier.get("sd21_step", {}), saving, bool(earlier.get("cpu_smoke")),
                                           saving_source)}
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        write_json(path, report)
        log(f"projection: {json.dumps(report['projection']['hours'])} -> {path}")
        return 0
    report: dict[str, Any] = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_smoke": args.cpu_smoke, "status": "running",
    }
    try:
        import peft

        report["peft"] = peft.__version__
    except ImportError as err:
        report["peft"] = f"missing: {err}"
    write_json(path, report)
    with tempfile.TemporaryDirectory(prefix="carv3d-vsd-") as tmp:
        workdir = Path(tmp)
        if "correctness" in sections:
            section(report, path, "correctness", lambda: correctness(device, workdir))
        if "sd21_step" in sections:
            section(report, path, "sd21_step", lambda: sd21_step(args, device, workdir, report, path, deadline))
        if "projection" in sections:
            section(report, path, "projection",
                    lambda: projection(report.get("sd21_step", {}), saving, args.cpu_smoke, saving_source))
        if "world" in sections:
            section(report, path, "world", lambda: world(args, device, deadline))
        if "variance" in sections:
            section(report, path, "variance", lambda: variance(args, device, workdir))
    report["status"] = "finished"
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    write_json(path, report)
    log(f"done in {report['elapsed_seconds']} s: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
