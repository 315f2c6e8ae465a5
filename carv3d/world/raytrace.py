"""Ground-truth renders of the embedded world: batched sphere tracing with carv3d's cameras.

Rays come from :func:`carv3d.render.rays.camera_rays` (pixel centres, OpenGL camera axes), so a world
render and a NeRF render of the same :class:`~carv3d.cameras.Cameras` line up pixel for pixel.
Each ray ``o + t·d`` (``|d| = 1``) is clipped to the bounding ball ``|p| ≤ R`` and marched with

    t_{k+1} = min(t_k + f(o + t_k d), t_exit),

which never passes the surface because ``f`` is a distance or a lower bound of it. A ray hits when
``f < ε + c·t`` after the last step, ``c`` half a pixel's angular size: a ray that passes within half a
pixel of the surface counts (grazing rays near silhouettes converge slowly; this keeps the edges
stable with few steps). Normals are the SDF gradient by the tetrahedron rule

    n ∝ Σ_i k_i f(p + h k_i),   k ∈ {(1,−1,−1), (−1,−1,1), (−1,1,−1), (1,1,1)}.

Shading is carv3d's Lambertian (:func:`carv3d.render.shading.shade`) with one directional light fixed
in the world, above and in front of the object (so the front is lit and the back gets the ambient
share only):

    c = a · (k + (1 − k) · max(0, n · l)),   l = normalize(0.35, 0.6, 1),   k = 0.4,

on a white background. With ``supersample = s`` each pixel averages an ``s × s`` grid of rays (a box
filter), which gives soft, antialiased edges and a fractional coverage mask.

Because the colour of a pixel is linear in the albedos of the materials it sees,

    rgb = Σ_m albedo_m · w_m + (1 − coverage) · 1,   w_m = mean over sub-rays of [hit ∧ material = m] · L,

(``L`` the light factor) a render can be stored once per (object, camera) as the material weights
``w`` and recoloured for any prompt colour for free (:func:`compose_rgb`); the teacher's training
script relies on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from carv3d.cameras import Cameras, make_cameras, view_labels
from carv3d.render.rays import camera_rays
from carv3d.render.shading import shade
from carv3d.world.objects import MATERIAL_ALBEDO, MATERIAL_NAMES, OBJECTS, colour_rgb

Tensor = torch.Tensor
SDF = Callable[[Tensor], tuple[Tensor, Tensor]]

LIGHT_DIRECTION = (0.35, 0.6, 1.0)  # towards the light, normalised before use
AMBIENT = 0.4
BOUND_RADIUS = 0.65  # rays are marched inside this ball (objects fit in objects.OBJECT_RADIUS)
N_MATERIALS = len(MATERIAL_NAMES)


@dataclass
class MaterialRender:
    """A render before colouring: what :func:`compose_rgb` needs, plus geometry.

    Attributes:
        weights: (B, M, H, W) shaded coverage of each material, ``w_m`` in the module docstring.
        coverage: (B, 1, H, W) fraction of each pixel's sub-rays that hit the object.
        depth: (B, 1, H, W) mean distance along the ray of the sub-rays that hit; 0 where empty.
        normals: (B, 3, H, W) unit world-space normal (mean over hitting sub-rays); 0 where empty.
    """

    weights: Tensor
    coverage: Tensor
    depth: Tensor
    normals: Tensor


@dataclass
class WorldRender:
    """Ground-truth images of B cameras.

    Attributes:
        rgb: (B, 3, H, W) in [0, 1] over a white background.
        mask: (B, 1, H, W) silhouette coverage in [0, 1] (binary without supersampling).
        depth: (B, 1, H, W) distance from the camera along the ray; 0 where empty.
        normals: (B, 3, H, W) world-space unit normals; 0 where empty.
    """

    rgb: Tensor
    mask: Tensor
    depth: Tensor
    normals: Tensor


def light_direction(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """(3,) unit vector towards the world's light."""
    return F.normalize(torch.tensor(LIGHT_DIRECTION, device=device, dtype=dtype), dim=0)


def ball_interval(origins: Tensor, directions: Tensor, radius: float) -> tuple[Tensor, Tensor, Tensor]:
    """Where unit-direction rays cross the ball ``|p| ≤ radius``: with ``b = o·d``, ``c = |o|² − r²``,
    ``t = −b ∓ √(b² − c)``. Returns ``t_enter`` (≥ 0), ``t_exit`` and ``hit`` (all (...,))."""
    b = (origins * directions).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    root = disc.clamp_min(0.0).sqrt()
    t_exit = -b + root
    hit = (disc > 0.0) & (t_exit > 0.0)
    return (-b - root).clamp_min(0.0), t_exit, hit


def sphere_trace(sdf: SDF, origins: Tensor, directions: Tensor, max_steps: int = 64,
                 hit_epsilon: float = 1e-3, cone: Union[float, Tensor] = 0.0) -> tuple[Tensor, Tensor]:
    """March rays through an SDF (formula in the module docstring).

    Args:
        sdf: ``p (N, 3) → (distance (N,), material (N,))``.
        origins, directions: (N, 3), unit directions.
        max_steps: marching steps (every ray takes all of them; converged rays stay put).
        hit_epsilon: ε, absolute hit tolerance.
        cone: c, a float or (N,) per ray; a ray hits where ``f < ε + c·t`` at its final point.

    Returns:
        t: (N,) distance along each ray to the hit (or to where it stopped).
        hit: (N,) bool.
    """
    t, t_exit, inside = ball_interval(origins, directions, BOUND_RADIUS)
    distance = torch.full_like(t, float("inf"))
    for _ in range(max_steps):
        distance = sdf(origins + t.unsqueeze(-1) * directions)[0]
        t = torch.minimum(t + distance, t_exit)
    return t, inside & (distance < hit_epsilon + cone * t) & (t < t_exit)


_TETRAHEDRON = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))


def sdf_normals(sdf: SDF, points: Tensor, step: float = 1e-3) -> Tensor:
    """(N, 3) unit normals ``∇f / |∇f|`` by the tetrahedron rule (module docstring)."""
    k = points.new_tensor(_TETRAHEDRON)  # (4, 3)
    values = torch.stack([sdf(points + step * k[i])[0] for i in range(4)], dim=-1)  # (N, 4)
    return F.normalize(values @ k, dim=-1)


def render_materials(object_name: str, cameras: Cameras, height: int, width: int, supersample: int = 1,
                     max_steps: int = 64, ambient: float = AMBIENT) -> MaterialRender:
    """Trace one object from B cameras and return material weights and geometry (not yet coloured).

    Args:
        object_name: a key of :data:`carv3d.world.objects.OBJECTS`.
        cameras: B cameras (any device; the work happens there).
        height, width: output size in pixels.
        supersample: s; each pixel averages s × s sub-rays.
        max_steps: sphere-tracing steps.
        ambient: k in the shading formula.
    """
    kind = OBJECTS[object_name]
    s = int(supersample)
    origins, directions = camera_rays(cameras, height * s, width * s)  # (B, sH, sW, 3)
    batch = origins.shape[0]
    o, d = origins.reshape(-1, 3), directions.reshape(-1, 3)
    pixel_angle = 2.0 * torch.tan(0.5 * cameras.fovy.to(o.dtype)) / (height * s)  # (B,) radians per sub-ray
    cone = (0.5 * pixel_angle).repeat_interleave(height * s * width * s)  # (N,)
    t, hit = sphere_trace(kind.sdf, o, d, max_steps=max_steps, cone=cone)
    points = o + t.unsqueeze(-1) * d
    material = kind.sdf(points)[1]
    normals = sdf_normals(kind.sdf, points)
    light = light_direction(o.device, o.dtype).expand_as(normals)
    light_factor = shade(torch.ones_like(normals), normals, light, "textureless", ambient)[:, 0]  # (N,) = L
    hit_f = hit.to(o.dtype)
    per_material = F.one_hot(material, N_MATERIALS).to(o.dtype) * (hit_f * light_factor).unsqueeze(-1)

    def pool(x: Tensor) -> Tensor:  # (N, C) on the fine grid → (B, C, H, W) box-filtered
        x = x.reshape(batch, height * s, width * s, -1).permute(0, 3, 1, 2)
        return F.avg_pool2d(x, s) if s > 1 else x

    coverage = pool(hit_f.unsqueeze(-1))
    safe = coverage.clamp_min(1e-8)
    depth = pool((t * hit_f).unsqueeze(-1)) / safe * (coverage > 0)
    mean_normals = pool(normals * hit_f.unsqueeze(-1))
    mean_normals = F.normalize(mean_normals, dim=1) * (coverage > 0)
    return MaterialRender(pool(per_material), coverage, depth, mean_normals)


def compose_rgb(weights: Tensor, coverage: Tensor, body_rgb: Tensor) -> Tensor:
    """Colour material weights: ``rgb = Σ_m albedo_m · w_m + (1 − coverage)`` (white background).

    Args:
        weights: (B, M, H, W) from :func:`render_materials`.
        coverage: (B, 1, H, W).
        body_rgb: (B, 3) albedo of the BODY material of each image.

    Returns:
        (B, 3, H, W) in [0, 1].
    """
    table = MATERIAL_ALBEDO.to(weights.device, weights.dtype).expand(weights.shape[0], -1, -1).clone()  # (B, M, 3)
    table[:, 0] = body_rgb.to(weights.dtype)
    rgb = torch.einsum("bmhw,bmc->bchw", weights, table)
    return (rgb + (1.0 - coverage)).clamp(0.0, 1.0)


def render_world(objects: Union[str, Sequence[str]], colours: Union[str, Sequence[str], Tensor], cameras: Cameras,
                 height: int, width: int, supersample: int = 1, max_steps: int = 64,
                 ambient: float = AMBIENT) -> WorldRender:
    """Ground-truth renders: image b shows ``objects[b]`` in ``colours[b]`` from camera b.

    Args:
        objects: one object name for all cameras, or B names (mixed kinds are traced kind by kind).
        colours: one colour name, B names, or a (B, 3) albedo tensor.
        cameras: B cameras; everything runs on their device.
        height, width, supersample, max_steps, ambient: see :func:`render_materials`.
    """
    batch, device = len(cameras), cameras.c2w.device
    names = [objects] * batch if isinstance(objects, str) else list(objects)
    if isinstance(colours, Tensor):
        body = colours.to(device, torch.float32).expand(batch, 3)
    else:
        body = colour_rgb([colours] * batch if isinstance(colours, str) else list(colours), device)
    if len(names) != batch or body.shape[0] != batch:
        raise ValueError(f"need one object and one colour per camera ({batch}), got {len(names)} and {body.shape[0]}")
    rgb = torch.empty(batch, 3, height, width, device=device)
    mask, depth = torch.empty(batch, 1, height, width, device=device), torch.empty(batch, 1, height, width, device=device)
    normals = torch.empty(batch, 3, height, width, device=device)
    for name in dict.fromkeys(names):
        index = torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
        part = render_materials(name, cameras[index], height, width, supersample, max_steps, ambient)
        rgb[index] = compose_rgb(part.weights, part.coverage, body[index])
        mask[index], depth[index], normals[index] = part.coverage, part.depth, part.normals
    return WorldRender(rgb, mask, depth, normals)


# ------------------------------------------------------------------------------------------- cameras
@dataclass(frozen=True)
class WorldCameraRanges:
    """The camera distribution of the teacher's training images (degrees and scene units).

    The view words follow :func:`carv3d.cameras.view_label` with these thresholds.
    """

    elevation: tuple[float, float] = (-10.0, 90.0)
    # One distance and one field of view: an object's apparent size then tells its true size. With
    # ranges (1.3–1.8, 40–60°) the teacher could not tell a big cube from a near one, and score
    # distillation let objects grow past their size (a cube's result then matched the sphere best).
    distance: tuple[float, float] = (1.55, 1.55)
    fovy: tuple[float, float] = (50.0, 50.0)
    front_half_angle: float = 45.0
    overhead_elevation: float = 60.0


# Front and back are drawn equally often and more often than with a uniform azimuth (where a side
# view is as likely as front and back together), so the teacher sees both ends of each object.
VIEW_PROBABILITIES: dict[str, float] = {"front": 0.3, "side": 0.2, "back": 0.3, "overhead": 0.2}


def sample_world_cameras(n: int, generator: torch.Generator, ranges: WorldCameraRanges = WorldCameraRanges(),
                         view_probabilities: Optional[dict[str, float]] = None) -> tuple[Cameras, list[str]]:
    """Draw n cameras on CPU with the view words in the given proportions.

    A view word v is drawn with probability ``view_probabilities[v]``, then the camera uniformly in
    v's region: front ``|az| < a``, back ``|az| > 180 − a``, side in between (either side), all with
    elevation in ``[el_min, e_o]``; overhead: elevation in ``[e_o, el_max]``, any azimuth
    (``a`` = front_half_angle, ``e_o`` = overhead_elevation). Distance and fovy are uniform.

    Returns:
        cameras: n cameras (CPU).
        labels: their view words, from :func:`carv3d.cameras.view_labels` (the one rule).
    """
    probs = view_probabilities or VIEW_PROBABILITIES
    words = list(probs)
    choice = torch.multinomial(torch.tensor([probs[w] for w in words]), n, replacement=True, generator=generator)
    u = torch.rand(n, 5, generator=generator)
    a, e_o = ranges.front_half_angle, ranges.overhead_elevation
    el_lo, el_hi = ranges.elevation
    elevation = el_lo + (min(e_o, el_hi) - el_lo) * u[:, 0]
    azimuth = torch.empty(n)
    for i, word in enumerate(words):
        pick = choice == i
        v = u[pick, 1]
        if word == "front":
            azimuth[pick] = (2.0 * v - 1.0) * a
        elif word == "back":
            azimuth[pick] = 180.0 + (2.0 * v - 1.0) * a
        elif word == "side":
            side = torch.where(u[pick, 2] < 0.5, -1.0, 1.0)
            azimuth[pick] = side * (a + (180.0 - 2.0 * a) * v)
        elif word == "overhead":
            azimuth[pick] = 360.0 * v - 180.0
            elevation[pick] = e_o + (el_hi - e_o) * u[pick, 0]
        else:
            raise ValueError(f"unknown view word {word!r}")
    distance = ranges.distance[0] + (ranges.distance[1] - ranges.distance[0]) * u[:, 3]
    fovy = ranges.fovy[0] + (ranges.fovy[1] - ranges.fovy[0]) * u[:, 4]
    cameras = make_cameras(elevation, azimuth, distance, fovy)
    return cameras, view_labels(cameras, ranges.front_half_angle, ranges.overhead_elevation)


def reference_cameras(view: str, n: int = 1, device: torch.device | str = "cpu") -> Cameras:
    """n canonical cameras of a view word (distance 1.55, fovy 50, elevation 15 or 75 overhead),
    spread over the middle of the view's azimuth range; for ground truth and tests."""
    centre = {"front": 0.0, "side": 90.0, "back": 180.0, "overhead": 0.0}[view]
    spread = 20.0 if view != "overhead" else 90.0
    offsets = torch.linspace(-spread, spread, n) if n > 1 else torch.zeros(1)
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    elevation = full(75.0 if view == "overhead" else 15.0)
    return make_cameras(elevation, centre + offsets, full(1.55), full(50.0)).to(device)
