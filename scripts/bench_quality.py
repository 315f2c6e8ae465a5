#!/usr/bin/env python
"""Quality against ground truth: arms (plain SDS against CARV by default) at equal wall clock.

For every world prompt × seed, the same config is trained once per *arm* — by default ``sds``
(``estimator.preset=sds``: R = 1, K = 1, uniform t, independent draws) and ``carv`` (the default
preset) — each for the same training wall-clock budget. ``--arms SWEEP.yaml`` takes the arms from a
carv3d sweep file instead (one arm per run its grid/zip expands to: a tuning grid, VSD against SDS, or
the NeRF against Gaussian splats), and ``--baseline`` names the arm the others are measured against.
At N + 1 equal-time checkpoints (0, B/N, …, B) the live scene is evaluated in-process against the
embedded world's ground truth (:func:`carv3d.world.evaluate.evaluate_scene`: silhouette IoU, masked
colour error, PSNR, whether the best-matching world object is the prompted one, the front/back
multi-face check; Chamfer with ``--chamfer``). The training clock is
:meth:`carv3d.train.Trainer.train_until`'s: it stops while the scene is evaluated, so evaluation never
eats into an arm's budget.

Config files. A preset names one config file per scene type (``--preset cpu``: ``configs/demo_cpu.yaml``
for the NeRF, ``configs/gaussians_demo_cpu.yaml`` for Gaussian splats; ``h200``: the config defaults for
both), and each arm trains with the file of the scene type its overrides select (its ``scene.type``,
else the default, nerf): a NeRF config's keys (``scene.grid``…) do not exist for Gaussians. An explicit
``--config FILE`` is every arm's file instead. ``settings.arm_config_files`` in the report records each
arm's file and its sha256, and ``--resume`` reuses a run only where its arm's file is unchanged.

Side by side. A GPU step of the embedded teacher is launch-bound (~40–60 ms), so ``--parallel P``
worker processes train side by side on the one GPU. The runs of one (prompt, seed) are dispatched back
to back, every arm once, the order reversed on alternate groups, so the arms share the GPU under the
same contention at all times, and a run's budget is wall clock under that contention. With
``--resume`` finished runs of an earlier JSON (same settings) are reused and only the missing ones run.

Report (JSON, rewritten after every finished run; PNG beside it): per prompt and overall
(mean ± std over seeds) quality and mean step count at each checkpoint for each arm; for each arm
against the baseline, the training wall clock (and steps) it needs to reach the baseline's final mean
IoU (linear interpolation on the checkpoint grid; null if never), its ratio to the budget (target
≤ 0.40), whether it is ahead at every equal-time checkpoint after t = 0 on IoU, colour error and PSNR;
and the arms of each preset ranked by final mean IoU (the tuning result).

    python3 scripts/bench_quality.py --preset h200 --out OUT/bench_quality_h200.json --plot OUT/bench_quality_h200.png
    python scripts/bench_quality.py --preset cpu --budget 60 --out bench_quality_cpu.json
    python scripts/bench_quality.py --arms configs/arms/tune_world.yaml --prompt "a red cube" ... --out tune.json
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))

# An arm is a labelled list of overrides, trained on every (prompt, seed). By default the two presets;
# `--arms SWEEP.yaml` takes them from a carv3d sweep file's grid (one arm per run it expands to).
DEFAULT_ARMS = {"sds": ["estimator.preset=sds"], "carv": ["estimator.preset=carv"]}
DEFAULT_BASELINE = "sds"
TARGET_RATIO = 0.40  # issue #16: CARV should reach the baseline's final quality in ≤ 40% of its budget
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
    # One config file per scene type (None: the config defaults). A config file holds keys of one
    # scene implementation (scene.grid is the NeRF's), so an arm trains with the file of the scene type
    # its overrides select (scene.type; else the default type, nerf, as `carv3d train` would), and an
    # arms file can set the NeRF against Gaussian splats. Every scene type an arm may select needs an
    # entry, and each file must configure the scene type it is listed under (check_arms checks).
    # --config replaces the mapping: that one file for every arm.
    configs: Mapping[str, Optional[str]] = field(default_factory=lambda: {"nerf": None, "gaussians": None})
    overrides: tuple[str, ...] = ()
    eval_resolution: int = 64  # held-out views' size; rendering them is most of an evaluation's cost


PRESETS = {
    # 3 symmetric + 3 asymmetric objects (a front the front/back check can test). 36 runs, 12 side by
    # side on one H200 (16 CPU cores): 3 rounds of (100 s + evaluations + start-up) ≈ 6–7 min. The
    # config defaults for either scene type.
    "h200": Preset(prompts=("a red cube", "a blue sphere", "a green torus", "a blue house", "a yellow duck",
                            "an orange chair"), seeds=3, budget=100.0, checkpoints=10, parallel=12,
                   configs={"nerf": None, "gaussians": None}),
    # The CPU demo configs (the NeRF's, the Gaussians'), one symmetric and one asymmetric prompt, the
    # two methods of a pair side by side on a 2-core machine: ≈ 2 × (budget + evaluations) in all.
    # 32 px evaluations: at 64 px one costs ~10 s on a busy 2-core CPU (the result's render), at 32 px ~3 s.
    "cpu": Preset(prompts=("a red cube", "a blue house"), seeds=1, budget=60.0, checkpoints=4, parallel=2,
                  configs={"nerf": str(REPO_ROOT / "configs" / "demo_cpu.yaml"),
                           "gaussians": str(REPO_ROOT / "configs" / "gaussians_demo_cpu.yaml")},
                  eval_resolution=32),
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


def finished_runs(report: dict[str, Any], arm: str, prompt: Union[None, str, Sequence[str]] = None,
                  pairs: Optional[set[tuple[str, int]]] = None) -> list[dict[str, Any]]:
    """The arm's finished runs: of every prompt (None), of one, or of a collection of prompts;
    with ``pairs``, only the runs whose (prompt, seed) is one of them."""
    chosen = None if prompt is None else {prompt} if isinstance(prompt, str) else set(prompt)
    return [run for run in report["runs"].values() if run["method"] == arm and "error" not in run
            and (chosen is None or run["prompt"] in chosen)
            and (pairs is None or (run["prompt"], run["seed"]) in pairs)]


def pairs_finished_by_every_arm(report: dict[str, Any]) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(the (prompt, seed) pairs every arm finished, the pairs any arm finished).

    They differ in a report cut short (a killed benchmark, or one resumed later): its arms' means
    would then average different prompts, so the summary also compares the arms on the first set.
    """
    arms, _ = report_arms(report)
    done = {arm: {(run["prompt"], run["seed"]) for run in finished_runs(report, arm)} for arm in arms}
    every = set.intersection(*done.values()) if done else set()
    return every, set.union(*done.values()) if done else set()


def report_arms(report: dict[str, Any]) -> tuple[dict[str, list[str]], str]:
    """The report's arms (label → overrides) and baseline label; reports older than arms had the two presets."""
    settings = report["settings"]
    return settings.get("arms") or DEFAULT_ARMS, settings.get("baseline") or DEFAULT_BASELINE


def interpolate(times: Sequence[float], values: Sequence[Optional[float]], at: float) -> Optional[float]:
    """``values(times)`` linearly interpolated at ``at`` (within the grid; None where a neighbour is missing)."""
    for (t0, v0), (t1, v1) in zip(zip(times, values), zip(times[1:], values[1:])):
        if t0 <= at <= t1:
            if v0 is None or v1 is None:
                return None
            return v0 if t1 == t0 else v0 + (at - t0) / (t1 - t0) * (v1 - v0)
    return None


def mean_steps(runs: Sequence[dict[str, Any]], n_points: int) -> list[Optional[float]]:
    """Mean optimisation step reached at each checkpoint, over the runs."""
    return [mean_std(run["evaluations"][i]["step"] for run in runs)["mean"] for i in range(n_points)]


def versus(curves: dict[str, Any], steps: Sequence[Optional[float]], baseline_curves: dict[str, Any],
           baseline_steps: Sequence[Optional[float]], times: Sequence[float]) -> dict[str, Any]:
    """One arm against the baseline: when it reaches the baseline's final mean IoU (seconds, fraction
    of the budget, optimisation steps), and whether it is ahead at every equal-time checkpoint."""
    def means(c: dict[str, Any], metric: str) -> list[Optional[float]]:
        return [point["mean"] for point in c[metric]]

    iou, baseline_iou = means(curves, "silhouette_iou"), means(baseline_curves, "silhouette_iou")
    target = baseline_iou[-1]
    reach = None if target is None else time_to_reach(times, iou, target)
    budget = times[-1]
    return {
        "final_mean_iou": iou[-1],
        "seconds_to_baseline_final_iou": reach,
        "fraction_of_budget": None if reach is None else reach / budget,
        "meets_target_fraction": None if reach is None else reach / budget <= TARGET_RATIO,
        "steps_to_baseline_final_iou": None if reach is None else interpolate(times, steps, reach),
        "baseline_steps_in_budget": baseline_steps[-1],
        "ahead_on_iou": ahead_at_every_checkpoint(iou, baseline_iou),
        "ahead_on_colour_error": ahead_at_every_checkpoint(
            means(curves, "masked_colour_error"), means(baseline_curves, "masked_colour_error"), higher_is_better=False),
        "ahead_on_psnr": ahead_at_every_checkpoint(means(curves, "psnr"), means(baseline_curves, "psnr")),
    }


def compare(report: dict[str, Any], prompt: Union[None, str, Sequence[str]], times: Sequence[float],
            pairs: Optional[set[tuple[str, int]]] = None) -> dict[str, Any]:
    """Every arm's curves for one prompt, a subset of prompts, or all (None), optionally only over the
    (prompt, seed) ``pairs``, and each arm against the baseline."""
    arms, baseline = report_arms(report)
    n_points = len(times)
    runs = {arm: finished_runs(report, arm, prompt, pairs) for arm in arms}
    curves = {arm: {metric: aggregate(runs[arm], metric, n_points) for metric in METRICS} for arm in arms}
    steps = {arm: mean_steps(runs[arm], n_points) if runs[arm] else [None] * n_points for arm in arms}
    return {
        "runs": {arm: len(runs[arm]) for arm in arms},
        "curves": curves,
        "mean_steps": steps,
        "baseline": baseline,
        "baseline_final_mean_iou": curves[baseline]["silhouette_iou"][-1]["mean"],
        "versus_baseline": {arm: versus(curves[arm], steps[arm], curves[baseline], steps[baseline], times)
                            for arm in arms if arm != baseline},
    }


def arm_group(overrides: Sequence[str], key: str, default: str) -> str:
    """The value an arm sets for ``key`` (its last override of it), else ``default``."""
    value = default
    for override in overrides:
        name, _, text = override.partition("=")
        if name.strip() == key:
            value = text.strip().strip('"')
    return value


def ranking(report: dict[str, Any], overall: dict[str, Any]) -> dict[str, Any]:
    """Arms grouped by their estimator.preset, best first: highest final mean IoU at the budget (the
    tuning criterion: judged at a fixed wall clock), ties broken by the lower final colour error."""
    arms, _ = report_arms(report)
    groups: dict[str, list[dict[str, Any]]] = {}
    for arm, overrides in arms.items():
        curves = overall["curves"][arm]
        iou, colour = curves["silhouette_iou"][-1]["mean"], curves["masked_colour_error"][-1]["mean"]
        groups.setdefault(arm_group(overrides, "estimator.preset", "carv"), []).append(
            {"arm": arm, "overrides": list(overrides), "final_mean_iou": iou, "final_colour_error": colour,
             "mean_iou_over_checkpoints": mean_std(p["mean"] for p in curves["silhouette_iou"][1:])["mean"],
             "runs": overall["runs"][arm]})
    for rows in groups.values():
        rows.sort(key=lambda row: (row["final_mean_iou"] is None, -(row["final_mean_iou"] or 0.0),
                                   row["final_colour_error"] if row["final_colour_error"] is not None else math.inf))
    return {"criterion": "final mean IoU at the budget, then final colour error", "by_preset": groups,
            "best": {group: rows[0]["arm"] for group, rows in groups.items() if rows[0]["final_mean_iou"] is not None}}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    times = report["settings"]["checkpoint_seconds"]
    prompts = report["settings"]["prompts"]
    overall = compare(report, None, times)
    subsets = report["settings"].get("subsets") or {}
    summary = {"overall": overall, "per_prompt": {p: compare(report, p, times) for p in prompts},
               "subsets": {name: compare(report, members, times) for name, members in subsets.items()},
               "ranking": ranking(report, overall), "target_fraction_of_budget": TARGET_RATIO}
    every, any_arm = pairs_finished_by_every_arm(report)
    if every != any_arm:
        summary["matched"] = {"pairs": sorted([prompt, seed] for prompt, seed in every),
                              "pairs_left_out": sorted([prompt, seed] for prompt, seed in any_arm - every),
                              **compare(report, None, times, every)}
    return summary


def parse_subsets(values: Sequence[str], prompts: Sequence[str]) -> dict[str, list[str]]:
    """``--subset NAME=PROMPT,PROMPT`` → {NAME: [prompts]}; each prompt must be one of the bench's."""
    subsets: dict[str, list[str]] = {}
    for value in values:
        name, sep, members = value.partition("=")
        chosen = [m.strip() for m in members.split(",") if m.strip()]
        if not sep or not name.strip() or not chosen:
            raise SystemExit(f"--subset {value!r}: expected NAME=PROMPT,PROMPT (e.g. held_out=a blue sphere,a green torus)")
        unknown = [m for m in chosen if m not in prompts]
        if unknown:
            raise SystemExit(f"--subset {name}: {', '.join(map(repr, unknown))} not among the prompts: {', '.join(prompts)}")
        subsets[name.strip()] = chosen
    return subsets


# ------------------------------------------------------------------------------------ the plan
@dataclass
class RunSpec:
    prompt: str
    seed: int
    method: str  # the arm's label
    config: Optional[str]  # the arm's config file (None: the defaults)
    overrides: list[str]  # the common overrides, then the arm's
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


def paired_schedule(prompts: Sequence[str], seeds: Sequence[int],
                    arms: Sequence[str] = tuple(DEFAULT_ARMS)) -> list[tuple[str, int, str]]:
    """(prompt, seed, arm) in dispatch order: the runs of one (prompt, seed) back to back, every arm
    once, the order reversed on alternate groups, so that side-by-side workers always hold the arms in
    about equal numbers (with two arms: each sds run next to its carv twin, alternating which goes first)."""
    schedule = []
    for group, (seed, prompt) in enumerate((s, p) for s in seeds for p in prompts):
        ordered = list(arms) if group % 2 == 0 else list(arms)[::-1]
        schedule.extend((prompt, seed, arm) for arm in ordered)
    return schedule


def scene_type_of(overrides: Sequence[str], default: str) -> str:
    """The scene.type that ``overrides`` select, read as the config loader reads them (the last one
    wins, ``scene.type=X`` or ``scene={type: X, …}``), else ``default``."""
    from carv3d.config import parse_overrides
    from omegaconf import OmegaConf

    value = OmegaConf.select(parse_overrides(list(overrides)), "scene.type", default=None) if overrides else None
    return default if value is None else str(value)


def arm_config_files(arms: Mapping[str, Sequence[str]], common: Sequence[str], config: Optional[str],
                     scene_configs: Optional[Mapping[str, Optional[str]]]) -> dict[str, dict[str, Optional[str]]]:
    """Each arm's config file and the scene type it was picked for: ``config`` (an explicit --config)
    for every arm (scene type None: not picked by it); else the file that ``scene_configs`` (the
    preset's) names for the scene type the arm selects — through the common overrides then its own
    (scene.type), else the config's default type (nerf)."""
    if config is not None or scene_configs is None:
        return {label: {"scene_type": None, "file": config} for label in arms}
    from carv3d.config import DEFAULT_TYPES
    from carv3d.errors import UserError

    files = {}
    for label, overrides in arms.items():
        try:
            scene_type = scene_type_of([*common, *overrides], DEFAULT_TYPES["scene"])
        except UserError as err:
            raise SystemExit(f"arm {label}: {err}") from None
        if scene_type not in scene_configs:
            raise SystemExit(f"arm {label}: scene.type={scene_type} has no config file in the preset (it has "
                             f"{', '.join(scene_configs)}); pass one with --config.")
        files[label] = {"scene_type": scene_type, "file": scene_configs[scene_type]}
    return files


def arm_config_hashes(settings: dict[str, Any]) -> dict[str, Optional[str]]:
    """Each arm's config file's sha256 (None: the config defaults). Reports from before per-arm config
    files trained every arm with one file: ``config_file_sha256``."""
    if "arm_config_files" in settings:
        return {arm: entry["sha256"] for arm, entry in settings["arm_config_files"].items()}
    return {arm: settings.get("config_file_sha256") for arm in settings.get("arms") or DEFAULT_ARMS}


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """What must match for a finished run of an earlier JSON to be reused by --resume."""
    keys = ("budget_seconds", "checkpoint_seconds", "overrides", "eval_views", "eval_resolution", "chamfer")
    return {**{key: settings[key] for key in keys}, "arms": settings.get("arms") or DEFAULT_ARMS,
            "arm_config_sha256": arm_config_hashes(settings)}


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
    overrides = [*spec.overrides, *BENCH_OVERRIDES, f"train.seed={spec.seed}"]
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
    from carv3d.io import write_json_report

    write_json_report(path, report, indent=1, allow_nan=False)


def format_point(point: dict[str, Any]) -> str:
    if point["mean"] is None:
        return "   n/a      "
    std = f"±{point['std']:.3f}" if point["std"] is not None else "      "
    return f"{point['mean']:.3f}{std}"


def column_labels(arms: Sequence[str], width: int = 22) -> dict[str, str]:
    """Each arm's column header: its name, or what follows the prefix all arms share when the names are
    too long (sweep-made names differ only at their end), cut to ``width`` characters."""
    prefix = os.path.commonprefix(list(arms)) if len(arms) > 1 else ""
    cut = len(prefix) if any(len(arm) > width for arm in arms) else 0
    return {arm: ("…" + arm[cut:] if cut else arm)[:width] for arm in arms}


def format_summary(report: dict[str, Any]) -> str:
    """Mean IoU per arm at each checkpoint, then each arm against the baseline; with more than two
    arms, the best arm per preset (the tuning result)."""
    overall = report["summary"]["overall"]
    times = report["settings"]["checkpoint_seconds"]
    arms = list(overall["curves"])
    labels = column_labels(arms)
    lines = ["  t (s)  " + "".join(f"{labels[arm]:>24s}" for arm in arms)]
    for i, t in enumerate(times):
        lines.append(f"{t:7.1f}  " + "".join(f"{format_point(overall['curves'][arm]['silhouette_iou'][i]):>24s}"
                                             for arm in arms))
    lines.append(f"baseline {overall['baseline']}: final mean IoU {overall['baseline_final_mean_iou']}")
    for arm, result in overall["versus_baseline"].items():
        reach, fraction = result["seconds_to_baseline_final_iou"], result["fraction_of_budget"]
        reached = "never" if reach is None else f"{reach:.1f} s ({fraction:.0%} of the budget)"
        lines.append(f"  {arm}: reaches it at {reached}; ahead on IoU at every checkpoint: "
                     f"{result['ahead_on_iou']['every_checkpoint']}, on colour error: "
                     f"{result['ahead_on_colour_error']['every_checkpoint']}")
    for name, subset in report["summary"].get("subsets", {}).items():
        for arm, result in subset["versus_baseline"].items():
            reach = result["seconds_to_baseline_final_iou"]
            final = subset["baseline_final_mean_iou"]
            lines.append(f"  [{name}] {arm}: reaches {subset['baseline']}'s final IoU "
                         + ("(none: no finished run)" if final is None else f"{final:.3f}") + " at "
                         + ("never" if reach is None else f"{reach:.1f} s ({result['fraction_of_budget']:.0%})")
                         + f"; ahead on IoU / colour at every checkpoint: {result['ahead_on_iou']['every_checkpoint']}"
                           f" / {result['ahead_on_colour_error']['every_checkpoint']}")
    matched = report["summary"].get("matched")
    if matched:
        lines.append(f"matched: the {len(matched['pairs'])} (prompt, seed) pairs every arm finished "
                     f"({len(matched['pairs_left_out'])} left out)")
        lines.append("  t (s)  " + "".join(f"{labels[arm]:>24s}" for arm in arms))
        for i, t in enumerate(times):
            lines.append(f"{t:7.1f}  " + "".join(f"{format_point(matched['curves'][arm]['silhouette_iou'][i]):>24s}"
                                                 for arm in arms))
    if len(arms) > 2:
        for group, arm in report["summary"]["ranking"]["best"].items():
            lines.append(f"best {group} arm: {arm}")
    return "\n".join(lines)


def legend_labels(report: dict[str, Any], width: int = 48) -> dict[str, str]:
    """Each arm's legend entry: the overrides that set it apart from the other arms, keys without
    their first part (``type=gaussians, lr.opacity=0.1``), wrapped at ``width`` characters; the
    arm's name when the report does not list the arms' overrides."""
    import textwrap

    arms = list(report["summary"]["overall"]["curves"])
    settings = report["settings"].get("arms") or {}
    if len(arms) < 2 or not all(arm in settings for arm in arms):
        return {arm: arm for arm in arms}
    listed = {arm: [o.replace('"', "") for o in settings[arm]] for arm in arms}
    common = set.intersection(*(set(v) for v in listed.values()))
    labels = {}
    for arm in arms:
        parts = [o.split(".", 1)[-1] for o in listed[arm] if o not in common]
        labels[arm] = "\n".join(textwrap.wrap(", ".join(parts), width)) if parts else arm
    if len(set(labels.values())) < len(arms):  # two arms alike once shortened: their names say which
        labels = {arm: f"{arm}\n{text}" for arm, text in labels.items()}
    return labels


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
    labels = legend_labels(report)
    draw_panel(overall, report["summary"]["overall"], times, "all prompts and seeds", labels)
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


def arm_colours(arms: Sequence[str]) -> dict[str, Any]:
    """The two presets keep their colours (grey baseline, red CARV); other arms take a colour map."""
    import matplotlib

    fixed = {"sds": "tab:gray", "carv": "tab:red"}
    if set(arms) <= set(fixed):
        return {arm: fixed[arm] for arm in arms}
    cmap = matplotlib.colormaps["tab10" if len(arms) <= 10 else "tab20"]
    return {arm: cmap(i % cmap.N) for i, arm in enumerate(arms)}


def draw_panel(axis: Any, comparison: dict[str, Any], times: Sequence[float], title: str,
               labels: Optional[dict[str, str]] = None) -> None:
    """One panel; with ``labels``, its legend (the per-prompt panels share the overall one's colours)."""
    colours = arm_colours(list(comparison["curves"]))
    for arm in comparison["curves"]:
        points = comparison["curves"][arm]["silhouette_iou"]
        xs = [t for t, p in zip(times, points) if p["mean"] is not None]
        mean = [p["mean"] for p in points if p["mean"] is not None]
        std = [p["std"] or 0.0 for p in points if p["mean"] is not None]
        n = comparison["runs"][arm]
        axis.plot(xs, mean, marker="o", ms=3, color=colours[arm], label=f"{(labels or {}).get(arm, arm)} (n={n})")
        axis.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                          color=colours[arm], alpha=0.2, linewidth=0)
    target = comparison["baseline_final_mean_iou"]
    if target is not None:
        axis.axhline(target, color=colours[comparison["baseline"]], linestyle=":", linewidth=1)
    for arm, result in comparison["versus_baseline"].items():
        if result["seconds_to_baseline_final_iou"] is not None:
            axis.axvline(result["seconds_to_baseline_final_iou"], color=colours[arm], linestyle=":", linewidth=1)
    axis.set_title(title, fontsize=9)
    axis.set_xlabel("training wall clock (s)")
    axis.set_ylabel("silhouette IoU")
    axis.grid(alpha=0.3)
    if labels is not None:
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
    parser.add_argument("--config", default=None,
                        help="config file for every arm (default: the preset's file for the scene type each arm "
                             "selects, e.g. --preset cpu: configs/demo_cpu.yaml or configs/gaussians_demo_cpu.yaml)")
    parser.add_argument("--arms", default=None, metavar="SWEEP.yaml",
                        help="a carv3d sweep file whose runs are the arms (its grid/zip/overrides; no prompt, seed "
                             "or base: the bench sets those); default: the sds and carv presets")
    parser.add_argument("--baseline", default=None,
                        help="label of the baseline arm (default: sds, or the first arm of --arms)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both methods (repeat)")
    parser.add_argument("--subset", action="append", default=[], metavar="NAME=PROMPT,PROMPT",
                        help="also summarise these prompts on their own (summary.subsets.NAME), e.g. the prompts "
                             "held out from tuning, or the six of bench_world_quality; with --summarize-only too")
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
    budget = args.budget if args.budget is not None else preset.budget
    checkpoints = args.checkpoints if args.checkpoints is not None else preset.checkpoints
    if budget <= 0 or checkpoints < 1 or parallel < 1:
        raise SystemExit("--budget must be positive, --checkpoints and --parallel at least 1")
    from carv3d.world.evaluate import EvaluationOptionError, check_options

    try:  # before any run starts, not in every worker after its training
        check_options(args.eval_views, args.eval_resolution if args.eval_resolution is not None else preset.eval_resolution)
    except EvaluationOptionError as err:
        raise SystemExit(f"--eval-views / --eval-resolution: {err}") from None
    arms = arms_from_sweep(args.arms) if args.arms else dict(DEFAULT_ARMS)
    baseline = args.baseline or (DEFAULT_BASELINE if DEFAULT_BASELINE in arms else next(iter(arms)))
    if baseline not in arms:
        raise SystemExit(f"--baseline {baseline!r} is not an arm; arms: {', '.join(arms)}")
    overrides = [*preset.overrides, *args.overrides]
    scene_configs = None if args.config is not None else dict(preset.configs)
    files = arm_config_files(arms, overrides, args.config, scene_configs)
    return {
        "preset": args.preset,
        "arms": arms,
        "arms_file": args.arms,
        "baseline": baseline,
        "prompts": list(args.prompt or preset.prompts),
        "seeds": list(range(args.seeds if args.seeds is not None else preset.seeds)),
        "budget_seconds": budget,
        "checkpoint_seconds": checkpoint_times(budget, checkpoints),
        "parallel": parallel,
        "threads_per_worker": args.threads if args.threads is not None else max(1, (os.cpu_count() or 1) // parallel),
        "config_file": args.config,  # --config, every arm's file; None: scene_config_files by scene type
        "scene_config_files": scene_configs,
        "arm_config_files": {label: {**entry, "sha256": file_sha256(entry["file"])} for label, entry in files.items()},
        "overrides": overrides,
        "bench_overrides": list(BENCH_OVERRIDES),
        "eval_views": args.eval_views,
        "eval_resolution": args.eval_resolution if args.eval_resolution is not None else preset.eval_resolution,
        "chamfer": args.chamfer,
        "subsets": parse_subsets(args.subset, list(args.prompt or preset.prompts)),
    }


def arms_from_sweep(path: str) -> dict[str, list[str]]:
    """Arms from a carv3d sweep file: one per run it expands to, labelled by its axis values (the run
    name without its hash while those are unique), holding that run's overrides. Only the file's
    structure is checked here; :func:`check_arms` resolves each arm's config. The bench sets prompts
    and seeds itself."""
    from carv3d.errors import UserError
    from carv3d.sweep.spec import load_sweep

    try:
        spec = load_sweep(path, validate=False)
    except UserError as err:
        raise SystemExit(f"--arms: {err}") from None
    if spec.base is not None:
        raise SystemExit(f"--arms {path}: 'base:' is not used by the bench; pass the config with --config.")
    for key in ("prompt", "train.seed"):
        if key in spec.axis_keys or key in spec.overrides:
            raise SystemExit(f"--arms {path}: sets {key}; the bench sets prompts (--prompt) and seeds (--seeds) itself.")
    labels = [run.name.rsplit("-", 1)[0] for run in spec.runs]
    if len(set(labels)) < len(labels):
        labels = [run.name for run in spec.runs]
    return {label: list(run.overrides) for label, run in zip(labels, spec.runs)}


def check_arms(settings: dict[str, Any]) -> None:
    """Resolve every arm's config (its own file, as `carv3d train` would) before any run starts: a typo
    in a key, a wrong type or a value out of range stops the bench with the config's own message. An
    arm whose file the preset picked by scene type must train that scene type (a preset's file that
    sets another scene.type is a mistake in the preset)."""
    from carv3d.config import load_config
    from carv3d.errors import UserError

    for label, overrides in settings["arms"].items():
        entry = settings["arm_config_files"][label]
        try:
            cfg = load_config(entry["file"], [*settings["overrides"], *overrides], settings["prompts"][0])
        except UserError as err:
            raise SystemExit(f"arm {label}: {err}") from None
        if entry["scene_type"] is not None and str(cfg.scene.type) != entry["scene_type"]:
            raise SystemExit(f"arm {label}: trains scene.type={cfg.scene.type} with {entry['file'] or 'the defaults'}, "
                             f"the preset's file for scene.type={entry['scene_type']}.")


def config_text(settings: dict[str, Any]) -> str:
    """Which config file the arms used, in words (reports before per-arm files: ``config_file``)."""
    scene_configs = settings.get("scene_config_files")
    if settings.get("config_file") is not None or scene_configs is None:
        return f"config {settings.get('config_file') or 'defaults'}"
    return "the config of the arm's scene type — " + ", ".join(
        f"{scene_type}: {file or 'defaults'}" for scene_type, file in scene_configs.items())


def protocol_text(settings: dict[str, Any]) -> str:
    arms = settings.get("arms") or DEFAULT_ARMS
    described = "; ".join(f"{label}: {' '.join(overrides)}" for label, overrides in arms.items())
    return (f"Each (prompt, seed) is trained once per arm ({described}), everything else identical ("
            f"{config_text(settings)}; overrides {settings['overrides']}), for "
            f"{settings['budget_seconds']:g} s of training wall clock each; the scene is evaluated in-process at "
            f"{len(settings['checkpoint_seconds'])} equal-time checkpoints {settings['checkpoint_seconds']} with the "
            f"training clock paused (Trainer.train_until; CUDA synchronised per step), so a checkpoint's clock overshoots "
            f"its nominal time by less than one step (t_train). {settings['parallel']} runs train side by side on one "
            f"device; the runs of one prompt and seed are dispatched back to back, every arm once (the order reversed "
            f"on alternate groups), so the arms run concurrently under the same contention and a budget is wall clock "
            f"under that contention. Aggregates: mean ± sample std over seeds of the prompt-averaged metric. Time to "
            f"reach: an arm's mean IoU curve, linearly interpolated on the checkpoint grid, against the baseline "
            f"({settings.get('baseline') or DEFAULT_BASELINE}) arm's final mean IoU; steps to reach: the arms' mean "
            f"step count interpolated at that time. "
            f"Runs reused with --resume were measured under the contention of their own session.")


def new_report(settings: dict[str, Any], command: str) -> dict[str, Any]:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    settings = {**settings, "device": device}
    return {"benchmark": "quality: arms (CARV vs SDS by default) at equal wall clock against the world's ground truth", "command": command,
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "settings": settings,
            "protocol": protocol_text(settings), "runs": {}, "sessions": []}


def reusable_runs(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Finished runs of an earlier JSON at ``path`` made with the same comparable settings."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    before, now = comparable_settings(old["settings"]), comparable_settings(settings)
    if before != now:
        differ = "; ".join(f"{key} {before[key]} → {now[key]}" for key in now if before[key] != now[key])
        raise SystemExit(f"--resume: {path} was made with other settings ({differ}); "
                         f"use another --out or the same settings.")
    return {key: run for key, run in old["runs"].items() if "error" not in run}


def build_specs(settings: dict[str, Any], done: Iterable[str]) -> list[RunSpec]:
    done = set(done)
    specs = []
    for order, (prompt, seed, method) in enumerate(paired_schedule(settings["prompts"], settings["seeds"], list(settings["arms"]))):
        spec = RunSpec(prompt, seed, method, settings["arm_config_files"][method]["file"],
                       [*settings["overrides"], *settings["arms"][method]],
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
    """One line per finished run: which, its result, elapsed time and an ETA.

    Runs finish in waves (P side by side, each about as long as the budget plus its evaluations),
    so the ETA is a schedule, not ``elapsed / done × remaining`` (which, at the first finished run of
    a 27-run wave, read 3,451 s for a wave that ended 35 s later). With T the mean wall clock of the
    finished runs: every running run ends T after its start, and each queued run starts on the
    first slot that frees; the ETA is when the last one ends. A run starts when the bench starts or
    when a slot frees, and the run that finishes is taken to be the oldest running one.
    """

    def __init__(self, total: int, parallel: int, clock: Callable[[], float] = time.perf_counter):
        self.total, self.parallel, self.clock = total, max(int(parallel), 1), clock
        self.started = clock()
        self.done, self.durations = 0, []
        self.running = [self.started] * min(self.parallel, total)  # start times of the runs in flight

    def finished(self, duration: Optional[float] = None) -> float:
        """Record one finished run (its wall clock, if known); returns the ETA in seconds."""
        now = self.clock()
        self.done += 1
        oldest = min(self.running, default=self.started)
        if self.running:
            self.running.remove(oldest)
        self.durations.append(duration if duration is not None else now - oldest)
        if self.done + len(self.running) < self.total:  # a queued run takes the freed slot
            self.running.append(now)
        return self.eta(now)

    def eta(self, now: float) -> float:
        if not self.durations:
            return float("nan")
        mean = sum(self.durations) / len(self.durations)
        slots = [max(start + mean, now) for start in self.running]  # when each slot frees
        heapq.heapify(slots)
        for _ in range(self.total - self.done - len(self.running)):  # each queued run takes the first free slot
            heapq.heappush(slots, heapq.heappop(slots) + mean)
        return max(slots, default=now) - now

    def line(self, result: dict[str, Any]) -> str:
        duration = None
        if "wall_started" in result and "wall_finished" in result:
            duration = float(result["wall_finished"]) - float(result["wall_started"])
        eta = self.finished(duration)
        elapsed = self.clock() - self.started
        what = f"{result['method']} {result['prompt']!r} seed {result['seed']}"
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
        if args.baseline:  # compare the same runs against another arm (copy the JSON first to keep both)
            arms, _ = report_arms(report)
            if args.baseline not in arms:
                raise SystemExit(f"--baseline {args.baseline!r} is not an arm of {out}; arms: {', '.join(arms)}")
            report["settings"]["baseline"] = args.baseline
        if args.subset:
            report["settings"]["subsets"] = parse_subsets(args.subset, report["settings"]["prompts"])
        report["summary"] = summarize(report)
        write_json(out, report)
        try_plot(report, Path(args.plot) if args.plot else out.with_suffix(".png"))
        print(format_summary(report), flush=True)
        return 0
    settings = resolve_settings(args)
    check_prompts(settings["prompts"])
    check_arms(settings)
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    reused = reusable_runs(out, settings) if args.resume else {}
    report = new_report(settings, " ".join(sys.argv if argv is None else ["bench_quality.py", *argv]))
    if args.resume and out.is_file():  # keep the earlier sessions' timings next to the runs they made
        report["sessions"] = json.loads(out.read_text()).get("sessions", [])
    report["runs"].update({key: run for key, run in reused.items()
                           if key in {run_key(*entry) for entry in paired_schedule(settings["prompts"], settings["seeds"], list(settings["arms"]))}})
    specs = build_specs(settings, report["runs"])
    session: dict[str, Any] = {"started": time.time(), "runs_planned": len(specs), "runs_reused": len(report["runs"])}
    report["sessions"].append(session)
    print(f"[bench_quality] {len(specs)} runs to do ({len(report['runs'])} reused), {settings['parallel']} side by side, "
          f"{settings['budget_seconds']:g} s each, checkpoints {settings['checkpoint_seconds']}", flush=True)
    session["cuda_extension_warm_up_seconds"] = warm_up_cuda_extensions()  # once here, not in every worker
    report["summary"] = summarize(report)
    write_json(out, report)
    progress = Progress(len(specs), settings["parallel"])

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
