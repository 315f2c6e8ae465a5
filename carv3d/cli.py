"""The `carv3d` command: builds the parser from :mod:`carv3d.commands`, sets up logging, runs one command.

User errors (carv3d.errors.UserError) print one line and exit with code 2; bugs show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Optional, Sequence

from carv3d.commands import COMMANDS
from carv3d.errors import UserError

INTERRUPTED = 130  # the exit code of a Ctrl-C, as shells report it


def _version() -> str:
    from carv3d import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carv3d", description="Text-to-3D by score distillation with the CARV estimator.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_arguments(sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION))
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse, accepting ``key=value`` overrides on both sides of the options.

    argparse gives a positional list only its first run of values: ``carv3d train --config F a=1
    --prompt P b=2`` would reject ``b=2``. The overrides after an option join the earlier ones, in
    the order typed (a later value of a key wins); anything else unknown is the usual error.
    """
    args, rest = parser.parse_known_args(argv)
    if rest:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in rest):
            args.overrides = [*(args.overrides or []), *rest]
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


class _InterruptSeen:
    """Python's SIGINT handler that also remembers the interrupt: a Ctrl-C inside a module's import
    can surface as another exception (numpy's lazy ``np.dtypes``, imported by accelerate while
    diffusers loads, turns it into a RecursionError), which is then an interrupt, not a bug."""

    seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Ctrl-C can arrive anywhere, also while the parser's imports load torch: a clean exit 130 then.
    command = "carv3d"
    interrupt = _InterruptSeen()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    try:
        from carv3d.log import setup_logging

        args = parse_arguments(build_parser(), argv)
        command = f"carv3d {args.command}"
        setup_logging(logging.DEBUG if args.verbose else logging.INFO)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # carv3d never downloads weights at run time
        handlers = {c.NAME: c.run for c in COMMANDS}
        return handlers[args.command](args)
    except UserError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the exit stays clean whatever arrives now
        print(f"{command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception:
        if not interrupt.seen:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"{command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    finally:
        if signal.getsignal(signal.SIGINT) is interrupt:  # main() called in-process: leave Python's handler
            signal.signal(signal.SIGINT, signal.default_int_handler)


def entry() -> None:
    """The console script: :func:`main`'s exit code. After Ctrl-C the process ends with 130 at once:
    CPython remembers an interrupt that passed through code it ran from C during an import (torch's)
    even when :func:`main` handled it, and would otherwise end the process by SIGINT, not 130."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
