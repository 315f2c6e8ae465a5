#!/usr/bin/env python
"""Markdown tables for docs/BENCHMARKS.md from the benchmark scripts' JSON, so no figure is typed by hand.

    python scripts/tables.py speed docs/bench_speed_h200.json
    python scripts/tables.py quality docs/bench_quality_h200.json
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


def quality_table(report: dict[str, Any]) -> str:
    """Per prompt and overall: final IoU of each method (mean ± std over seeds), CARV's time to reach SDS's final IoU."""
    summary = report["summary"]
    lines = ["| prompt | SDS final IoU | CARV final IoU | CARV at ≤ 40 % of the time | CARV time to SDS's final IoU | "
             "ahead at every checkpoint | best match = prompt (SDS / CARV) | front on the front (SDS / CARV) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in [*summary["prompts"].items(), ("**all prompts**", summary["overall"])]:
        lines.append(f"| {name} | {row['sds_final']} | {row['carv_final']} | {row['carv_at_40_percent']} | "
                     f"{row['time_to_reach']} | {row['ahead']} | {row['best_match']} | {row['front_back']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("speed", "quality"))
    parser.add_argument("json")
    args = parser.parse_args()
    with open(args.json) as handle:
        report = json.load(handle)
    print(speed_table(report) if args.kind == "speed" else quality_table(report))


if __name__ == "__main__":
    main()
