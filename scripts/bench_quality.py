#!/usr/bin/env python
"""Quality against ground truth: CARV against plain SDS at equal wall clock (issue #6).

For every world prompt × seed, the same config is trained twice — once with ``estimator.preset=sds``
(R = 1, K = 1, uniform t, independent draws) and once with the default ``estimator.preset=carv`` —
each for the same training wall-clock budget. At N + 1 equal-time checkpoints (0, B/N, …, B) the live
scene is evaluated in-process against the embedded world's ground truth
(:func:`carv3d.world.evaluate.evaluate_scene`: silhouette IoU, masked colour error, PSNR, whether the
best-matching world object is the prompted one, the front/back multi-face check; Chamfer with
``--chamfer``). The training clock is :meth:`carv3d.train.Trainer.train_until`'s: it stops while the
scene is evaluated, so evaluation never eats into a method's budget.

Side by side. A GPU step of the embedded teacher is launch-bound (~40–60 ms), so ``--parallel P``
worker processes train side by side on the one GPU. Runs are scheduled in pairs — the sds run and the
carv run of the same (prompt, seed) are dispatched back to back, first one then the other method first
on alternate pairs — so the two methods share the GPU under the same contention at all times, and a
run's budget is wall clock under that contention. With ``--resume`` finished runs of an earlier JSON
(same settings) are reused and only the missing ones run.

Report (JSON, rewritten after every finished run; PNG beside it): per prompt and overall
(mean ± std over seeds) quality at each checkpoint for each method; the training wall clock CARV
needs to reach the baseline's final mean IoU (linear interpolation on the checkpoint grid; null if
never) and its ratio to the budget (target ≤ 0.40); whether CARV is ahead on mean IoU at every
equal-time checkpoint after t = 0.

    python3 scripts/bench_quality.py --preset h200 --out OUT/bench_quality_h200.json --plot OUT/bench_quality_h200.png
    python scripts/bench_quality.py --preset cpu --budget 60 --out bench_quality_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))

METHODS = ("sds", "carv")
BASELINE, CANDIDATE = "sds", "carv"
TARGET_RATIO = 0.40  # issue #6: CARV should reach the baseline's final quality in ≤ 40% of its budget
# Every run: no turntable (no imageio-ffmpeg on the GPU machine), no exports, nothing written to disk.
BENCH_OVERRIDES = ("train.turntable_frames=0", "export.at_end=false", "train.progress=false",
                   "train.tensorboard=false", "train.val_every=0", "train.checkpoint_every=0")
# Headline numbers of evaluate_scene kept per checkpoint; booleans average to fractions of runs.
METRICS = ("silhouette_iou", "masked_colour_error", "psnr", "best_match_is_prompted", "front_matches_front", "chamfer")


@dataclass(frozen=True)
class Preset:
    prompts: tuple[str, ...]
    seeds: int
    budget: float  # training seconds per run
    checkpoints: int  # evaluations at budget · i / checkpoints, i = 1..N (plus the initial scene)
    parallel: int
    config: Optional[str] = None
    overrides: tuple[str, ...] = ()
    eval_resolution: int = 64  # held-out views' size; rendering them is most of an evaluation's cost


PRESETS = {
    # 3 symmetric + 3 asymmetric objects (a front the front/back check can test). 36 runs, 12 side by
    # side on one H200 (16 CPU cores): 3 rounds of (100 s + evaluations + start-up) ≈ 6–7 min.
    "h200": Preset(prompts=("a red cube", "a blue sphere", "a green torus", "a blue house", "a yellow duck",
                            "an orange chair"), seeds=3, budget=100.0, checkpoints=10, parallel=12),
    # The CPU demo config, one symmetric and one asymmetric prompt, the two methods of a pair side by
    # side on a 2-core machine: ≈ 2 × (budget + evaluations) in all.
    # 32 px evaluations: at 64 px one costs ~10 s on a busy 2-core CPU (the result's render), at 32 px ~3 s.
    "cpu": Preset(prompts=("a red cube", "a blue house"), seeds=1, budget=60.0, checkpoints=4, parallel=2,
                  config=str(REPO_ROOT / "configs" / "demo_cpu.yaml"), eval_resolution=32),
}


# ------------------------------------------------------------------------------------ pure logic
def checkpoint_times(budget: float, checkpoints: int) -> list[float]:
    """The equal-time grid ``[0, B/N, 2B/N, …, B]`` (t = 0 is the untrained scene, identical for both methods)."""
    return [budget * i / checkpoints for i in range(checkpoints + 1)]


def time_to_reach(times: Sequence[float], values: Sequence[Optional[float]], target: float) -> Optional[float]:
    """Time from which the curve ``values(times)`` stays at or above ``target``, linear between grid
    points; None if its last point is below.

    "Stays" matters: the untrained blob at t = 0 can already overlap a simple object as well as a
    method's final result, and training first makes it worse (an IoU dip) before it gets better; the
    first crossing would then read as "reached at 0 s". With j the last index where
    ``values[j] < target``: ``t_j + (target − v_j) / (v_{j+1} − v_j) · (t_{j+1} − t_j)``, or ``times[0]``
    when no point is below. Missing values (None) are skipped.
    """
    points = [(float(t), float(v)) for t, v in zip(times, values) if v is not None]
    if not points or points[-1][1] < target:
        return None
    below = [i for i, (_, v) in enumerate(points) if v < target]
    if not below:
        return points[0][0]
    (t0, v0), (t1, v1) = points[below[-1]], points[below[-1] + 1]
    return t0 + (target - v0) / (v1 - v0) * (t1 - t0)


def mean_std(values: Iterable[Optional[float]]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1) of the values that are not None; std None below 2."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else None
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def ahead_at_every_checkpoint(candidate: Sequence[Optional[float]], baseline: Sequence[Optional[float]],
                              higher_is_better: bool = True) -> dict[str, Any]:
    """Is the candidate's mean strictly better than the baseline's at every checkpoint after t = 0?

    Index 0 is the untrained scene (the same for both methods) and is left out. A checkpoint where
    either mean is missing counts as not ahead.
    """
    sign = 1.0 if higher_is_better else -1.0
    differences = [None if c is None or b is None else sign * (c - b) for c, b in zip(candidate[1:], baseline[1:])]
    ahead = [d is not None and d > 0 for d in differences]
    return {"every_checkpoint": bool(ahead) and all(ahead), "per_checkpoint": ahead, "difference": differences}


def metric_value(evaluation: dict[str, Any], metric: str) -> Optional[float]:
    """A checkpoint's metric as a float (booleans → 0/1), None when not measured or not applicable."""
    value = evaluation.get(metric)
    if value is None:
        return None
    return float(value)


def curves_by_seed(runs: Sequence[dict[str, Any]], metric: str, n_points: int) -> dict[int, list[Optional[float]]]:
    """Per seed, the prompt-average of ``metric`` at each checkpoint (over the runs that have it)."""
    seeds = sorted({run["seed"] for run in runs})
    out: dict[int, list[Optional[float]]] = {}
    for seed in seeds:
        mine = [run for run in runs if run["seed"] == seed]
        out[seed] = [mean_std(metric_value(run["evaluations"][i], metric) for run in mine)["mean"]
                     for i in range(n_points)]
    return out


def aggregate(runs: Sequence[dict[str, Any]], metric: str, n_points: int) -> list[dict[str, Any]]:
    """Mean ± std over seeds at each checkpoint, where each seed contributes its mean over prompts.

    With one prompt this is the plain mean ± std over seeds; over several prompts the std measures
    how much the prompt-average moves with the seed, not how prompts differ in difficulty.
    """
    by_seed = curves_by_seed(runs, metric, n_points)
    return [mean_std(curve[i] for curve in by_seed.values()) for i in range(n_points)]


def finished_runs(report: dict[str, Any], method: str, prompt: Optional[str] = None) -> list[dict[str, Any]]:
    return [run for run in report["runs"].values() if run["method"] == method and "error" not in run
            and (prompt is None or run["prompt"] == prompt)]


def compare(report: dict[str, Any], prompt: Optional[str], times: Sequence[float]) -> dict[str, Any]:
    """Both methods' curves for one prompt (or all when None), the time CARV needs to reach the
    baseline's final mean IoU, and whether CARV is ahead at every checkpoint."""
    n_points = len(times)
    curves = {method: {metric: aggregate(finished_runs(report, method, prompt), metric, n_points)
                       for metric in METRICS} for method in METHODS}
    means = {method: [point["mean"] for point in curves[method]["silhouette_iou"]] for method in METHODS}
    target = means[BASELINE][-1]
    reach = None if target is None else time_to_reach(times, means[CANDIDATE], target)
    budget = times[-1]
    return {
        "runs": {method: len(finished_runs(report, method, prompt)) for method in METHODS},
        "curves": curves,
        "baseline_final_mean_iou": target,
        "carv_seconds_to_baseline_final_iou": reach,
        "carv_fraction_of_budget": None if reach is None else reach / budget,
        "meets_target_fraction": None if reach is None else reach / budget <= TARGET_RATIO,
        "carv_ahead_on_iou": ahead_at_every_checkpoint(means[CANDIDATE], means[BASELINE]),
        "carv_ahead_on_colour_error": ahead_at_every_checkpoint(
            [p["mean"] for p in curves[CANDIDATE]["masked_colour_error"]],
            [p["mean"] for p in curves[BASELINE]["masked_colour_error"]], higher_is_better=False),
    }


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    times = report["settings"]["checkpoint_seconds"]
    prompts = report["settings"]["prompts"]
    return {"overall": compare(report, None, times), "per_prompt": {p: compare(report, p, times) for p in prompts},
            "target_fraction_of_budget": TARGET_RATIO}


# ------------------------------------------------------------------------------------ the plan
@dataclass
class RunSpec:
    prompt: str
    seed: int
    method: str
    config: Optional[str]
    overrides: list[str]
    checkpoint_seconds: list[float]
    eval_views: int
    eval_resolution: int
    chamfer: bool
    threads: int = 0  # torch CPU threads in a worker; 0 leaves torch's default
    order: int = 0  # position in the schedule

    @property
    def key(self) -> str:
        return run_key(self.prompt, self.seed, self.method)


def run_key(prompt: str, seed: int, method: str) -> str:
    return f"{prompt} | seed {seed} | {method}"


def paired_schedule(prompts: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int, str]]:
    """(prompt, seed, method) in dispatch order: each sds run next to its carv twin, alternating which
    goes first, so that side-by-side workers always hold both methods in equal numbers."""
    schedule = []
    for pair, (seed, prompt) in enumerate((s, p) for s in seeds for p in prompts):
        methods = METHODS if pair % 2 == 0 else METHODS[::-1]
        schedule.extend((prompt, seed, method) for method in methods)
    return schedule


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for a finished run of an earlier JSON to be reused by --resume."""
    keys = ("budget_seconds", "checkpoint_seconds", "config_file_sha256", "overrides", "eval_views",
            "eval_resolution", "chamfer")
    return {key: settings[key] for key in keys}


def file_sha256(path: Optional[str]) -> Optional[str]:
    return None if path is None else hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ one run (worker side)
def evaluate_live(trainer: Any, spec: RunSpec, nominal_seconds: float) -> dict[str, Any]:
    """Evaluate the scene being trained, in eval mode, and put it back in train mode (the clock is paused)."""
    from carv3d.world.evaluate import evaluate_scene, truth_lighting_for

    started = time.perf_counter()
    trainer.scene.eval()
    try:
        mesh = live_mesh(trainer) if spec.chamfer else None
        result = evaluate_scene(trainer.scene, spec.prompt, mesh=mesh, views=spec.eval_views,
                                resolution=spec.eval_resolution,
                                truth_lighting=truth_lighting_for(str(trainer.cfg.render.shading)))
    finally:
        trainer.scene.train()
    return {"t_nominal": nominal_seconds, "t_train": round(trainer.elapsed_seconds, 4), "step": trainer.step,
            "noise_draws": trainer.estimator.noise_draws,
            **{metric: result[metric] for metric in METRICS}, "best_match": result["best_match"],
            "eval_seconds": round(time.perf_counter() - started, 3)}


def live_mesh(trainer: Any) -> Optional[tuple[Any, Any]]:
    """The export pipeline's mesh of the live scene (no texture), or None when the scene is empty."""
    from carv3d.export.from_scene import scene_opacity_fn
    from carv3d.export.isosurface import EmptyMeshError
    from carv3d.export.pipeline import build_mesh

    export_cfg = trainer.cfg.export
    opacity = None
    if trainer.device.type == "cuda":  # as `carv3d export`: match the renderer's own opacity on CUDA
        opacity = scene_opacity_fn(trainer.scene, int(export_cfg.silhouette_size))
    try:
        mesh = build_mesh(trainer.scene.field, export_cfg, textured=False, nerf_opacity=opacity)
    except EmptyMeshError:
        return None
    return mesh.vertices, mesh.faces


def train_and_evaluate(spec: RunSpec) -> dict[str, Any]:
    """One run: build the trainer, then alternate train_until(next checkpoint) and an evaluation."""
    from carv3d.config import load_config
    from carv3d.train import Trainer

    wall_start = time.time()
    started = time.perf_counter()
    print(f"[bench_quality] start {spec.key} (worker {os.getpid()})", flush=True)
    overrides = [*spec.overrides, *BENCH_OVERRIDES, f"estimator.preset={spec.method}", f"train.seed={spec.seed}"]
    cfg = load_config(spec.config, overrides, spec.prompt)
    trainer = Trainer(cfg)
    setup_seconds = time.perf_counter() - started
    evaluations = []
    for nominal in spec.checkpoint_seconds:
        trainer.train_until(nominal)
        evaluations.append(evaluate_live(trainer, spec, nominal))
    steps = trainer.step
    return {"prompt": spec.prompt, "seed": spec.seed, "method": spec.method, "order": spec.order,
            "device": str(trainer.device), "pid": os.getpid(), "steps": steps,
            "train_seconds": round(trainer.elapsed_seconds, 3),
            "seconds_per_step": trainer.elapsed_seconds / steps if steps else None,
            "setup_seconds": round(setup_seconds, 3),
            "eval_seconds": round(sum(e["eval_seconds"] for e in evaluations), 3),
            "wall_started": wall_start, "wall_finished": time.time(), "evaluations": evaluations}


def run_one(spec: RunSpec) -> dict[str, Any]:
    """A worker's entry point: one run, with any failure recorded instead of raised (the bench goes on)."""
    try:
        return train_and_evaluate(spec)
    except Exception as err:  # a failed run is reported and left out of the aggregates
        return {"prompt": spec.prompt, "seed": spec.seed, "method": spec.method, "order": spec.order,
                "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}


# ------------------------------------------------------------------------------------ report and plot
def write_json(path: Path, report: dict[str, Any]) -> None:
    """Atomic: a time limit mid-write leaves the previous complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=False, default=str))
    os.replace(tmp, path)


def format_point(point: dict[str, Any]) -> str:
    if point["mean"] is None:
        return "   n/a      "
    std = f"±{point['std']:.3f}" if point["std"] is not None else "      "
    return f"{point['mean']:.3f}{std}"


def format_summary(report: dict[str, Any]) -> str:
    overall = report["summary"]["overall"]
    times = report["settings"]["checkpoint_seconds"]
    lines = ["  t (s)   sds IoU        carv IoU", *(
        f"{t:7.1f}   {format_point(s)}   {format_point(c)}"
        for t, s, c in zip(times, overall["curves"]["sds"]["silhouette_iou"], overall["curves"]["carv"]["silhouette_iou"]))]
    reach, fraction = overall["carv_seconds_to_baseline_final_iou"], overall["carv_fraction_of_budget"]
    reached = "never" if reach is None else f"{reach:.1f} s ({fraction:.0%} of the budget)"
    lines.append(f"baseline final mean IoU {overall['baseline_final_mean_iou']}; CARV reaches it at {reached}; "
                 f"ahead at every checkpoint: {overall['carv_ahead_on_iou']['every_checkpoint']}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """IoU vs training wall clock: overall (mean over prompts and seeds, band ± std over seeds) on
    top, one panel per prompt below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = report["settings"]["checkpoint_seconds"]
    prompts = report["settings"]["prompts"]
    ncols = min(3, len(prompts))
    nrows = 1 + math.ceil(len(prompts) / ncols)
    fig = plt.figure(figsize=(4.2 * ncols, 3.2 * nrows), constrained_layout=True)
    grid = fig.add_gridspec(nrows, ncols)
    overall = fig.add_subplot(grid[0, :])
    draw_panel(overall, report["summary"]["overall"], times, "all prompts and seeds")
    for index, prompt in enumerate(prompts):
        axis = fig.add_subplot(grid[1 + index // ncols, index % ncols])
        draw_panel(axis, report["summary"]["per_prompt"][prompt], times, prompt)
    fig.suptitle(f"silhouette IoU against ground truth vs training wall clock ({report['settings']['device']})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def try_plot(report: dict[str, Any], path: Path) -> None:
    """A plot that fails (a missing font, a backend) must not stop the benchmark; the JSON has it all."""
    try:
        plot(report, path)
    except Exception as err:
        print(f"[bench_quality] could not plot {path}: {err}", file=sys.stderr, flush=True)


def draw_panel(axis: Any, comparison: dict[str, Any], times: Sequence[float], title: str) -> None:
    colours = {"sds": "tab:gray", "carv": "tab:red"}
    for method in METHODS:
        points = comparison["curves"][method]["silhouette_iou"]
        xs = [t for t, p in zip(times, points) if p["mean"] is not None]
        mean = [p["mean"] for p in points if p["mean"] is not None]
        std = [p["std"] or 0.0 for p in points if p["mean"] is not None]
        n = comparison["runs"][method]
        axis.plot(xs, mean, marker="o", ms=3, color=colours[method], label=f"{method} (n={n})")
        axis.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                          color=colours[method], alpha=0.2, linewidth=0)
    target, reach = comparison["baseline_final_mean_iou"], comparison["carv_seconds_to_baseline_final_iou"]
    if target is not None:
        axis.axhline(target, color=colours["sds"], linestyle=":", linewidth=1)
    if reach is not None:
        axis.axvline(reach, color=colours["carv"], linestyle=":", linewidth=1)
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("training wall clock (s)")
    axis.set_ylabel("silhouette IoU")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="h200")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a world prompt (repeat for several); default: the preset's")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default: the preset's)")
    parser.add_argument("--budget", type=float, default=None, help="training wall clock per run, seconds")
    parser.add_argument("--checkpoints", type=int, default=None, help="evaluations at budget·i/N, i = 1..N (+ t = 0)")
    parser.add_argument("--parallel", type=int, default=None, help="runs side by side (worker processes)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default cores/P)")
    parser.add_argument("--config", default=None, help="config file for both methods (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both methods (repeat)")
    parser.add_argument("--eval-views", type=int, default=16)
    parser.add_argument("--eval-resolution", type=int, default=None, help="held-out view size (default: the preset's)")
    parser.add_argument("--chamfer", action="store_true",
                        help="also the Chamfer distance at every checkpoint (extracts a mesh each time: seconds per "
                             "checkpoint on a CPU, off by default; the training clock is paused either way)")
    parser.add_argument("--out", default="bench_quality.json")
    parser.add_argument("--plot", default=None, help="PNG (default: the JSON's name with .png)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs of an existing --out (same settings)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="recompute the summary and plot of an existing --out without running anything")
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    preset = PRESETS[args.preset]
    parallel = args.parallel if args.parallel is not None else preset.parallel
    config = args.config if args.config is not None else preset.config
    budget = args.budget if args.budget is not None else preset.budget
    checkpoints = args.checkpoints if args.checkpoints is not None else preset.checkpoints
    if budget <= 0 or checkpoints < 1 or parallel < 1:
        raise SystemExit("--budget must be positive, --checkpoints and --parallel at least 1")
    return {
        "preset": args.preset,
        "prompts": list(args.prompt or preset.prompts),
        "seeds": list(range(args.seeds if args.seeds is not None else preset.seeds)),
        "budget_seconds": budget,
        "checkpoint_seconds": checkpoint_times(budget, checkpoints),
        "parallel": parallel,
        "threads_per_worker": args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // parallel),
        "config_file": config,
        "config_file_sha256": file_sha256(config),
        "overrides": [*preset.overrides, *args.overrides],
        "bench_overrides": list(BENCH_OVERRIDES),
        "eval_views": args.eval_views,
        "eval_resolution": args.eval_resolution if args.eval_resolution is not None else preset.eval_resolution,
        "chamfer": args.chamfer,
    }


def protocol_text(settings: dict[str, Any]) -> str:
    return (f"Each (prompt, seed) is trained with estimator.preset=sds and =carv, everything else identical (config "
            f"{settings['config_file'] or 'defaults'}, overrides {settings['overrides']}), for "
            f"{settings['budget_seconds']:g} s of training wall clock each; the scene is evaluated in-process at "
            f"{len(settings['checkpoint_seconds'])} equal-time checkpoints {settings['checkpoint_seconds']} with the "
            f"training clock paused (Trainer.train_until; CUDA synchronised per step), so a checkpoint's clock overshoots "
            f"its nominal time by less than one step (t_train). {settings['parallel']} runs train side by side on one "
            f"device; runs are dispatched in sds/carv pairs of the same prompt and seed (alternating which goes first), "
            f"so both methods run concurrently under the same contention and a budget is wall clock under that "
            f"contention. Aggregates: mean ± sample std over seeds of the prompt-averaged metric. Time to reach: CARV's "
            f"mean IoU curve, linearly interpolated on the checkpoint grid, against the baseline's final mean IoU. "
            f"Runs reused with --resume were measured under the contention of their own session.")


def new_report(settings: dict[str, Any], command: str) -> dict[str, Any]:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    settings = {**settings, "device": device}
    return {"benchmark": "quality: CARV vs SDS at equal wall clock (issue #6)", "command": command,
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "settings": settings,
            "protocol": protocol_text(settings), "runs": {}, "sessions": []}


def reusable_runs(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Finished runs of an earlier JSON at ``path`` made with the same comparable settings."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if comparable_settings(old["settings"]) != comparable_settings(settings):
        raise SystemExit(f"--resume: {path} was made with other settings ({comparable_settings(old['settings'])}); "
                         f"use another --out or the same settings.")
    return {key: run for key, run in old["runs"].items() if "error" not in run}


def build_specs(settings: dict[str, Any], done: Iterable[str]) -> list[RunSpec]:
    done = set(done)
    specs = []
    for order, (prompt, seed, method) in enumerate(paired_schedule(settings["prompts"], settings["seeds"])):
        spec = RunSpec(prompt, seed, method, settings["config_file"], list(settings["overrides"]),
                       list(settings["checkpoint_seconds"]), settings["eval_views"], settings["eval_resolution"],
                       settings["chamfer"], settings["threads_per_worker"], order)
        if spec.key not in done:
            specs.append(spec)
    return specs


def check_prompts(prompts: Sequence[str]) -> None:
    """Fail before any run starts on a prompt outside the world (it has no ground truth)."""
    from carv3d.world.evaluate import world_prompt

    for prompt in prompts:
        world_prompt(prompt)


class Progress:
    """One line per finished run: which, its result, elapsed and a rough ETA (runs finish in waves)."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()

    def line(self, result: dict[str, Any]) -> str:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        what = f"{result['method']:4s} {result['prompt']!r} seed {result['seed']}"
        if "error" in result:
            outcome = f"FAILED: {result['error']}"
        else:
            last = result["evaluations"][-1]
            outcome = (f"{result['steps']} steps, IoU {last['silhouette_iou']:.3f}, best match {last['best_match']}"
                       f"{'' if last['best_match_is_prompted'] else ' (wrong)'}")
        return f"[{self.done}/{self.total}] {what}: {outcome}; elapsed {elapsed:.0f} s, ETA {eta:.0f} s"


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI: never download weights (workers inherit it)
    args = parse_args(argv)
    from carv3d.devices import warm_up_cuda_extensions
    from carv3d.workers import run_in_workers

    if args.summarize_only:  # recompute the summary (and plot) of a finished JSON with the current rules
        out = Path(args.out)
        report = json.loads(out.read_text())
        report["summary"] = summarize(report)
        write_json(out, report)
        try_plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
        print(format_summary(report), flush=True)
        return 0
    settings = resolve_settings(args)
    check_prompts(settings["prompts"])
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    reused = reusable_runs(out, settings) if args.resume else {}
    report = new_report(settings, " ".join(sys.argv if argv is None else ["bench_quality.py", *argv]))
    if args.resume and out.is_file():  # keep the earlier sessions' timings next to the runs they made
        report["sessions"] = json.loads(out.read_text()).get("sessions", [])
    report["runs"].update({key: run for key, run in reused.items()
                           if key in {run_key(*entry) for entry in paired_schedule(settings["prompts"], settings["seeds"])}})
    specs = build_specs(settings, report["runs"])
    session: dict[str, Any] = {"started": time.time(), "runs_planned": len(specs), "runs_reused": len(report["runs"])}
    report["sessions"].append(session)
    print(f"[bench_quality] {len(specs)} runs to do ({len(report['runs'])} reused), {settings['parallel']} side by side, "
          f"{settings['budget_seconds']:g} s each, checkpoints {settings['checkpoint_seconds']}", flush=True)
    session["cuda_extension_warm_up_seconds"] = warm_up_cuda_extensions()  # once here, not in every worker
    report["summary"] = summarize(report)
    write_json(out, report)
    progress = Progress(len(specs))

    def on_result(result: dict[str, Any]) -> None:
        report["runs"][run_key(result["prompt"], result["seed"], result["method"])] = result
        report["summary"] = summarize(report)
        session["seconds"] = time.time() - session["started"]
        write_json(out, report)
        try_plot(report, plot_path)  # the plot too, so a time limit leaves one
        print(progress.line(result), flush=True)
        if "traceback" in result:
            print(result["traceback"], file=sys.stderr, flush=True)

    run_in_workers(specs, settings["parallel"], settings["threads_per_worker"], on_result, worker=run_one)
    session["seconds"] = time.time() - session["started"]
    write_json(out, report)
    try_plot(report, plot_path)
    print(format_summary(report), flush=True)
    print(f"wrote {out} and {plot_path}", flush=True)
    failed = [key for key, run in report["runs"].items() if "error" in run]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
