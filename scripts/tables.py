#!/usr/bin/env python
"""Markdown tables for docs/BENCHMARKS.md from the benchmark scripts' JSON, so no figure is typed by hand.

    python scripts/tables.py speed docs/bench_speed_h200.json
    python scripts/tables.py quality docs/bench_quality_h200.json
    python scripts/tables.py world docs/quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional


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
            missing.add(f"{row['grid']} ({row.get('status')}: {row.get('reason', row.get('error', ''))})".strip())
            continue
        split = row["split_ms"]
        lines.append(
            f"| {row['teacher']} | {row['grid']} | {row['sampler']} | {row['noise_draws']} | "
            f"{row['ms_per_step_median']:.1f} | {row['it_per_s']:.1f} | {split['render']:.1f} | {split['encode']:.1f} | "
            f"{split['teacher']:.1f} | {split['backward']:.1f} | {split['optimizer']:.1f} | "
            f"{row['peak_memory_gb']:.2f} | {row['floor_ms']:.1f} | {row['step_over_floor']:.1f} |")
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


def quality_table(report: dict[str, Any]) -> str:
    """Per prompt and overall (scripts/bench_quality.py): final silhouette IoU of each method (mean ± std
    over seeds), the time CARV needs to reach SDS's final IoU, whether CARV is ahead at every
    equal-time checkpoint, and the shares of runs whose best match is the prompted object and whose
    front is on the front."""
    budget = report["settings"]["budget_seconds"]
    lines = [f"| prompt | SDS IoU at {budget:g} s | CARV IoU at {budget:g} s | CARV reaches SDS's final IoU at | "
             "CARV ahead at every checkpoint | best match = prompt (SDS / CARV) | front on the front (SDS / CARV) |",
             "|---|---|---|---|---|---|---|"]
    summary = report["summary"]
    rows = [*summary["per_prompt"].items(), ("**all prompts**", summary["overall"])]
    for name, row in rows:
        curves = row["curves"]
        seconds, fraction = row.get("carv_seconds_to_baseline_final_iou"), row.get("carv_fraction_of_budget")
        reach = "never" if seconds is None else f"{seconds:.1f} s ({fraction:.0%})"
        best = " / ".join(_fraction(_final(curves, m, "best_match_is_prompted")) for m in ("sds", "carv"))
        front = " / ".join(_fraction(_final(curves, m, "front_matches_front")) for m in ("sds", "carv"))
        lines.append(f"| {name} | {_mean_std(_final(curves, 'sds', 'silhouette_iou'))} | "
                     f"{_mean_std(_final(curves, 'carv', 'silhouette_iou'))} | {reach} | "
                     f"{'yes' if row['carv_ahead_on_iou']['every_checkpoint'] else 'no'} | {best} | {front} |")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("speed", "quality", "world"))
    parser.add_argument("json")
    args = parser.parse_args()
    with open(args.json) as handle:
        report = json.load(handle)
    print({"speed": speed_table, "quality": quality_table, "world": world_table}[args.kind](report))


if __name__ == "__main__":
    main()
