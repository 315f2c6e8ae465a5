"""`carv3d sweep FILE`: run a sweep file's runs locally or on Ray."""

from __future__ import annotations

import argparse

NAME = "sweep"
HELP = "run a sweep file (grid/zip of config overrides) locally or on Ray"
DESCRIPTION = ("Re-running a sweep skips finished runs and resumes unfinished ones. Results: "
               "<output_dir>/<name>/summary.csv and summary.md. Exit code 1 when a run failed.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a sweep file (see configs/sweeps/)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="local: in-process, or one worker per GPU; ray: one Ray task per run (pip install 'carv3d[ray]')")
    parser.add_argument("--max-parallel", type=int, default=None, metavar="N",
                        help="most runs at once (local default: one per visible GPU; ray default: as Ray schedules)")
    parser.add_argument("--address", default=None, help="Ray cluster address, e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001 "
                                                        "(default: a local Ray instance)")
    parser.add_argument("--dry-run", action="store_true", help="validate the file and print what each run would do")
    parser.add_argument("--max-runs", type=int, default=1000, metavar="N",
                        help="refuse a sweep of more runs than this, before any work (default 1000)")


def run(args: argparse.Namespace) -> int:
    from carv3d.sweep import run_sweep

    outcome = run_sweep(args.file, backend=args.backend, max_parallel=args.max_parallel, address=args.address,
                        dry_run=args.dry_run, max_runs=args.max_runs)
    print(outcome.report())
    return outcome.exit_code
