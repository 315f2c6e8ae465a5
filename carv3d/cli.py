"""The `carv3d` command: builds the parser from :mod:`carv3d.commands`, sets up logging, runs one command.

User errors (carv3d.errors.UserError) print one line and exit with code 2; bugs show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from carv3d.commands import COMMANDS
from carv3d.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carv3d", description="Text-to-3D by score distillation with the CARV estimator.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from carv3d.log import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # carv3d never downloads weights at run time
    handlers = {command.NAME: command.run for command in COMMANDS}
    try:
        return handlers[args.command](args)
    except UserError as err:
        print(f"carv3d {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"carv3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
