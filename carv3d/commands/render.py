"""`carv3d render RUN_DIR`: a turntable video of a run's saved scene."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

NAME = "render"
HELP = "render a turntable video of a run"
DESCRIPTION = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (its latest checkpoint is rendered)")
    parser.add_argument("--frames", type=int, default=60, help="frames of the video (one turn)")
    parser.add_argument("--resolution", type=int, default=256, help="frame size in pixels")
    parser.add_argument("--fps", type=int, default=24, help="frames per second")
    parser.add_argument("--out", default=None, help="output .mp4 (default RUN_DIR/turntable.mp4)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing video")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def render_command(run_dir: str, frames: int = 60, resolution: int = 256, fps: int = 24, out: Optional[str] = None,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Check the options and the output path (before the scene is loaded and rendered), then write the turntable."""
    from carv3d.config import MAX_IMAGE_SIZE
    from carv3d.errors import ConfigError, OutputPathError
    from carv3d.io import make_writable_folder
    from carv3d.log import logger
    from carv3d.render.turntable import render_turntable, write_video
    from carv3d.saved_scene import load_scene
    from carv3d.run_dir import require_run_dir

    # The ranges of the run's own train.turntable_frames (without its 0 = no video), train.turntable_fps
    # and train.val_resolution: outside them the render or the encoder failed with a traceback.
    for option, value, low, high, example in (("--frames", frames, 1, 10**4, 60), ("--fps", fps, 1, 240, 24),
                                              ("--resolution", resolution, 1, MAX_IMAGE_SIZE, 256)):
        if not low <= value <= high:
            raise ConfigError(f"{option} {value} is out of range; use {low} to {high} (e.g. {option} {example}).")
    if out and Path(out).suffix.lower() != ".mp4":
        raise OutputPathError(f"--out '{out}' is not an .mp4 file; the turntable is written as H.264 MP4 "
                              f"(e.g. --out turntable_256.mp4).")
    target = Path(out) if out else require_run_dir(run_dir) / "turntable.mp4"
    if target.exists() and not overwrite:
        raise OutputPathError(f"'{target}' already exists; pass --overwrite to replace it or --out to write elsewhere.")
    try:  # before the scene is loaded and rendered
        make_writable_folder(target.parent)
    except OSError as err:
        raise OutputPathError(f"cannot write '{target}' ({err.strerror or err}); pass --out with a file in a "
                              f"writable folder.") from None
    scene = load_scene(run_dir).scene
    scene.eval()
    logger.info("render: %d frames at %d px on %s", frames, resolution, scene.device)
    return write_video(render_turntable(scene, n_frames=frames, size=resolution, progress=progress), target, fps=fps)


def run(args: argparse.Namespace) -> int:
    print(render_command(args.run_dir, frames=args.frames, resolution=args.resolution, fps=args.fps, out=args.out,
                         overwrite=args.overwrite, progress=args.progress))
    return 0
