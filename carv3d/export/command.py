"""`carv3d export RUN_DIR`: the run's saved scene through the export pipeline.

Flags override the run's ``export.*`` config; the automatic threshold compares mesh silhouettes
with the run's own renderer's opacity, so the mesh matches what the NeRF shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from carv3d.errors import ConfigError


def nerf_opacity_fn(field: Any, renderer: Any, image_size: int, chunk_rays: int = 16384):
    """``cameras -> (B, H, W)`` opacity of the NeRF, rendered deterministically."""

    @torch.no_grad()
    def nerf_opacity(cameras) -> torch.Tensor:
        device = next(field.parameters()).device
        out = renderer(field, cameras.to(device), generator=None, shading="albedo", height=image_size,
                       width=image_size, chunk_rays=chunk_rays)
        return out.opacity[:, 0].float().cpu()

    return nerf_opacity


def export_scene(field: Any, renderer: Any, out_dir: Path, export_cfg: Any, overwrite: bool = False) -> dict[str, Path]:
    from carv3d.export.pipeline import export_mesh

    # On CUDA the threshold search matches the renderer's own opacity; on CPU that costs seconds per
    # view, and the density grid's projected opacity (what export_mesh uses without one) agrees with
    # it to about 0.01 on average.
    device = next(field.parameters()).device
    opacity = None
    if device.type == "cuda":
        opacity = nerf_opacity_fn(field, renderer, int(getattr(export_cfg, "silhouette_size", 96)))
    return export_mesh(field, out_dir, export_cfg, overwrite=overwrite, nerf_opacity=opacity)


def export_command(run_dir: str, formats: Optional[str] = None, resolution: Optional[int] = None,
                   threshold: Optional[str] = None, texture_size: Optional[int] = None, faces: Optional[int] = None,
                   out: Optional[str] = None, overwrite: bool = False) -> list[Path]:
    from carv3d.export.pipeline import parse_threshold
    from carv3d.parts import load_scene
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
    from carv3d.export.pipeline import TEXTURED_FORMATS, check_options, check_targets, planned_files

    fmts = check_options(list(export_cfg.formats), int(export_cfg.texture_size),
                         resolution=int(export_cfg.resolution), faces=int(export_cfg.faces))
    out_dir = Path(out) if out else run / "mesh"
    textured = int(export_cfg.texture_size) > 0 and any(f in TEXTURED_FORMATS for f in fmts)
    check_targets(planned_files(out_dir, fmts, textured), overwrite)
    scene = load_scene(run)
    files = export_scene(scene.field, scene.renderer, out_dir, export_cfg, overwrite=overwrite)
    return list(files.values())
