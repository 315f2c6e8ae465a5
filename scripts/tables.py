#!/usr/bin/env python
"""Markdown tables for docs/BENCHMARKS.md from the benchmark scripts' JSON, so no figure is typed by hand.

    python scripts/tables.py speed docs/bench_speed_h200.json
    python scripts/tables.py quality docs/bench_quality_h200.json
    python scripts/tables.py world docs/quality_cpu.json
    python scripts/tables.py variance docs/variance_h200.json
    python scripts/tables.py profile OUT/profile.json        # bench_speed --profile: the top-10 kernels
    python scripts/tables.py fullrun OUT/gaussians_full_run.json   # bench_speed --full-run-steps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # carv3d from a checkout


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def speed_table(report: dict[str, Any]) -> str:
    """One row per measured configuration of scripts/bench_speed.py (unavailable backends listed below)."""
    lines = ["| teacher | grid | sampler | K | ms/step (median) | it/s | render | encode | teacher | backward | "
             "optimizer | peak GB | floor ms | × floor |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    missing = set()
    for row in report["results"]:
        if row.get("status") != "ok":
            missing.add(f"{row.get('grid') or row.get('rasterizer_requested')} ({row.get('status')}: {row.get('reason', row.get('error', ''))})".strip())
            continue
        split = row["split_ms"]
        grid, sampler = row["grid"], row["sampler"]
        if row.get("scene") == "gaussians":  # splats: the rasterizer and the render size instead
            height, width = row["render_size"]
            grid, sampler = f"splats, {row['rasterizer']}", f"{height}²" if height == width else f"{height}×{width}"
        lines.append(
            f"| {row['teacher']} | {grid} | {sampler} | {row['noise_draws']} | "
            f"{row['ms_per_step_median']:.1f} | {row['it_per_s']:.1f} | {split['render']:.1f} | {split['encode']:.1f} | "
            f"{split['teacher']:.1f} | {split['backward']:.1f} | {split['optimizer']:.1f} | "
            f"{_fmt(row['peak_memory_gb'], '.2f')} | {row['floor_ms']:.1f} | {row['step_over_floor']:.1f} |")
    card = report.get("card", {})
    lines.append("")
    lines.append(f"Card: {report.get('device_name')}, measured matmul {card.get('matmul_tflops_best', 0):.0f} TFLOP/s "
                 f"(bf16), copy {card.get('copy_bandwidth_gb_s', 0):.0f} GB/s; torch {report.get('torch')}; "
                 f"{report.get('date')}.")
    for item in sorted(missing):
        lines.append(f"Not measured: {item}.")
    return "\n".join(lines)


def _final(curves: dict[str, Any], method: str, metric: str) -> Optional[dict[str, Any]]:
    points = curves[method].get(metric) or []
    return points[-1] if points else None


def _mean_std(point: Optional[dict[str, Any]], spec: str = ".3f") -> str:
    if point is None or point.get("mean") is None:
        return "—"
    return f"{point['mean']:{spec}} ± {point['std']:{spec}}" if point.get("std") is not None else f"{point['mean']:{spec}}"


def _fraction(point: Optional[dict[str, Any]]) -> str:
    return "—" if point is None or point.get("mean") is None else f"{point['mean']:.0%}"


def _arm_name(arm: str) -> str:
    """A short column name: the two presets' labels stay, sweep labels lose their key prefixes."""
    return arm.replace("preset_", "").replace("guidance_type_", "").replace("-", " ")


def quality_table(report: dict[str, Any]) -> str:
    """Per prompt and overall (scripts/bench_quality.py): each arm's final silhouette IoU (mean ± std
    over seeds); for each arm against the baseline the time it needs to reach the baseline's final
    IoU and whether it is ahead at every equal-time checkpoint on IoU and colour error; the share of
    runs whose best match is the prompted object. Reports from before arms (sds and carv only, with
    carv_* fields) are read too."""
    budget = report["settings"]["budget_seconds"]
    summary = report["summary"]
    overall = summary["overall"]
    arms = list(overall["curves"])
    legacy = "versus_baseline" not in overall
    baseline = "sds" if legacy else overall["baseline"]
    others = [arm for arm in arms if arm != baseline]
    header = [f"{_arm_name(arm)} IoU at {budget:g} s" for arm in arms]
    for arm in others:
        header += [f"{_arm_name(arm)} reaches {_arm_name(baseline)}'s final IoU at",
                   f"{_arm_name(arm)} ahead at every checkpoint (IoU / colour)"]
    header.append(f"best match = prompt ({' / '.join(_arm_name(arm) for arm in arms)})")
    lines = ["| prompt | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    rows = [*summary["per_prompt"].items(), ("**all prompts**", overall)]
    for name, row in rows:
        curves = row["curves"]
        cells = [_mean_std(_final(curves, arm, "silhouette_iou")) for arm in arms]
        for arm in others:
            if legacy:
                seconds, fraction = row.get("carv_seconds_to_baseline_final_iou"), row.get("carv_fraction_of_budget")
                ahead_iou = row["carv_ahead_on_iou"]["every_checkpoint"]
                colour = row.get("carv_ahead_on_colour_error")
                ahead_colour = None if colour is None else colour["every_checkpoint"]
            else:
                result = row["versus_baseline"][arm]
                seconds, fraction = result["seconds_to_baseline_final_iou"], result["fraction_of_budget"]
                ahead_iou = result["ahead_on_iou"]["every_checkpoint"]
                ahead_colour = result["ahead_on_colour_error"]["every_checkpoint"]
            cells.append("never" if seconds is None else f"{seconds:.1f} s ({fraction:.0%})")
            cells.append(" / ".join({True: "yes", False: "no", None: "—"}[flag] for flag in (ahead_iou, ahead_colour)))
        cells.append(" / ".join(_fraction(_final(curves, arm, "best_match_is_prompted")) for arm in arms))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checkpoints_table(report: dict[str, Any]) -> str:
    """scripts/bench_quality.py over time: for each arm, at each equal-time checkpoint, its overall
    curves (bench_quality's mean over seeds of each seed's mean over prompts; with every prompt run
    for every seed, the mean over runs): IoU, the share of runs whose best match is the prompt and
    of runs with a front whose front is right, and the mean steps; then each prompt's mean IoU."""
    times = report["settings"]["checkpoint_seconds"]
    summary = report["summary"]
    head = "| arm | " + " | ".join(f"{t:g} s" for t in times) + " |"
    rule = "|---" * (len(times) + 1) + "|"

    def rows(curves: dict[str, Any], metric: str, spec: str) -> list[str]:
        return [f"| {_arm_name(arm)} | " + " | ".join(
            "—" if p.get("mean") is None else f"{p['mean']:{spec}}" for p in curves[arm][metric]) + " |"
            for arm in curves]

    overall = summary["overall"]["curves"]
    lines = ["Mean IoU, all prompts and seeds:", "", head, rule, *rows(overall, "silhouette_iou", ".3f"), "",
             "Best match = prompt:", "", head, rule, *rows(overall, "best_match_is_prompted", ".0%"), "",
             "Front right (runs with a front):", "", head, rule, *rows(overall, "front_matches_front", ".0%"), "",
             "Mean steps taken:", "", head, rule,
             *[f"| {_arm_name(arm)} | " + " | ".join(f"{n:.0f}" for n in steps) + " |"
               for arm, steps in summary["overall"]["mean_steps"].items()]]
    for prompt, row in summary["per_prompt"].items():
        lines += ["", f"Mean IoU, {prompt}:", "", head, rule, *rows(row["curves"], "silhouette_iou", ".3f")]
    return "\n".join(lines)


def world_table(report: dict[str, Any]) -> str:
    """scripts/bench_world_quality.py: one row per prompt, then the bar's verdict."""
    lines = ["| prompt | silhouette IoU | best match | front on the front | colour error | PSNR | Chamfer | training s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        front = {True: "yes", False: "no", None: "—"}[row["front_matches_front"]]
        lines.append(f"| {row['prompt']} | {row['silhouette_iou']:.3f} | {row['best_match']} | {front} | "
                     f"{row['masked_colour_error']:.3f} | {row['psnr']:.1f} | {_fmt(row.get('chamfer'), '.4f')} | "
                     f"{_fmt(row.get('seconds'), '.0f')} |")
    bar = report["bar"]
    lines.append("")
    lines.append(f"Mean IoU {bar['mean_silhouette_iou']:.3f} (bar {bar['iou_bar']}: {'met' if bar['iou_met'] else 'missed'}); "
                 f"best match prompted for every prompt: {'yes' if bar['best_match_all_prompted'] else 'no'}; "
                 f"fronts right: {bar['fronts_right']}.")
    return "\n".join(lines)


def _variance_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """carv3d.variance's fit of σ_b², σ_w² (recomputed, so older JSON gets the current fit)."""
    try:
        from carv3d.variance import variance_split
    except ImportError:  # tables.py also runs without the package installed
        return {}
    return variance_split(rows)


def proposal_comparison(report: dict[str, Any], candidate: str = "adaptive", reference: str = "is+stratified") -> str:
    """How often ``candidate`` has the lower variance than ``reference`` at the same phase and (R, K),
    and the median and range of their variance ratio (cost is left out: it is noise when flat in K)."""
    ratios = []
    for phase in report["phases"].values():
        by_key = {(r["method"], r["upstream_samples"], r["noise_draws"]): r["variance"] for r in phase["rows"]}
        for (method, r, k), variance in by_key.items():
            if method == candidate and (reference, r, k) in by_key:
                ratios.append(variance / by_key[(reference, r, k)])
    if not ratios:
        return f"No paired {candidate} / {reference} rows."
    ratios.sort()
    median = ratios[len(ratios) // 2] if len(ratios) % 2 else 0.5 * (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2])
    return (f"{candidate} vs {reference}, same phase and (R, K): lower variance in {sum(x < 1 for x in ratios)} of "
            f"{len(ratios)} pairs; variance ratio median {median:.2f} (range {ratios[0]:.2f}–{ratios[-1]:.2f}).")


def camera_comparison(report: dict[str, Any], min_renders: int = 2) -> str:
    """Camera-stratified rows against the plain-camera rows of the same checkpoint, method and (R, K),
    for R ≥ ``min_renders`` (single renders are marginally uniform either way): how often the
    variance is lower and the range of the ratio."""
    ratios = []
    for name, phase in report["phases"].items():
        plain = report["phases"].get(name.replace("_camera_stratified", "")) if name.endswith("_camera_stratified") else None
        if plain is None:
            continue
        base = {(r["method"], r["upstream_samples"], r["noise_draws"]): r["variance"] for r in plain["rows"]}
        for r in phase["rows"]:
            key = (r["method"], r["upstream_samples"], r["noise_draws"])
            if r["upstream_samples"] >= min_renders and key in base:
                ratios.append(r["variance"] / base[key])
    if not ratios:
        return ""
    return (f"Stratified against plain cameras, R ≥ {min_renders}, same checkpoint, method and (R, K): lower variance "
            f"in {sum(x < 1 for x in ratios)} of {len(ratios)} pairs; ratio {min(ratios):.2f}–{max(ratios):.2f}.")


def variance_table(report: dict[str, Any]) -> str:
    """scripts/bench_variance.py: per phase and (R, K), each method's ECM against uniform t with
    (R, K) = (2, 1) and, in brackets, its variance as a fraction of that baseline's. A
    ``_camera_stratified`` phase is also compared with the plain-camera baseline of the same
    checkpoint when the file holds it (its own baseline uses stratified cameras too)."""
    phases = report["phases"]
    methods = list(dict.fromkeys(row["method"] for phase in phases.values() for row in phase["rows"]))
    lines = ["| phase (step) | R × K | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    notes = []
    for name, phase in phases.items():
        plain = phases.get(name.replace("_camera_stratified", "")) if name.endswith("_camera_stratified") else None
        reference = phase
        if plain is not None:
            reference = plain
            notes.append(f"`{name}` is measured against the plain-camera baseline of step {plain['step']}.")
        base = next(r for r in reference["rows"] if (r["method"], r["upstream_samples"], r["noise_draws"]) == ("uniform", 2, 1))
        cells: dict[tuple[int, int], dict[str, str]] = {}
        for row in phase["rows"]:
            ratio = row["variance"] / base["variance"]
            ecm = base["variance"] * base["cost_seconds"] / (row["variance"] * row["cost_seconds"])
            cells.setdefault((row["upstream_samples"], row["noise_draws"]), {})[row["method"]] = f"{ecm:.2f} ({ratio:.2f})"
        for (r, k), by_method in sorted(cells.items(), key=lambda item: (item[0][1], item[0][0])):
            lines.append(f"| {name} ({phase['step']}) | {r} × {k} | " +
                         " | ".join(by_method.get(m, "—") for m in methods) + " |")
        split = _variance_split(phase["rows"])
        if split and plain is None:
            notes.append(f"`{name}`: σ_b² ≈ {split['sigma_b2']:.3g}, σ_w² ≈ {split['sigma_w2']:.3g} "
                         f"(σ_w²/σ_b² ≈ {split['sigma_w2'] / split['sigma_b2']:.1f}; uniform rows, "
                         f"Var(R, K) = σ_b²/R + σ_w²/(R·K)).")
    lines.append("")
    lines.append(proposal_comparison(report))
    cameras = camera_comparison(report)
    if cameras:
        lines.append(cameras)
    lines.append("")
    lines.append(f"Cells: ECM (variance / baseline variance); M = {report['draws']} gradients per estimator; "
                 f"{report.get('device')}.")
    lines.extend(notes)
    return "\n".join(lines)


def profile_table(report: dict[str, Any]) -> str:
    """scripts/bench_speed.py --profile: the top kernels of the step with their section (the formatter
    lives in carv3d.testing.profile, next to the code that makes the numbers)."""
    from carv3d.testing.profile import profile_markdown

    profile = report["profile"]
    if profile.get("status") != "ok":
        return f"Not measured: {profile.get('config')} ({profile.get('status')}: {profile.get('reason', '')})."
    return profile_markdown(profile)


def full_run_table(report: dict[str, Any]) -> str:
    """scripts/bench_speed.py --full-run-steps: one row per run (cold / warm compile cache), seconds."""
    section = report["full_run"]
    total = section["projected_steps"]
    lines = [f"| config | steps | cache | wall s | start-up s | first step done s | steps/s (steady) | "
             f"steps/s settled (one-offs s) | outputs s (export) | peak GB | {total:,}-step run s (projected) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in section["runs"]:
        if run.get("status") != "ok" and run.get("steps_done") is None:
            lines.append(f"| {section['config']} | {section['steps']} | {run['cache']} | {run.get('status')}: "
                         f"{run.get('reason', '')} | | | | | | | |")
            continue
        projected = (run.get("projection") or {}).get("projected_s")
        # a run stopped at its timeout still reports how far it got: "253 of 1000 (timed out)"
        steps = run["steps_done"] if run.get("status") == "ok" else \
            f"{run['steps_done']} of {section['steps']} ({run.get('status')})"
        lines.append(
            f"| {section['config']} | {steps} | {run['cache']} | {run['wall_s']:.1f} | "
            f"{_fmt(run.get('startup_s'), '.1f')} | {_fmt(run.get('time_to_first_step_s'), '.1f')} | "
            f"{_fmt(run.get('steps_per_s_steady'), '.2f')} | {_fmt(run.get('steps_per_s_settled'), '.2f')} "
            f"({_fmt(run.get('one_off_s'), '.1f')}) | {_fmt(run.get('outputs_s'), '.1f')} "
            f"({_fmt(run.get('export_s'), '.1f')}) | {_fmt(run.get('peak_memory_gb'), '.2f')} | {_fmt(projected, '.0f')} |")
    lines.append("")
    lines.append(f"{report.get('device_name')}, torch {report.get('torch')}, {report.get('date')}; "
                 f"K over the runs: {', '.join(str(r.get('noise_draws_path')) for r in section['runs'])}. "
                 f"Projection: {next((r['projection'].get('formula') for r in section['runs'] if r.get('projection')), '—')}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("speed", "quality", "checkpoints", "world", "variance", "profile", "fullrun"))
    parser.add_argument("json")
    args = parser.parse_args()
    with open(args.json) as handle:
        report = json.load(handle)
    tables = {"speed": speed_table, "quality": quality_table, "checkpoints": checkpoints_table, "world": world_table, "variance": variance_table,
              "profile": profile_table, "fullrun": full_run_table}
    print(tables[args.kind](report))


if __name__ == "__main__":
    main()
