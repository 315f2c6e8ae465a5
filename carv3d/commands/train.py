"""`carv3d train`: train a scene from a prompt, or continue a run with ``--resume RUN_DIR``."""

from __future__ import annotations

import argparse

from carv3d.errors import UserError

NAME = "train"
HELP = "train a scene from a prompt (or continue one with --resume)"
DESCRIPTION = "Layers: defaults ← --config FILE ← key=value overrides ← --prompt."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", help='the text prompt, e.g. "a red cube"')
    parser.add_argument("--config", help="a YAML config file (see configs/)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    parser.add_argument("--help-config", action="store_true",
                        help="print every config key with its value (after --config and overrides), its meaning and "
                             "its valid range, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")


def run(args: argparse.Namespace) -> int:
    from carv3d.config import load_config

    if args.help_config:
        from carv3d.config_help import commented_yaml

        print(commented_yaml(load_config(args.config, args.overrides, args.prompt)), end="")
        return 0
    if args.resume:
        if args.prompt is not None or args.config is not None:
            raise UserError("--resume continues a run with its own config; drop --prompt/--config (key=value overrides such as train.steps=2000 are allowed).")
        from carv3d.train import resume

        run_dir = resume(args.resume, args.overrides)
    else:
        from carv3d.train import train

        cfg = load_config(args.config, args.overrides, args.prompt)
        run_dir = train(cfg)
    print(f"run finished: {run_dir}")
    return 0
