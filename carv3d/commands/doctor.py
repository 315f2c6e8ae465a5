"""`carv3d doctor`: check this machine against the run the same arguments would start (:mod:`carv3d.doctor`)."""

from __future__ import annotations

import argparse
import logging

NAME = "doctor"
HELP = "check this machine for a run: device, backends, CUDA builds, weights, folders"
DESCRIPTION = ("Checks what a `carv3d train` with the same --config, --prompt and key=value overrides would use on "
               "this machine: the prompt against the teacher, the device, the hash-grid backend and ray sampler (or "
               "rasteriser) `auto` picks, the teacher's weights and fast paths, the output and compile-cache folders "
               "and the run name, the turntable's video encoder; on a CUDA machine it builds nerfacc's or gsplat's "
               "kernels now (once per machine, about a minute each) instead of in a run's first step. One line per "
               "check; exit code 1 when a check fails. Creates nothing.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML config file (see configs/); default: the default config")
    parser.add_argument("--prompt", help='the prompt the run will take, checked against the teacher (e.g. "a red cube")')
    parser.add_argument("--no-build", action="store_true", help="do not build or load the CUDA extensions")
    parser.add_argument("--out", default=None, help="also write the checks as JSON to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.device=cpu")


def run(args: argparse.Namespace) -> int:
    from carv3d.log import logger

    level = logger.level
    if not args.verbose:  # the report says what the run's INFO lines would (they follow with -v)
        logger.setLevel(logging.WARNING)
    try:
        return _run(args)
    finally:
        logger.setLevel(level)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from carv3d.config import load_config
    from carv3d.doctor import FAIL, format_checks, run_checks
    from carv3d.io import check_output_file, write_json_report

    cfg = load_config(args.config, args.overrides, args.prompt)
    target = Path(args.out) if args.out else None
    if target is not None:
        check_output_file(target, args.overwrite)  # before the builds, which can take minutes
    checks = run_checks(cfg, build=not args.no_build)
    print(format_checks(checks))
    if target is not None:
        write_json_report(target, {"checks": [check.as_dict() for check in checks],
                                   "config": args.config, "overrides": list(args.overrides or [])})
        print(f"wrote {target}")
    return 1 if any(check.status == FAIL for check in checks) else 0
