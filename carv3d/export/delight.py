"""De-lighting: estimate the light baked into a field's colours and divide it out of the texture.

A NeRF trained with ``render.shading: albedo`` against a teacher whose images are lit (the embedded
world has a fixed light above the front; photos have light too) learns *lit* colours: the demo
cube's front is brighter than its back. An artist needs the albedo a, so the colours c are modelled
as Lambertian shading with one directional light l and an ambient fraction k (the same formula as
carv3d's renderer, :mod:`carv3d.render.shading`),

    c(x) = a(x) · L(n(x)),   L(n) = k + (1 − k) · max(0, n · l),   0 ≤ k ≤ 1, |l| = 1,

and the albedo is recovered as a = c / L. The light is not known for a trained field (the field
may have learned it only partly), so (l, k) are *fitted* to the colours on the mesh, assuming that
the albedo is piecewise constant. Across a mesh edge (i, j) the model says

    log Y_i − log Y_j = log L(n_i) − log L(n_j) + (log a_i − log a_j),

with Y the luminance. Where the albedo is constant the last term is 0: the fit minimises the
robust (soft-L1) residual of the first two over all edges. Colour boundaries on a flat region do
not bias it (there L(n_i) = L(n_j), so the residual does not depend on (l, k)); colour boundaries
that coincide with a crease do, and the soft-L1 loss limits their weight. L ≤ 1 with equality on
the lit side, so de-lighting keeps the lit side's colour and brightens the shaded side.

When the fitted light explains little (the relative drop of the loss below ``min_gain``, or
k ≥ ``max_ambient``), the colours are left as they are: a field trained with lit shading has already
learned albedo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.optimize

from carv3d.log import logger

# Rec. 709 luminance weights of linear RGB; applied to the sRGB-encoded albedo as an approximation.
LUMA = np.array([0.2126, 0.7152, 0.0722])


@dataclass
class Light:
    """A directional light and its ambient fraction: L(n) = k + (1 − k)·max(0, n·l).

    Attributes:
        direction: (3,) unit vector towards the light.
        ambient: k in [0, 1].
        gain: relative drop of the fit's loss against no lighting (0 = explains nothing).
    """

    direction: np.ndarray
    ambient: float
    gain: float = 0.0

    def factor(self, normals: np.ndarray) -> np.ndarray:
        """(N,) light factor L(n) of unit normals (N, 3)."""
        return self.ambient + (1.0 - self.ambient) * np.clip(np.asarray(normals) @ self.direction, 0.0, None)


def _direction(theta: float, phi: float) -> np.ndarray:
    return np.array([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)])


def chromaticity_groups(colors: np.ndarray, bins: int = 8, dark: float = 0.03) -> np.ndarray:
    """(N,) group of each colour by its chromaticity c / (r + g + b), quantised to ``bins`` per axis.

    Light scales a colour's brightness but not its chromaticity, so points of one group are taken to
    share one albedo. Colours darker than ``dark`` (sum) form their own group (their chromaticity is noise).
    """
    colors = np.asarray(colors, dtype=np.float64)
    total = colors.sum(axis=1, keepdims=True)
    chroma = np.floor(colors / np.maximum(total, 1e-9) * bins).clip(0, bins - 1).astype(np.int64)
    key = chroma[:, 0] * bins + chroma[:, 1]
    key[total[:, 0] < dark] = -1
    return np.unique(key, return_inverse=True)[1].reshape(-1)


def fit_light(colors: np.ndarray, normals: np.ndarray, floor: float = 0.02, max_points: int = 20000) -> Light:
    """Fit (l, k) of ``log Y = log a_g + log L(n)`` (one albedo a_g per chromaticity group) to colours.

    For given (l, k) the best log a_g is the group's mean residual, so only (l, k) are searched
    (soft-L1 loss, a few starting directions).

    Args:
        colors: (N, 3) colours in [0, 1] at surface points (e.g. the mesh vertices).
        normals: (N, 3) unit normals there.
        floor: luminance floor before the logarithm (black is uninformative).
        max_points: an evenly strided subset of at most this many points is fitted (3 parameters).

    Returns:
        The fitted :class:`Light`, with ``gain`` = 1 − loss(fit) / loss(no light) (0 for uniform colours).
    """
    stride = max(1, len(colors) // max_points)
    colors = np.asarray(colors, dtype=np.float64)[::stride]
    normals = np.asarray(normals, dtype=np.float64)[::stride]
    log_y = np.log(np.maximum(colors @ LUMA, floor))
    group = chromaticity_groups(colors)
    counts = np.bincount(group).astype(np.float64)

    def centred(values: np.ndarray) -> np.ndarray:  # subtract each group's mean: its best log a_g
        return values - (np.bincount(group, weights=values) / counts)[group]

    target = centred(log_y)

    def residual(params: np.ndarray) -> np.ndarray:
        theta, phi, logit_k = params
        light = Light(_direction(theta, phi), float(1.0 / (1.0 + np.exp(-logit_k))))
        return target - centred(np.log(np.maximum(light.factor(normals), 1e-6)))

    scale = 0.05  # soft-L1 transition: log-luminance errors above ~5 % count linearly, not squared
    base = float(np.sum(2 * scale**2 * (np.sqrt(1 + (target / scale) ** 2) - 1)))
    if base < 1e-9 * len(target):  # one brightness per colour: nothing for a light to explain
        return Light(np.array([0.0, 1.0, 0.0]), 1.0, 0.0)
    best = None
    for theta in (0.6, 1.6, 2.5):  # a few starts: the loss is not convex in the direction
        for phi in np.linspace(0, 2 * np.pi, 3, endpoint=False):
            result = scipy.optimize.least_squares(residual, x0=[theta, phi, -1.0], loss="soft_l1", f_scale=scale,
                                                  max_nfev=100)
            if best is None or result.cost < best.cost:
                best = result
    theta, phi, logit_k = best.x
    gain = 1.0 - 2 * best.cost / max(base, 1e-30)  # least_squares' cost is half the summed loss
    return Light(_direction(theta, phi), float(1.0 / (1.0 + np.exp(-logit_k))), float(gain))


def delight_colors(colors: np.ndarray, normals: np.ndarray, light: Optional[Light]) -> np.ndarray:
    """a = c / L(n), clipped to [0, 1]; the colours unchanged when ``light`` is None.

    Args:
        colors: (N, 3) colours in [0, 1].
        normals: (N, 3) unit normals at the same points.
        light: the fitted light.
    """
    if light is None:
        return colors
    return np.clip(np.asarray(colors) / np.maximum(light.factor(normals), 1e-3)[:, None], 0.0, 1.0).astype(np.float32)


def estimate_light(colors: np.ndarray, normals: np.ndarray, min_gain: float = 0.05,
                   max_ambient: float = 0.95) -> Optional[Light]:
    """The fitted light when it explains the colours (see the module docstring), else None (logged)."""
    light = fit_light(colors, normals)
    useful = light.gain >= min_gain and light.ambient < max_ambient
    logger.info("de-lighting: fitted light towards (%.2f, %.2f, %.2f), ambient %.2f, explains %.0f%% of the "
                "brightness changes across edges: %s", *light.direction, light.ambient, 100 * light.gain,
                "divided out of the texture" if useful else "too little, colours kept as they are")
    return light if useful else None
