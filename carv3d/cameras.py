"""Cameras: random views for training, orbits for turntables, and view labels for prompts.

Convention (shared by the renderer, the embedded world and the exported meshes, glTF-style):
world +Y is up; the object's front faces +Z. A camera at azimuth φ and elevation θ (degrees)
at distance d sits at

    position = d · (cos θ · sin φ,  sin θ,  cos θ · cos φ)

so azimuth 0 looks at the front from +Z, azimuth 90 looks from +X, ±180 from the back (−Z).
Cameras look at the origin; camera-to-world matrices use OpenGL axes (the camera looks down its −Z,
+Y up in the image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class Cameras:
    """A batch of B pinhole cameras looking at the origin.

    Attributes:
        c2w: (B, 4, 4) camera-to-world, OpenGL axes.
        fovy: (B,) vertical field of view in radians.
        elevation: (B,) degrees.
        azimuth: (B,) degrees in (−180, 180].
        distance: (B,) distance to the origin.
    """

    c2w: torch.Tensor
    fovy: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Cameras":
        """Move to ``device``. ``non_blocking`` from (pageable) CPU memory is safe — CUDA stages the
        bytes before returning — and avoids the stream synchronisation of a blocking copy."""
        return Cameras(*(t.to(device, non_blocking=non_blocking)
                         for t in (self.c2w, self.fovy, self.elevation, self.azimuth, self.distance)))

    def __getitem__(self, index) -> "Cameras":
        return Cameras(self.c2w[index], self.fovy[index], self.elevation[index], self.azimuth[index], self.distance[index])


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Wrap degrees to (−180, 180]."""
    wrapped = torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0
    return torch.where(wrapped == -180.0, torch.full_like(wrapped, 180.0), wrapped)


def view_label(elevation_deg: float, azimuth_deg: float, front_half_angle: float = 45.0,
               overhead_elevation: float = 60.0) -> str:
    """The view word of a camera: ``overhead`` above ``overhead_elevation``, else ``front`` when
    |azimuth| < front_half_angle, ``back`` when |azimuth| > 180 − front_half_angle, else ``side``.

    This single rule labels prompts in training and the embedded teacher's training data.
    """
    if elevation_deg > overhead_elevation:
        return "overhead"
    az = abs(float(wrap_azimuth(torch.tensor(float(azimuth_deg)))))
    if az < front_half_angle:
        return "front"
    if az > 180.0 - front_half_angle:
        return "back"
    return "side"


def view_labels(cameras: Cameras, front_half_angle: float = 45.0, overhead_elevation: float = 60.0) -> list[str]:
    return [
        view_label(float(e), float(a), front_half_angle, overhead_elevation)
        for e, a in zip(cameras.elevation.tolist(), cameras.azimuth.tolist())
    ]


def look_at_origin(positions: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices (B, 4, 4) for cameras at ``positions`` (B, 3) looking at the origin.

    Straight overhead (the view direction parallel to Y) uses −Z as the image's up hint, so the
    object's front (+Z) is at the bottom of an overhead image.
    """
    forward = -positions / positions.norm(dim=-1, keepdim=True)  # camera looks down its −Z = forward
    up_hint = torch.tensor([0.0, 1.0, 0.0], dtype=positions.dtype, device=positions.device).expand_as(forward)
    degenerate = (torch.cross(forward, up_hint, dim=-1).norm(dim=-1) < 1e-6).unsqueeze(-1)
    alt_hint = torch.tensor([0.0, 0.0, -1.0], dtype=positions.dtype, device=positions.device).expand_as(forward)
    up_hint = torch.where(degenerate, alt_hint, up_hint)
    right = torch.nn.functional.normalize(torch.cross(forward, up_hint, dim=-1), dim=-1)
    up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(positions.shape[0], 4, 4, dtype=positions.dtype, device=positions.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = positions
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_position(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """(B, 3) positions; see the module docstring for the formula."""
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    return torch.stack(
        [distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el), distance * torch.cos(el) * torch.cos(az)],
        dim=-1,
    )


def make_cameras(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor,
                 fovy_deg: torch.Tensor) -> Cameras:
    """Cameras from spherical coordinates (all (B,) tensors, degrees)."""
    azimuth_deg = wrap_azimuth(azimuth_deg)
    positions = spherical_to_position(elevation_deg, azimuth_deg, distance)
    return Cameras(look_at_origin(positions), torch.deg2rad(fovy_deg), elevation_deg, azimuth_deg, distance)


def orbit_cameras(n_views: int, elevation_deg: float = 15.0, distance: float = 1.5, fovy_deg: float = 50.0,
                  start_azimuth_deg: float = 0.0, device: torch.device | str = "cpu") -> Cameras:
    """``n_views`` cameras evenly spaced in azimuth at one elevation (turntables, validation)."""
    az = start_azimuth_deg + torch.arange(n_views, dtype=torch.float32, device=device) * (360.0 / n_views)
    full = lambda v: torch.full((n_views,), float(v), dtype=torch.float32, device=device)  # noqa: E731
    return make_cameras(full(elevation_deg), az, full(distance), full(fovy_deg))


class CameraSampler:
    """Random training cameras, uniform in each range.

    With ``stratified=True`` the azimuth range is cut into S strata (``n_azimuth_strata``).
    Each step draws its first stratum s₀ from a shuffled cycle of all S strata that consecutive
    steps continue, and its B cameras sit evenly around the object in strata

        s_j = (s₀ + round(j·S/B)) mod S,   j = 0 … B − 1,

    each with its own uniform jitter inside its stratum (B = 2 gives antithetic front/back pairs).
    s₀ is uniform over the strata and the offsets are fixed, so every camera's azimuth is still
    uniform on the range (the estimator stays unbiased), while the renders of a step and of nearby
    steps are spread around the object, which lowers the between-render variance of the gradient.
    """

    def __init__(self, elevation_range: Sequence[float], azimuth_range: Sequence[float],
                 distance_range: Sequence[float], fovy_range: Sequence[float], stratified: bool = False,
                 n_azimuth_strata: int = 8):
        self.elevation_range = tuple(float(v) for v in elevation_range)
        self.azimuth_range = tuple(float(v) for v in azimuth_range)
        self.distance_range = tuple(float(v) for v in distance_range)
        self.fovy_range = tuple(float(v) for v in fovy_range)
        self.stratified = stratified
        self.n_azimuth_strata = n_azimuth_strata
        self._cycle: list[int] = []

    @classmethod
    def from_config(cls, camera_cfg) -> "CameraSampler":
        return cls(camera_cfg.elevation_range, camera_cfg.azimuth_range, camera_cfg.distance_range,
                   camera_cfg.fovy_range, stratified=bool(camera_cfg.stratified))

    @staticmethod
    def _uniform(n: int, lo_hi: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def _azimuth_strata(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Strata of one step's n cameras: s₀ from the shuffled cycle, the others evenly spaced after it."""
        if not self._cycle:
            self._cycle = torch.randperm(self.n_azimuth_strata, generator=generator).tolist()
        first, total = self._cycle.pop(), self.n_azimuth_strata
        return torch.tensor([(first + round(j * total / n)) % total for j in range(n)], dtype=torch.float32)

    def sample(self, n: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Cameras:
        """Draw n cameras on CPU from ``generator`` (so a run reproduces on any device), then move them."""
        elevation = self._uniform(n, self.elevation_range, generator)
        if self.stratified:
            lo, hi = self.azimuth_range
            width = (hi - lo) / self.n_azimuth_strata
            azimuth = lo + width * (self._azimuth_strata(n, generator) + torch.rand(n, generator=generator))
        else:
            azimuth = self._uniform(n, self.azimuth_range, generator)
        distance = self._uniform(n, self.distance_range, generator)
        fovy = self._uniform(n, self.fovy_range, generator)
        return make_cameras(elevation, azimuth, distance, fovy).to(device)

    def state_dict(self) -> dict:
        return {"cycle": list(self._cycle)}

    def load_state_dict(self, state: dict) -> None:
        self._cycle = [int(v) for v in state.get("cycle", [])]

