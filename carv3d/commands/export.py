"""`carv3d export RUN_DIR`: the run's saved scene through the export pipeline.

Flags override the run's ``export.*`` config; the automatic threshold compares mesh silhouettes
with the run's own renderer's opacity, so the mesh matches what the NeRF shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

NAME = "export"
HELP = "export the mesh of a run (GLB/PLY/OBJ)"
DESCRIPTION = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory (its latest checkpoint)")
    parser.add_argument("--format", default=None, help="comma-separated: glb,ply,obj (default: the run's export.formats)")
    parser.add_argument("--resolution", type=int, default=None, help="marching-cubes grid resolution")
    parser.add_argument("--threshold", default=None, help="density isosurface level: auto or a number")
    parser.add_argument("--texture-size", type=int, default=None, help="texture size in pixels (power of two)")
    parser.add_argument("--faces", type=int, default=None, help="face budget for decimation")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/mesh)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def export_command(run_dir: str, formats: Optional[str] = None, resolution: Optional[int] = None,
                   threshold: Optional[str] = None, texture_size: Optional[int] = None, faces: Optional[int] = None,
                   out: Optional[str] = None, overwrite: bool = False) -> list[Path]:
    """The run's ``export`` config with the flags merged in; formats, sizes, the face budget and the
    output folder are checked before the scene is loaded. Returns the files written."""
    from omegaconf import OmegaConf

    from carv3d.errors import ConfigError
    from carv3d.export.from_scene import export_scene
    from carv3d.export.pipeline import (TEXTURED_FORMATS, check_options, check_targets, parse_threshold, planned_files,
                                        removing_new_empty_folders)
    from carv3d.saved_scene import load_scene
    from carv3d.run_dir import load_run_config, require_run_dir

    run = require_run_dir(run_dir)
    export_cfg = load_run_config(run).export
    updates: dict[str, Any] = {}
    if formats is not None:
        updates["formats"] = [f.strip().lower() for f in formats.split(",") if f.strip()]
        if not updates["formats"]:
            raise ConfigError("--format is empty; give some of glb,ply,obj.")
    if resolution is not None:
        updates["resolution"] = resolution
    if threshold is not None:
        updates["threshold"] = parse_threshold(threshold)
    if texture_size is not None:
        updates["texture_size"] = texture_size
    if faces is not None:
        updates["faces"] = faces
    export_cfg = OmegaConf.merge(export_cfg, updates) if updates else export_cfg
    # Check formats, sizes, the face budget and the output folder before loading anything heavy.
    fmts = check_options(list(export_cfg.formats), int(export_cfg.texture_size),
                         resolution=int(export_cfg.resolution), faces=int(export_cfg.faces))
    out_dir = Path(out) if out else run / "mesh"
    textured = int(export_cfg.texture_size) > 0 and any(f in TEXTURED_FORMATS for f in fmts)
    with removing_new_empty_folders(out_dir):
        check_targets(planned_files(out_dir, fmts, textured), overwrite)
        scene = load_scene(run)
        files = export_scene(scene.scene, out_dir, export_cfg, overwrite=overwrite)
    return list(files.values())


def run(args: argparse.Namespace) -> int:
    paths = export_command(args.run_dir, formats=args.format, resolution=args.resolution, threshold=args.threshold,
                           texture_size=args.texture_size, faces=args.faces, out=args.out, overwrite=args.overwrite)
    for path in paths:
        print(path)
    return 0
