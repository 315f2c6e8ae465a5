"""The `carv3d` command. Parses arguments, loads config, calls library functions; no logic here.

User errors (carv3d.errors.UserError) print one line and exit with code 2; bugs show a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from carv3d.errors import UserError


def _cmd_train(args: argparse.Namespace) -> int:
    from carv3d.config import load_config, to_yaml

    if args.help_config:
        print(to_yaml(load_config()))
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


def _cmd_export(args: argparse.Namespace) -> int:
    from carv3d.export.command import export_command

    paths = export_command(args.run_dir, formats=args.format, resolution=args.resolution, threshold=args.threshold,
                           texture_size=args.texture_size, faces=args.faces, out=args.out, overwrite=args.overwrite)
    for path in paths:
        print(path)
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from carv3d.errors import OutputPathError
    from carv3d.outputs import write_turntable
    from carv3d.parts import load_scene

    from carv3d.io import make_writable_folder
    from carv3d.run_dir import require_run_dir

    out = Path(args.out) if args.out else require_run_dir(args.run_dir) / "turntable.mp4"
    if out.exists() and not args.overwrite:
        raise OutputPathError(f"'{out}' already exists; pass --overwrite to replace it or --out to write elsewhere.")
    try:  # before the scene is loaded and rendered
        make_writable_folder(out.parent)
    except OSError as err:
        raise OutputPathError(f"cannot write '{out}' ({err.strerror or err}); pass --out with a file in a "
                              f"writable folder.") from None
    scene = load_scene(args.run_dir)
    write_turntable(scene.field, scene.renderer, out, args.frames, args.resolution, args.fps)
    print(out)
    return 0


def _cmd_variance(args: argparse.Namespace) -> int:
    from carv3d.variance import variance_command

    print(variance_command(args))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from carv3d.world.evaluate import evaluate_command

    print(evaluate_command(args.run_dir, views=args.views, resolution=args.resolution, out=args.out,
                           overwrite=args.overwrite, device=args.device))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from carv3d.sweep import run_sweep

    outcome = run_sweep(args.file, backend=args.backend, max_parallel=args.max_parallel, address=args.address,
                        dry_run=args.dry_run)
    print(outcome.report())
    return outcome.exit_code


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _cmd_train,
    "export": _cmd_export,
    "render": _cmd_render,
    "variance": _cmd_variance,
    "evaluate": _cmd_evaluate,
    "sweep": _cmd_sweep,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carv3d", description="Text-to-3D by score distillation with the CARV estimator.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a scene from a prompt (or continue one with --resume)",
                       description="Layers: defaults ← --config FILE ← key=value overrides ← --prompt.")
    p.add_argument("--prompt", help='the text prompt, e.g. "a red cube"')
    p.add_argument("--config", help="a YAML config file (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")

    p = sub.add_parser("export", help="export the mesh of a run (GLB/PLY/OBJ)")
    p.add_argument("run_dir")
    p.add_argument("--format", default=None, help="comma-separated: glb,ply,obj (default: the run's export.formats)")
    p.add_argument("--resolution", type=int, default=None, help="marching-cubes grid resolution")
    p.add_argument("--threshold", default=None, help="density isosurface level: auto or a number")
    p.add_argument("--texture-size", type=int, default=None, help="texture size in pixels (power of two)")
    p.add_argument("--faces", type=int, default=None, help="face budget for decimation")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/mesh)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")

    p = sub.add_parser("render", help="render a turntable video of a run")
    p.add_argument("run_dir")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--out", default=None, help="output .mp4 (default RUN_DIR/turntable.mp4)")
    p.add_argument("--overwrite", action="store_true")

    from carv3d.variance import add_variance_arguments

    add_variance_arguments(sub.add_parser("variance", help="measure estimator variance and cost at a frozen scene"))

    p = sub.add_parser("evaluate", help="score a run against the embedded world's ground truth (world prompts only)",
                       description="Renders the run and the ground truth from fixed held-out views; reports "
                                   "silhouette IoU, masked colour error, PSNR, the Chamfer distance of RUN_DIR/mesh/mesh.ply, "
                                   "the best-matching world object and the front/back check. Writes JSON.")
    p.add_argument("run_dir")
    p.add_argument("--views", type=int, default=16, help="held-out views: a multiple of 4, at least 12 (default 16)")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--out", default=None, help="output JSON (default RUN_DIR/evaluation.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")

    p = sub.add_parser("sweep", help="run a sweep file (grid/zip of config overrides) locally or on Ray",
                       description="Re-running a sweep skips finished runs and resumes unfinished ones. Results: "
                                   "<output_dir>/<name>/summary.csv and summary.md. Exit code 1 when a run failed.")
    p.add_argument("file", help="a sweep file (see configs/sweeps/)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: in-process, or one worker per GPU; ray: one Ray task per run (pip install 'carv3d[ray]')")
    p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="most runs at once (local default: one per visible GPU; ray default: as Ray schedules)")
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001 "
                                                   "(default: a local Ray instance)")
    p.add_argument("--dry-run", action="store_true", help="validate the file and print what each run would do")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from carv3d.log import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    import logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # carv3d never downloads weights at run time
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"carv3d {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"carv3d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
