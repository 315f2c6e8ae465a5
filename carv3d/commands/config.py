"""`carv3d config show`: the resolved config (defaults ← --config FILE ← key=value ← --prompt) as YAML."""

from __future__ import annotations

import argparse

NAME = "config"
HELP = "show the resolved config of a run before starting it"
DESCRIPTION = ("`carv3d config show [--config FILE] [key=value ...]` prints the config a `carv3d train` with the "
               "same arguments would run on this machine, as YAML (a valid --config file): on a CPU the keys "
               "you did not set take CPU-sized values, listed in a comment at the top. --describe adds each "
               "key's meaning and valid range.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="show")
    show = actions.add_parser("show", help="print the resolved config", description=DESCRIPTION)
    show.add_argument("--config", help="a YAML config file (see configs/)")
    show.add_argument("--prompt", help='the text prompt, e.g. "a red cube"')
    show.add_argument("--describe", action="store_true", help="add a comment with each key's description and range")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")


def run(args: argparse.Namespace) -> int:
    from carv3d.config import load_config, to_yaml
    from carv3d.devices import resolve_device
    from carv3d.sizing import size_for_device

    cfg = load_config(args.config, args.overrides, args.prompt)
    device = resolve_device(cfg.train.device)
    changes = size_for_device(cfg, device)  # as the trainer does before it builds anything
    if changes:
        print(f"# sized for this machine ({device.type}); set a key to keep its other value:")
        for key, (old, new) in changes.items():
            print(f"#   {key}: {old} → {new}")
    if args.describe:
        from carv3d.config_help import commented_yaml

        print(commented_yaml(cfg), end="")
    else:
        print(to_yaml(cfg), end="")
    return 0
