#!/usr/bin/env python
"""The embedded teacher's quality bar: train world prompts with one config, evaluate each against its ground truth.

    python scripts/bench_world_quality.py --config configs/demo_cpu.yaml --out docs/quality_cpu.json
    python scripts/bench_world_quality.py --out docs/quality_h200.json --parallel 6   # default (GPU) config

Each prompt is trained with ``carv3d train`` semantics (the given config, seed, no turntable) into
``--workdir`` and scored by ``carv3d evaluate`` (16 held-out views at 64 px; Chamfer against the
exported mesh when ``export.at_end`` is on). The bar (README, "Evaluating against the ground
truth"): the best-matching world object is the prompted one for every prompt, mean silhouette IoU
≥ 0.85 with the CPU demo config and ≥ 0.9 with the default GPU config, and objects whose front
differs from their back show their front on the front. The JSON is rewritten after every prompt,
so an interrupted run keeps what it measured; ``--resume`` skips prompts already in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_PROMPTS = ("a red cube", "a blue sphere", "a green torus", "a blue house", "a yellow duck", "an orange chair")
HEADLINE = ("silhouette_iou", "masked_colour_error", "psnr", "chamfer", "best_match", "best_match_is_prompted",
            "front_matches_front")


def training_seconds(run_dir: Path) -> float:
    """The run's training clock (steps only: no validation, checkpoints or export) from metrics.jsonl."""
    last = Path(run_dir, "metrics.jsonl").read_text().strip().splitlines()[-1]
    return float(json.loads(last)["elapsed_seconds"])


def bar_verdict(rows: list[dict], iou_bar: float) -> dict:
    """The quality bar over finished prompts: every best match prompted, mean IoU ≥ iou_bar, fronts right."""
    ious = [row["silhouette_iou"] for row in rows]
    fronts = [row["front_matches_front"] for row in rows if row["front_matches_front"] is not None]
    mean_iou = sum(ious) / len(ious) if ious else None
    return {
        "prompts": len(rows),
        "mean_silhouette_iou": mean_iou,
        "iou_bar": iou_bar,
        "iou_met": mean_iou is not None and mean_iou >= iou_bar,
        "best_match_all_prompted": all(row["best_match_is_prompted"] for row in rows),
        "fronts_right": f"{sum(fronts)}/{len(fronts)}",
        "fronts_all_right": all(fronts),
    }


@dataclass(frozen=True)
class PromptJob:
    """One prompt of the bench: what a worker process needs to train and score it."""

    index: int
    prompt: str
    config: Optional[str]
    overrides: tuple
    workdir: str
    reuse_runs: bool


def train_and_score(job: PromptJob) -> dict:
    """Train one world prompt (or reuse its finished run) and evaluate it; failures come back as a row."""
    try:
        from carv3d.config import load_config
        from carv3d.train import train
        from carv3d.run_evaluation import evaluate_run

        workdir = Path(job.workdir)
        name = f"{job.index:02d}_" + job.prompt.replace(" ", "_")
        overrides = ["train.turntable_frames=0", "train.progress=false", f"train.output_dir={workdir}",
                     f"train.run_name={name}", *job.overrides]
        cfg = load_config(job.config, overrides, job.prompt)
        existing = workdir / name
        if job.reuse_runs and (existing / "mesh" / "mesh.ply").exists():
            run_dir = existing  # trained earlier; only the evaluation is new
        else:
            run_dir = train(cfg)
        result, _ = evaluate_run(run_dir, overwrite=True)
        return {"prompt": job.prompt, "run_dir": str(run_dir), "steps": int(cfg.train.steps),
                "seconds": training_seconds(run_dir), **{key: result.get(key) for key in HEADLINE},
                "ranking": (result.get("ranking") or [])[:3], "front_back": result.get("front_back"),
                "truth_lighting": result["views"]["truth_lighting"]}
    except Exception as err:  # reported by the parent; the other prompts go on
        return {"prompt": job.prompt, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="config file (default: the built-in defaults, the GPU config)")
    parser.add_argument("--prompt", action="append", dest="prompts", help="world prompt (repeat); default: six")
    parser.add_argument("--iou-bar", type=float, default=None, help="default 0.85 with a config file, else 0.9")
    parser.add_argument("--workdir", default="runs/bench_world_quality")
    parser.add_argument("--out", default="world_quality.json")
    parser.add_argument("--resume", action="store_true", help="keep the prompts already in --out")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="evaluate finished runs already in --workdir instead of training them again")
    parser.add_argument("--parallel", type=int, default=1,
                        help="prompts trained side by side (worker processes; steps and scores are unchanged, "
                             "only the wall clock per run is shared)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.parallel < 1:
        raise SystemExit("--parallel must be at least 1")

    import torch

    from carv3d.io import atomic_write_text
    from carv3d.log import setup_logging

    setup_logging()
    prompts = args.prompts or list(DEFAULT_PROMPTS)
    iou_bar = args.iou_bar if args.iou_bar is not None else (0.85 if args.config else 0.9)
    out = Path(args.out)
    report = json.loads(out.read_text()) if args.resume and out.exists() else {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "config": args.config, "overrides": args.overrides, "parallel": args.parallel, "rows": []}
    done = {row["prompt"] for row in report["rows"]}
    jobs = [PromptJob(index, prompt, args.config, tuple(args.overrides), args.workdir, args.reuse_runs)
            for index, prompt in enumerate(prompts) if prompt not in done]

    def on_result(row: dict) -> None:
        if "error" in row:
            print(f"[world_quality] {row['prompt']} failed: {row['error']}\n{row['traceback']}", flush=True)
            return
        report["rows"].append(row)
        report["rows"].sort(key=lambda r: prompts.index(r["prompt"]) if r["prompt"] in prompts else len(prompts))
        report["bar"] = bar_verdict(report["rows"], iou_bar)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=2))
        print(f"[world_quality] {row['prompt']}: IoU {row['silhouette_iou']:.3f}, best match {row['best_match']}, "
              f"front right {row['front_matches_front']}, trained in {row['seconds']:.0f} s", flush=True)

    from carv3d.devices import warm_up_cuda_extensions
    from carv3d.workers import run_in_workers

    if args.parallel > 1:
        warm_up_cuda_extensions()  # build the CUDA extensions once here, not in every worker at the same time
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    run_in_workers(jobs, args.parallel, threads, on_result, worker=train_and_score)
    print(json.dumps(report.get("bar"), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
