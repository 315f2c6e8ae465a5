"""A NeRF scene (field and renderer) through the export pipeline.

The automatic threshold compares mesh silhouettes with the renderer's own opacity on CUDA, so the
mesh matches what the NeRF shows. `carv3d export RUN_DIR` is :mod:`carv3d.commands.export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
