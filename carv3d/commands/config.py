"""`carv3d config show`: the resolved config (defaults ← --config FILE ← key=value ← --prompt) as YAML."""

from __future__ import annotations

import argparse

NAME = "config"
HELP = "show the resolved config of a run before starting it"
DESCRIPTION = ("`carv3d config show [--config FILE] [key=value ...]` prints the config a `carv3d train` with the "
               "same arguments would run, as YAML (a valid --config file); --describe adds each key's meaning "
               "and valid range.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="show")
    show = actions.add_parser("show", help="print the resolved config", description=DESCRIPTION)
    show.add_argument("--config", help="a YAML config file (see configs/)")
    show.add_argument("--prompt", help='the text prompt, e.g. "a red cube"')
    show.add_argument("--describe", action="store_true", help="add a comment with each key's description and range")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")


def run(args: argparse.Namespace) -> int:
    from carv3d.config import load_config, to_yaml

    cfg = load_config(args.config, args.overrides, args.prompt)
    if args.describe:
        from carv3d.config_help import commented_yaml

        print(commented_yaml(cfg), end="")
    else:
        print(to_yaml(cfg), end="")
    return 0
