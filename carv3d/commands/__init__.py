"""The CLI's commands, one module each: its arguments and its handler. No logic here.

Every command module has

    NAME, HELP, DESCRIPTION        the sub-command's name, its line in ``carv3d --help``, its own help text
    add_arguments(parser)          its argparse arguments
    run(args) -> int               parse, load config, call library functions; returns the exit code

:mod:`carv3d.cli` builds the parser from :data:`COMMANDS`. Heavy imports (torch, diffusers) stay inside
the handlers, so that ``carv3d --help`` is quick. The library never imports this package
(tests/test_architecture.py).
"""

from carv3d.commands import config, doctor, evaluate, export, render, sweep, train, variance

COMMANDS = (train, export, render, variance, evaluate, sweep, config, doctor)

__all__ = ["COMMANDS"]
