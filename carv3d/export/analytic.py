"""Analytic density/colour fields with known geometry, for tests and export benchmarks.

They follow the field protocol the exporter consumes (``radius``, ``density(x)``, ``field(x)``).
The density of a shape with signed distance d(x) (negative inside) is a soft step

    σ(x) = σ_max · sigmoid(−d(x) / ε)

so that ``σ = σ_max / 2`` exactly on the shape's surface, ``σ → σ_max`` inside and ``→ 0`` outside;
ε (scene units) is the width of the transition, like the soft boundary of a trained NeRF.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Callable, Optional, Sequence, Tuple

import torch

ColourFn = Callable[[torch.Tensor], torch.Tensor]  # (N, 3) positions -> (N, 3) albedo in [0, 1]


def sphere_sdf(x: torch.Tensor, centre: Sequence[float], radius: float) -> torch.Tensor:
    """d(x) = |x − c| − ρ; x: (N, 3) -> (N,)."""
    c = torch.as_tensor(centre, dtype=x.dtype, device=x.device)
    return (x - c).norm(dim=-1) - radius


def box_sdf(x: torch.Tensor, centre: Sequence[float], half_extent: Sequence[float]) -> torch.Tensor:
    """Exact box distance: with q = |x − c| − b, d = |max(q, 0)| + min(max_i q_i, 0); (N, 3) -> (N,)."""
    c = torch.as_tensor(centre, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(half_extent, dtype=x.dtype, device=x.device)
    q = (x - c).abs() - b
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def constant_colour(rgb: Sequence[float]) -> ColourFn:
    """A colour function returning ``rgb`` everywhere."""
    def colour(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(rgb, dtype=x.dtype, device=x.device).expand(x.shape[0], 3)
    return colour


def split_colour(left: Sequence[float], right: Sequence[float], axis: int = 0) -> ColourFn:
    """``left`` where x[axis] < 0, ``right`` elsewhere."""
    def colour(x: torch.Tensor) -> torch.Tensor:
        lo = torch.as_tensor(left, dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(right, dtype=x.dtype, device=x.device)
        return torch.where((x[:, axis] < 0).unsqueeze(-1), lo, hi)
    return colour


@dataclass
class Shape:
    """One solid: a signed distance function and a colour function."""

    sdf: Callable[[torch.Tensor], torch.Tensor]
    colour: ColourFn = dataclass_field(default_factory=lambda: constant_colour((0.8, 0.8, 0.8)))


class AnalyticField:
    """A union of soft solids: σ = σ_max · sigmoid(−min_s d_s / ε); albedo of the nearest shape.

    Args:
        shapes: the solids.
        radius: half the side of the scene box.
        max_density: σ_max; the surface of every shape is the level σ_max / 2.
        softness: ε, the width of the density step in scene units.
    """

    def __init__(self, shapes: Sequence[Shape], radius: float = 1.0, max_density: float = 100.0,
                 softness: float = 0.02):
        self.shapes = list(shapes)
        self.radius = float(radius)
        self.max_density = float(max_density)
        self.softness = float(softness)

    @property
    def surface_level(self) -> float:
        """The density on every shape's surface, σ_max / 2."""
        return self.max_density / 2.0

    def _distances(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([shape.sdf(x) for shape in self.shapes], dim=-1)  # (N, S)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) -> σ: (N,)."""
        d = self._distances(x).min(dim=-1).values
        return self.max_density * torch.sigmoid(-d / self.softness)

    def albedo(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) -> (N, 3) albedo of the shape whose surface is nearest (smallest signed distance)."""
        nearest = self._distances(x).argmin(dim=-1)  # (N,)
        colours = torch.stack([shape.colour(x) for shape in self.shapes], dim=1)  # (N, S, 3)
        return colours[torch.arange(x.shape[0], device=x.device), nearest]

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.density(x), self.albedo(x)


def sphere_field(sphere_radius: float = 0.5, centre: Sequence[float] = (0.0, 0.0, 0.0),
                 colour: Optional[ColourFn] = None, **kwargs) -> AnalyticField:
    """One sphere of radius ρ at ``centre``; surface level ``field.surface_level``."""
    shape = Shape(lambda x: sphere_sdf(x, centre, sphere_radius), colour or constant_colour((0.8, 0.8, 0.8)))
    return AnalyticField([shape], **kwargs)


def bumpy_box_field(half_extent: float = 0.4, colour: Optional[ColourFn] = None) -> AnalyticField:
    """A cube with a bumpy surface, ``d(x) = d_box(x) + b(x)`` with two products of sines,

        b(x) = 0.04·sin(23x + 1)·sin(29y + 2)·sin(31z + 3) + 0.02·sin(71x)·sin(67y + 1)·sin(73z),

    like the surface of a trained NeRF: quadric decimation of its isosurface folds thin bumps onto
    themselves (non-manifold edges, duplicate faces), which the export must repair.
    """
    def sdf(x: torch.Tensor) -> torch.Tensor:
        bumps = (0.04 * torch.sin(23 * x[:, 0] + 1) * torch.sin(29 * x[:, 1] + 2) * torch.sin(31 * x[:, 2] + 3)
                 + 0.02 * torch.sin(71 * x[:, 0]) * torch.sin(67 * x[:, 1] + 1) * torch.sin(73 * x[:, 2]))
        return box_sdf(x, (0.0, 0.0, 0.0), (half_extent,) * 3) + bumps
    return AnalyticField([Shape(sdf, colour or split_colour((0.9, 0.2, 0.1), (0.1, 0.3, 0.9)))], softness=0.01)
