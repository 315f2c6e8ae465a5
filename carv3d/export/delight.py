"""De-lighting: estimate the light baked into a field's colours and divide it out of the texture.

A NeRF trained with ``render.shading: albedo`` against a teacher whose images are lit (the embedded
world has a fixed light above the front; photos have light too) learns *lit* colours: the demo
cube's front is brighter than its back. An artist needs the albedo a. The colours are modelled as
the albedo times a light factor of the surface normal n, c(x) = a(x) · L(n(x)), with one of two
three-parameter light models:

    lambertian:  L(n) = k + (1 − k) · max(0, n · l),   |l| = 1, 0 ≤ k ≤ 1
                 (carv3d's renderer and the embedded world, :mod:`carv3d.render.shading`);
    linear:      L(n) = (1 + b · n) / (1 + |b|),        |b| < 1
                 (first-order spherical harmonics, the smooth light a NeRF tends to learn: a field
                 does not reproduce the clamp of max(0, ·)).

Both have max L = 1 on the lit side, so de-lighting, a = c / L, keeps the lit side's colour and
brightens the shaded side. The light of a trained field is unknown, so the model is *fitted* to
the colours on the mesh: light scales a colour's brightness, not its chromaticity, so points are
grouped by chromaticity (:func:`chromaticity_groups`) and each group is taken to share one albedo
a_g. The fit minimises the robust (soft-L1) residual of

    log Y_i = log a_{g(i)} + log L(n_i)

(Y the luminance) over the mesh's vertices; for given light parameters the best log a_g is the
group's mean residual, so only the three light parameters are searched, for both models, and the
model with the lower loss is kept. When the fitted light explains little (the relative drop of the
loss below ``min_gain``, or L varying by less than ``min_range``), the colours are left as they
are: a field trained with lit shading has already learned albedo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.optimize

from carv3d.log import logger

# Rec. 709 luminance weights of linear RGB; applied to the sRGB-encoded albedo as an approximation.
LUMA = np.array([0.2126, 0.7152, 0.0722])
MODELS = ("lambertian", "linear")


@dataclass
class Light:
    """A fitted light (module docstring).

    Attributes:
        direction: (3,) unit vector towards the light (l, or b/|b|).
        ambient: lambertian: k; linear: the factor on the far side, (1 − |b|)/(1 + |b|).
        gain: relative drop of the fit's loss against no lighting (0 = explains nothing).
        model: ``lambertian`` or ``linear``.
    """

    direction: np.ndarray
    ambient: float
    gain: float = 0.0
    model: str = "lambertian"

    def factor(self, normals: np.ndarray) -> np.ndarray:
        """(N,) light factor L(n) in [ambient, 1] of unit normals (N, 3)."""
        cosine = np.asarray(normals) @ self.direction
        if self.model == "linear":
            strength = (1.0 - self.ambient) / (1.0 + self.ambient)  # |b|
            return (1.0 + strength * cosine) / (1.0 + strength)
        return self.ambient + (1.0 - self.ambient) * np.clip(cosine, 0.0, None)


def _direction(theta: float, phi: float) -> np.ndarray:
    return np.array([np.sin(theta) * np.cos(phi), np.cos(theta), np.sin(theta) * np.sin(phi)])


def _light(model: str, params: np.ndarray) -> Light:
    theta, phi, logit = params
    s = float(1.0 / (1.0 + np.exp(-logit)))  # in (0, 1): k for lambertian, |b| for linear
    ambient = s if model == "lambertian" else (1.0 - s) / (1.0 + s)
    return Light(_direction(theta, phi), ambient, model=model)


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


def fit_light(colors: np.ndarray, normals: np.ndarray, floor: float = 0.02, max_points: int = 20000,
              models: tuple = MODELS) -> Light:
    """Fit the light models of the module docstring to colours at surface points; keep the better one.

    Args:
        colors: (N, 3) colours in [0, 1] at surface points (e.g. the mesh vertices).
        normals: (N, 3) unit normals there.
        floor: luminance floor before the logarithm (black is uninformative).
        max_points: an evenly strided subset of at most this many points is fitted (3 parameters).
        models: which light models to try.

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
    scale = 0.05  # soft-L1 transition: log-luminance errors above ~5 % count linearly, not squared
    base = float(np.sum(2 * scale**2 * (np.sqrt(1 + (target / scale) ** 2) - 1)))
    if base < 1e-9 * len(target):  # one brightness per colour: nothing for a light to explain
        return Light(np.array([0.0, 1.0, 0.0]), 1.0, 0.0)
    best, best_model = None, models[0]
    for model in models:
        def residual(params: np.ndarray, model=model) -> np.ndarray:
            return target - centred(np.log(np.maximum(_light(model, params).factor(normals), 1e-6)))

        for theta in (0.6, 1.6, 2.5):  # a few starts: the loss is not convex in the direction
            for phi in np.linspace(0, 2 * np.pi, 3, endpoint=False):
                result = scipy.optimize.least_squares(residual, x0=[theta, phi, -1.0 if model == "lambertian" else 0.0],
                                                      loss="soft_l1", f_scale=scale, max_nfev=100)
                if best is None or result.cost < best.cost:
                    best, best_model = result, model
    light = _light(best_model, best.x)
    light.gain = float(1.0 - 2 * best.cost / max(base, 1e-30))  # least_squares' cost is half the summed loss
    return light


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
                   min_range: float = 0.05) -> Optional[Light]:
    """The fitted light when it explains the colours (see the module docstring), else None (logged)."""
    light = fit_light(colors, normals)
    useful = light.gain >= min_gain and 1.0 - light.ambient >= min_range
    logger.info("de-lighting: fitted %s light towards (%.2f, %.2f, %.2f), darkest factor %.2f, explains %.0f%% "
                "of the brightness variation: %s", light.model, *light.direction, light.ambient,
                100 * max(light.gain, 0.0), "divided out of the colours" if useful else "too little, colours kept")
    return light if useful else None
