"""A scene (its density query and its renderer) through the export pipeline.

The automatic threshold compares mesh silhouettes with the renderer's own opacity on CUDA, so the
mesh matches what the NeRF shows. `carv3d export RUN_DIR` is :mod:`carv3d.commands.export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def scene_opacity_fn(scene: Any, image_size: int, chunk_rays: int = 16384):
    """``cameras -> (B, H, W)`` opacity of the scene as its renderer shows it, rendered deterministically."""

    @torch.no_grad()
    def scene_opacity(cameras) -> torch.Tensor:
        out = scene.render(cameras.to(scene.device), generator=None, shading="albedo", height=image_size,
                           width=image_size, chunk_rays=chunk_rays)
        return out.opacity[:, 0].float().cpu()

    return scene_opacity


def export_scene(scene: Any, out_dir: Path, export_cfg: Any, overwrite: bool = False) -> dict[str, Path]:
    """Mesh files of a scene (:class:`carv3d.scene.Scene`) from its density / colour query ``scene.field``."""
    from carv3d.export.pipeline import export_mesh

    # On CUDA the threshold search matches the renderer's own opacity; on CPU that costs seconds per
    # view, and the density grid's projected opacity (what export_mesh uses without one) agrees with
    # it to about 0.01 on average.
    opacity = None
    if scene.device.type == "cuda":
        opacity = scene_opacity_fn(scene, int(export_cfg.silhouette_size))
    # The scene's own format first (Gaussians: splats.ply): a mesh that fails does not cost it.
    files = dict(scene.write_native(Path(out_dir), overwrite=overwrite)) if hasattr(scene, "write_native") else {}
    files.update(export_mesh(scene.field, out_dir, export_cfg, overwrite=overwrite, nerf_opacity=opacity))
    return files
