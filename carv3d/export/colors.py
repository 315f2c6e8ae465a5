"""Colours from the field: per-vertex RGBA and colours at arbitrary surface points.

The field's albedo a(x) ∈ [0, 1]³ is quantised to 8 bits as ``round(255 · clip(a, 0, 1))``; alpha
is 255 (meshes are opaque).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from carv3d.export.isosurface import evaluate_in_chunks, field_device


def field_albedo(field: Any, points: np.ndarray, chunk: int = 2**18) -> np.ndarray:
    """The field's albedo at points.

    Args:
        field: callable ``field(x: (N, 3)) -> (density (N,), albedo (N, 3))``.
        points: (N, 3) positions in scene units.
        chunk: points per call of the field.

    Returns:
        (N, 3) float32 albedo, clipped to [0, 1] (non-finite values become 0).
    """
    albedo = evaluate_in_chunks(lambda x: field(x)[1], np.asarray(points, dtype=np.float32),
                                field_device(field), chunk)
    albedo = albedo.reshape(-1, 3)
    return np.clip(np.nan_to_num(albedo, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def to_rgba8(albedo: np.ndarray) -> np.ndarray:
    """(N, 3) floats in [0, 1] -> (N, 4) uint8 with alpha 255."""
    rgb = np.round(np.clip(albedo, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.concatenate([rgb, np.full((len(rgb), 1), 255, dtype=np.uint8)], axis=1)


def srgb_to_linear(srgb8: np.ndarray) -> np.ndarray:
    """sRGB-encoded 8-bit values -> linear floats in [0, 1] (IEC 61966-2-1 transfer function).

    The albedo is stored as display (sRGB) values, as in the baked PNG, which glTF reads as sRGB.
    glTF's ``COLOR_0`` is linear, so vertex colours written there must be converted, or they look
    darker than the same colour in a texture: ``c/12.92`` for ``c ≤ 0.04045``, else
    ``((c + 0.055)/1.055)^2.4``.
    """
    c = np.asarray(srgb8, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def vertex_colors(field: Any, vertices: np.ndarray, chunk: int = 2**18) -> np.ndarray:
    """Per-vertex colours sampled from the field at the vertex positions.

    Args:
        field: the colour field (see :func:`field_albedo`).
        vertices: (V, 3) positions.
        chunk: points per call of the field.

    Returns:
        (V, 4) uint8 RGBA.
    """
    return to_rgba8(field_albedo(field, vertices, chunk))
