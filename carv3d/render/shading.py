"""Shading modes and the light (DreamFusion's recipe against flat, "painted-on" geometry).

Each sample's colour before compositing is

    albedo:       c = a
    lambertian:   c = a · (k + (1 − k) · max(0, n · l))
    textureless:  c = 1 · (k + (1 − k) · max(0, n · l))     (white albedo: geometry only)

with albedo ``a``, unit outward normal ``n``, unit direction *towards* the light ``l`` and ambient
fraction ``k``. Shading changes the rendered colours with the surface orientation, so the teacher's
gradient reaches the geometry through the normals; ``textureless`` stops the colour from faking
the shape.

The light is directional and sits near the camera, as in DreamFusion and threestudio: its
direction is the camera's direction from the origin plus a random offset,

    l = normalize(p / ‖p‖ + ε),   ε ~ N(0, s² I)   (s = ``render.light_jitter``; ε = 0 without a generator),

so the visible side is mostly lit, but from varying angles. Without a generator the light is a
headlight (``l`` = the camera's direction), which gives deterministic validation renders.
"""

from __future__ import annotations

from typing import Optional

import torch

SHADING_MODES = ("albedo", "lambertian", "textureless")


def needs_normals(mode: str) -> bool:
    """Whether a shading mode uses surface normals."""
    return mode in ("lambertian", "textureless")


def shade(
    albedo: torch.Tensor, normals: Optional[torch.Tensor], light_dir: Optional[torch.Tensor], mode: str, ambient: float
) -> torch.Tensor:
    """Per-sample colours for a shading mode (formulas in the module docstring).

    Args:
        albedo: (..., 3) in [0, 1].
        normals: (..., 3) unit outward normals; unused (may be None) for ``albedo``.
        light_dir: (..., 3) unit vectors towards the light, broadcastable to ``normals``.
        mode: ``albedo`` | ``lambertian`` | ``textureless``.
        ambient: fraction ``k`` of light that reaches every surface.

    Returns:
        (..., 3) colours.
    """
    if mode == "albedo":
        return albedo
    if mode not in SHADING_MODES:
        raise ValueError(f"unknown shading mode '{mode}'; expected one of {SHADING_MODES}")
    if normals is None or light_dir is None:
        raise ValueError(f"shading mode '{mode}' needs normals and a light direction")
    diffuse = (normals * light_dir).sum(dim=-1, keepdim=True).clamp_min(0.0)
    light = ambient + (1.0 - ambient) * diffuse
    if mode == "textureless":
        return light.expand(*light.shape[:-1], 3)
    return albedo * light


def sample_light_directions(
    camera_positions: torch.Tensor, jitter: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """One light direction per camera: ``normalize(p/‖p‖ + ε)``, ``ε ~ N(0, jitter² I)``.

    Args:
        camera_positions: (B, 3) camera positions (not at the origin).
        jitter: standard deviation ``s`` of the offset, relative to the unit camera direction.
        generator: source of ``ε`` (drawn on its device); None gives the headlight ``ε = 0``.

    Returns:
        (B, 3) unit vectors pointing from the scene towards the light.
    """
    towards_camera = torch.nn.functional.normalize(camera_positions, dim=-1)
    if generator is None or jitter == 0.0:
        return towards_camera
    offset = torch.randn(camera_positions.shape, generator=generator, device=generator.device)
    offset = offset.to(camera_positions.device, camera_positions.dtype)
    return torch.nn.functional.normalize(towards_camera + jitter * offset, dim=-1)
