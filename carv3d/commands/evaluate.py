"""`carv3d evaluate RUN_DIR`: a run against the embedded world's ground truth (world prompts only)."""

from __future__ import annotations

import argparse
from typing import Optional

NAME = "evaluate"
HELP = "score a run against the embedded world's ground truth (world prompts only)"
DESCRIPTION = ("Renders the run and the ground truth from fixed held-out views; reports silhouette IoU, masked colour "
               "error, PSNR, the Chamfer distance of RUN_DIR/mesh/mesh.ply, the best-matching world object and the "
               "front/back check. Writes JSON.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (its latest checkpoint)")
    parser.add_argument("--views", type=int, default=16, help="held-out views: a multiple of 4, at least 12 (default 16)")
    parser.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--out", default=None, help="output JSON (default RUN_DIR/evaluation.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def evaluate_command(run_dir: str, views: int = 16, resolution: int = 64, out: Optional[str] = None,
                     overwrite: bool = False, device: str = "auto") -> str:
    """:func:`carv3d.run_evaluation.evaluate_run`, then the summary table and where the JSON went."""
    from carv3d.run_evaluation import evaluate_run
    from carv3d.world.evaluate import format_summary

    result, target = evaluate_run(run_dir, views, resolution, out, overwrite, device)
    return f"{format_summary(result)}\nwrote {target}"


def run(args: argparse.Namespace) -> int:
    print(evaluate_command(args.run_dir, views=args.views, resolution=args.resolution, out=args.out,
                           overwrite=args.overwrite, device=args.device))
    return 0
