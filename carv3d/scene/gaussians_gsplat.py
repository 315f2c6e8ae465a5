"""``scene.rasterizer: gsplat`` — nerfstudio's gsplat (Apache-2.0) on CUDA, and the one place the
rasteriser is chosen.

gsplat's CUDA kernels compile on their first use in a process (about 107 s on an H100, then cached
in torch's extension folder): :func:`carv3d.devices.warm_up_gsplat` triggers and times that once, like
:func:`carv3d.devices.warm_up_nerfacc` does for nerfacc. The call uses gsplat's classic
rasterisation with the conventions of :mod:`carv3d.scene.gaussians_raster` (eps2d 0.3, near plane
0.01, tiles of 16 px, unpacked), so both rasterisers give the same images and gradients
(``scripts/gpu_check_gaussians.py`` checks it on the device).
"""

from __future__ import annotations

from typing import Any

import torch

from carv3d.devices import package_installed
from carv3d.errors import BackendUnavailableError
from carv3d.log import logger
from carv3d.scene.gaussians_raster import EPS_2D, NEAR_PLANE

RASTERIZERS = ("torch", "gsplat")
INSTALL_HINT = "pip install 'carv3d[gaussians]' (gsplat 1.5.3; it compiles its CUDA code on first use)"


def gsplat_installed() -> bool:
    return package_installed("gsplat")


def choose_rasterizer(requested: str, device: torch.device | str) -> tuple[str, str]:
    """``scene.rasterizer`` and the device → (``torch`` or ``gsplat``, why).

    - ``auto``: gsplat on a CUDA device when it is installed, else torch.
    - ``gsplat``: CUDA and the package are required; otherwise a user error saying what to do.

    Raises:
        BackendUnavailableError: gsplat asked for without CUDA or without the package, or an unknown name.
    """
    device = torch.device(device)
    if requested == "auto":
        if device.type != "cuda":
            return "torch", f"auto: device '{device}' is not CUDA"
        if not gsplat_installed():
            return "torch", f"auto: gsplat is not installed ({INSTALL_HINT})"
        return "gsplat", "auto: CUDA device, gsplat installed"
    if requested == "gsplat":
        if device.type != "cuda":
            raise BackendUnavailableError(f"scene.rasterizer=gsplat needs a CUDA device (gsplat's kernels are CUDA-only), "
                                          f"but the device is '{device}'. Use scene.rasterizer=torch or auto.")
        if not gsplat_installed():
            raise BackendUnavailableError(f"scene.rasterizer=gsplat but gsplat is not installed: {INSTALL_HINT}, "
                                          f"or use scene.rasterizer=torch.")
    elif requested not in RASTERIZERS:
        raise BackendUnavailableError(f"unknown scene.rasterizer '{requested}'; expected auto, torch or gsplat.")
    return requested, f"requested by scene.rasterizer={requested}"


def select_rasterizer(requested: str, device: torch.device | str) -> str:
    """:func:`choose_rasterizer`'s rasteriser, its choice logged."""
    chosen, reason = choose_rasterizer(requested, device)
    logger.info("scene.rasterizer -> %s (%s)", chosen, reason)
    return chosen


def rasterize_gsplat(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                     features: torch.Tensor, viewmats: torch.Tensor, ks: torch.Tensor, height: int,
                     width: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """gsplat's rasterisation of N Gaussians into B images.

    Args:
        means (N, 3), quats (N, 4) (w, x, y, z), scales (N, 3), opacities (N,): the Gaussians.
        features: (B, N, C) per-camera features f_i, composited like colours.
        viewmats, ks: :func:`carv3d.scene.gaussians_raster.camera_matrices`.

    Returns:
        images (B, H, W, C), alpha (B, H, W, 1) and gsplat's ``meta`` (``means2d`` (B, N, 2) whose
        gradient drives densification, ``radii`` (B, N, 2)).
    """
    from gsplat import rasterization

    images, alphas, meta = rasterization(
        means, quats, scales, opacities, features, viewmats, ks, width, height,
        near_plane=NEAR_PLANE, eps2d=EPS_2D, packed=False, tile_size=16, rasterize_mode="classic",
        render_mode="RGB", sh_degree=None)
    return images, alphas, meta
