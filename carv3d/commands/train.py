"""`carv3d train`: train a scene from a prompt, or continue a run with ``--resume RUN_DIR``."""

from __future__ import annotations

import argparse

from carv3d.errors import UserError

NAME = "train"
HELP = "train a scene from a prompt (or continue one with --resume)"
DESCRIPTION = "Layers: defaults ← --config FILE ← key=value overrides ← --prompt."
# What --resume does to a run's files, said before it starts (README: "Continuing a run").
RESUME_NOTE = ("--resume %s: the run continues in place; at its end turntable.mp4, mesh/ and the last validation "
               "sheet are replaced by the continued run's, and only the newest 3 checkpoints are kept (older "
               "ones are deleted): copy them first to keep the shorter run's results.")


def resume_note(run_dir: str) -> str:
    """:data:`RESUME_NOTE` for ``run_dir``, with the number of checkpoints a run keeps."""
    import inspect

    from carv3d.checkpoint import save_checkpoint

    keep = inspect.signature(save_checkpoint).parameters["keep"].default
    return RESUME_NOTE.replace("newest 3", f"newest {keep}") % run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", help='the text prompt, e.g. "a red cube"')
    parser.add_argument("--config", help="a YAML config file (see configs/)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a run from its latest checkpoint (replaces its turntable and mesh at the end; "
                             "keeps the newest 3 checkpoints)")
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
        from carv3d.log import logger
        from carv3d.run_dir import require_run_dir
        from carv3d.train import resume

        require_run_dir(args.resume)  # a path that is no run fails before the note about replacing its files
        logger.info(resume_note(args.resume))
        run_dir = resume(args.resume, args.overrides)
    else:
        from carv3d.train import train

        cfg = load_config(args.config, args.overrides, args.prompt)
        run_dir = train(cfg)
    print(f"run finished: {run_dir}")
    return 0
