"""The objects of the embedded world: analytic signed distance functions with materials and colours.

Every object is an SDF ``f: R³ → R`` in carv3d's canonical pose (see :mod:`carv3d.cameras`):
+Y is up and the object's *front* faces +Z, so a camera at azimuth 0 sees the front. ``f(p) < 0``
inside, ``f(p) > 0`` outside, and ``|f(p)|`` is the distance to the surface or a lower bound of it
(ellipsoids and intersections of half-spaces are bounds), which is all sphere tracing needs. Every
object fits in the ball of radius :data:`OBJECT_RADIUS` (0.55) around the origin — the scene is the
box ``[−1, 1]³`` and carv3d's NeRF starts from a density blob of radius 0.5 — and is centred so that
cameras looking at the origin frame it.

Each surface point also has a *material*: ``BODY`` takes the prompt's colour, ``DARK`` (doors,
windows, eyes, noses, buttons, a chair's cushion) and ``CREAM`` (a mushroom's stem and gills) are
fixed. The dark features sit on the front of the asymmetric objects and are large, so that a 32 px
image shows which side faces the camera.

Unions keep the material of the nearest part: with parts ``(d_i, m_i)``,

    f(p) = min_i d_i(p),    material(p) = m_{argmin_i d_i(p)}.

Primitive formulas follow Inigo Quilez's catalogue of distance functions (iquilezles.org).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor

OBJECT_RADIUS = 0.55  # every object lies inside |p| < OBJECT_RADIUS
BODY, DARK, CREAM = 0, 1, 2
MATERIAL_NAMES = ("body", "dark", "cream")
# Fixed albedo of the non-body materials; row BODY is a placeholder for the prompt's colour.
MATERIAL_ALBEDO = torch.tensor([[1.0, 1.0, 1.0], [0.08, 0.08, 0.1], [0.96, 0.91, 0.78]])

# Albedo (linear RGB in [0, 1]) of the prompt colours. White and black are left out: white vanishes
# into the background and black into the dark features.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.1, 0.1),
    "orange": (1.0, 0.5, 0.05),
    "yellow": (0.98, 0.86, 0.12),
    "green": (0.15, 0.68, 0.2),
    "cyan": (0.1, 0.78, 0.85),
    "blue": (0.12, 0.25, 0.92),
    "purple": (0.52, 0.2, 0.8),
    "pink": (1.0, 0.5, 0.72),
}


# ------------------------------------------------------------------------------------------ primitives
def _xyz(p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return p[..., 0], p[..., 1], p[..., 2]


def _length2(a: Tensor, b: Tensor) -> Tensor:
    return torch.sqrt(a * a + b * b)


def sd_sphere(p: Tensor, center: Sequence[float], radius: float) -> Tensor:
    """``|p − c| − r``. p: (..., 3) → (...)."""
    return (p - p.new_tensor(center)).norm(dim=-1) - radius


def sd_box(p: Tensor, center: Sequence[float], half: Sequence[float], rounding: float = 0.0) -> Tensor:
    """Box with half-sizes ``b`` and edges rounded by ``r``: with ``q = |p − c| − (b − r)``,
    ``f = |max(q, 0)| + min(max_k q_k, 0) − r`` (exact)."""
    q = (p - p.new_tensor(center)).abs() - (p.new_tensor(half) - rounding)
    return q.clamp_min(0.0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0.0) - rounding


def sd_cylinder_y(p: Tensor, center: Sequence[float], radius: float, half_height: float) -> Tensor:
    """Capped cylinder along Y: ``d = (|q_xz| − r, |q_y| − h)``, ``f = min(max(d), 0) + |max(d, 0)|``."""
    x, y, z = _xyz(p - p.new_tensor(center))
    dr, dy = _length2(x, z) - radius, y.abs() - half_height
    return torch.maximum(dr, dy).clamp_max(0.0) + _length2(dr.clamp_min(0.0), dy.clamp_min(0.0))


def sd_capped_cone_y(p: Tensor, center: Sequence[float], half_height: float, r_bottom: float, r_top: float) -> Tensor:
    """Exact capped cone along Y (radius ``r_bottom`` at ``y = −h``, ``r_top`` at ``+h``), in the 2D
    half-plane ``q = (|q_xz|, q_y)``: the distance to the nearer of the caps (``ca``) and the slanted
    side (``cb``, the segment from ``k1 = (r_top, h)`` along ``k2 = (r_top − r_bottom, 2h)``)."""
    x, y, z = _xyz(p - p.new_tensor(center))
    qx, qy, h = _length2(x, z), y, half_height
    k1x, k1y, k2x, k2y = r_top, h, r_top - r_bottom, 2.0 * h
    cap_r = torch.where(qy < 0.0, torch.full_like(qy, r_bottom), torch.full_like(qy, r_top))
    ca_x, ca_y = qx - torch.minimum(qx, cap_r), qy.abs() - h
    s = ((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)
    s = s.clamp(0.0, 1.0)
    cb_x, cb_y = qx - k1x + k2x * s, qy - k1y + k2y * s
    sign = torch.where((cb_x < 0.0) & (ca_y < 0.0), -torch.ones_like(qx), torch.ones_like(qx))
    return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def sd_torus_y(p: Tensor, center: Sequence[float], major: float, minor: float) -> Tensor:
    """Torus lying in the XZ plane: ``f = |(|q_xz| − R, q_y)| − r``."""
    x, y, z = _xyz(p - p.new_tensor(center))
    return _length2(_length2(x, z) - major, y) - minor


def sd_ellipsoid(p: Tensor, center: Sequence[float], radii: Sequence[float]) -> Tensor:
    """Ellipsoid, Quilez's approximation ``f = k0 (k0 − 1) / k1`` with ``k0 = |q / r|``,
    ``k1 = |q / r²|``: zero exactly on the surface, with the true distance's first-order behaviour
    near it (far better than the bound ``(k0 − 1) · min(r)`` for sphere tracing). Outside the
    ellipsoid it never exceeds the true distance for the ellipsoids used here (checked in the tests),
    which is what sphere tracing from outside needs."""
    q = p - p.new_tensor(center)
    radii_t = p.new_tensor(radii)
    k0 = (q / radii_t).norm(dim=-1)
    k1 = (q / (radii_t * radii_t)).norm(dim=-1).clamp_min(1e-12)
    return k0 * (k0 - 1.0) / k1


def sd_pyramid(p: Tensor, base_y: float, half_base: float, height: float) -> Tensor:
    """Exact square pyramid, base ``[−a, a]²`` at ``y = base_y``, apex ``height`` above it: Quilez's
    unit pyramid (base side 1) evaluated at ``q / (2a)`` and scaled back by ``2a``. Below the base the
    distance is to the base square, ``|max(|q| − (½, 0, ½), 0)|``. Above it Quilez's formula is exact
    outside but inside measures only to the slanted faces, so the base plane is added with
    ``max(f, base_y − y)`` (which changes nothing outside, where ``f`` ≥ the distance to any face plane)."""
    scale = 2.0 * half_base
    q = (p - p.new_tensor([0.0, base_y, 0.0])) / scale
    h = height / scale
    m2 = h * h + 0.25
    ax, ay, az = q[..., 0].abs(), q[..., 1], q[..., 2].abs()
    swap = az > ax
    px, pz = torch.where(swap, az, ax) - 0.5, torch.where(swap, ax, az) - 0.5
    qx, qy, qz = pz, h * ay - 0.5 * px, h * px + 0.5 * ay
    s = (-qx).clamp_min(0.0)
    t = ((qy - 0.5 * pz) / (m2 + 0.25)).clamp(0.0, 1.0)
    a = m2 * (qx + s) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    inside_band = torch.minimum(qy, -qx * m2 - qy * 0.5) > 0.0
    d2 = torch.where(inside_band, torch.zeros_like(a), torch.minimum(a, b))
    f = torch.sqrt((d2 + qz * qz) / m2) * torch.sign(torch.maximum(qz, -ay)) * scale
    below = (q.abs() - q.new_tensor([0.5, 0.0, 0.5])).clamp_min(0.0).norm(dim=-1) * scale
    return torch.where(ay <= 0.0, below, torch.maximum(f, base_y - p[..., 1]))


def sd_gable_roof(p: Tensor, base_y: float, apex_y: float, half_width: float, half_length: float) -> Tensor:
    """Triangular prism with its ridge along Z (a house's roof seen gable-on from the front): the
    intersection of the two slopes ``(h (|x| − w) + w (y − y0)) / √(h² + w²) ≤ 0`` (``h = apex − y0``),
    the floor ``y ≥ y0`` and the slab ``|z| ≤ L``. The max of half-space distances is a bound."""
    x, y, z = _xyz(p)
    h, w = apex_y - base_y, half_width
    slopes = (h * (x.abs() - w) + w * (y - base_y)) / math.hypot(h, w)
    return torch.maximum(torch.maximum(slopes, base_y - y), z.abs() - half_length)


def rotate_x(p: Tensor, angle: float) -> Tensor:
    """Rotate points about the X axis: ``y' = y cos a − z sin a``, ``z' = y sin a + z cos a``."""
    c, s = math.cos(angle), math.sin(angle)
    x, y, z = _xyz(p)
    return torch.stack([x, c * y - s * z, s * y + c * z], dim=-1)


def union(parts: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """``(min_i d_i, m_argmin)`` of parts ``(d_i, material_i)``; ties go to the first part."""
    distances = torch.stack([d for d, _ in parts], dim=-1)
    d, index = distances.min(dim=-1)
    materials = torch.tensor([m for _, m in parts], device=d.device)
    return d, materials[index]


def _body(d: Tensor) -> tuple[Tensor, Tensor]:
    return d, torch.full(d.shape, BODY, dtype=torch.long, device=d.device)


# ------------------------------------------------------------------------------------------- objects
def sphere(p: Tensor) -> tuple[Tensor, Tensor]:
    return _body(sd_sphere(p, (0.0, 0.0, 0.0), 0.42))


def cube(p: Tensor) -> tuple[Tensor, Tensor]:
    return _body(sd_box(p, (0.0, 0.0, 0.0), (0.3, 0.3, 0.3), rounding=0.02))


def cylinder(p: Tensor) -> tuple[Tensor, Tensor]:
    return _body(sd_cylinder_y(p, (0.0, 0.0, 0.0), 0.3, 0.34))


def cone(p: Tensor) -> tuple[Tensor, Tensor]:
    return _body(sd_capped_cone_y(p, (0.0, -0.02, 0.0), 0.36, 0.38, 0.0))


def torus(p: Tensor) -> tuple[Tensor, Tensor]:
    return _body(sd_torus_y(p, (0.0, 0.0, 0.0), 0.3, 0.14))


def pyramid(p: Tensor) -> tuple[Tensor, Tensor]:
    return _body(sd_pyramid(p, -0.28, 0.33, 0.58))


def house(p: Tensor) -> tuple[Tensor, Tensor]:
    """Walls, a gable roof (ridge front to back), a large dark door and two windows on the front."""
    front = 0.24  # z of the front wall
    return union([
        (sd_box(p, (0.0, -0.16, 0.0), (0.29, 0.2, front), rounding=0.01), BODY),
        (sd_gable_roof(p, 0.03, 0.36, 0.35, 0.28), BODY),
        (sd_box(p, (0.0, -0.225, front), (0.085, 0.135, 0.025)), DARK),  # door
        (sd_box(p, (-0.185, -0.08, front), (0.06, 0.06, 0.02)), DARK),  # windows
        (sd_box(p, (0.185, -0.08, front), (0.06, 0.06, 0.02)), DARK),
    ])


def chair(p: Tensor) -> tuple[Tensor, Tensor]:
    """Seat, four legs and a backrest at the back (−Z) with a dark cushion facing the front."""
    parts = [
        (sd_box(p, (0.0, -0.03, 0.02), (0.25, 0.035, 0.23), rounding=0.01), BODY),
        (sd_box(p, (0.0, 0.2, -0.18), (0.25, 0.22, 0.035), rounding=0.01), BODY),
        (sd_box(p, (0.0, 0.21, -0.14), (0.19, 0.15, 0.014)), DARK),
    ]
    for x in (-0.2, 0.2):
        for z in (-0.16, 0.2):
            parts.append((sd_box(p, (x, -0.24, z), (0.035, 0.19, 0.035)), BODY))
    return union(parts)


def snowman(p: Tensor) -> tuple[Tensor, Tensor]:
    """Two stacked balls, a long dark nose pointing +Z, dark eyes and buttons on the front."""
    y0 = 0.03
    nose_frame = torch.stack([p[..., 0], p[..., 2], -(p[..., 1] - (0.2 + y0))], dim=-1)  # local +Y = world +Z
    return union([
        (sd_sphere(p, (0.0, -0.18 + y0, 0.0), 0.25), BODY),
        (sd_sphere(p, (0.0, 0.2 + y0, 0.0), 0.17), BODY),
        (sd_capped_cone_y(nose_frame, (0.0, 0.26, 0.0), 0.13, 0.065, 0.0), DARK),
        (sd_sphere(p, (-0.07, 0.25 + y0, 0.148), 0.04), DARK),
        (sd_sphere(p, (0.07, 0.25 + y0, 0.148), 0.04), DARK),
        (sd_sphere(p, (0.0, -0.08 + y0, 0.228), 0.045), DARK),
        (sd_sphere(p, (0.0, -0.2 + y0, 0.25), 0.045), DARK),
    ])


def mushroom(p: Tensor) -> tuple[Tensor, Tensor]:
    """A cream stem and a dome cap leaning 28° towards the front; the cap's underside (gills) is cream,
    so from behind the cream underside shows and from the front the coloured dome does."""
    stem = sd_capped_cone_y(p, (0.0, -0.2, 0.0), 0.22, 0.12, 0.085)
    cap_frame = rotate_x(p - p.new_tensor([0.0, 0.02, 0.0]), -math.radians(28.0))  # world → cap frame
    dome = sd_ellipsoid(cap_frame, (0.0, 0.0, 0.0), (0.36, 0.26, 0.36))
    underside = -cap_frame[..., 1]
    cap = torch.maximum(dome, underside)
    cap_material = torch.where(underside > dome, CREAM, BODY)
    d, material = union([(stem, CREAM), (cap, BODY)])
    return d, torch.where(material == BODY, cap_material, material)


def duck(p: Tensor) -> tuple[Tensor, Tensor]:
    """A long body, a head at the front with a large dark beak pointing +Z, dark eyes, a tail at the back."""
    return union([
        (sd_ellipsoid(p, (0.0, -0.13, -0.04), (0.25, 0.19, 0.35)), BODY),
        (sd_sphere(p, (0.0, 0.15, 0.16), 0.15), BODY),
        (sd_ellipsoid(p, (0.0, 0.22, -0.36), (0.09, 0.06, 0.09)), BODY),  # tail
        (sd_ellipsoid(p, (0.0, 0.12, 0.33), (0.085, 0.04, 0.11)), DARK),  # beak
        (sd_sphere(p, (-0.09, 0.2, 0.25), 0.032), DARK),
        (sd_sphere(p, (0.09, 0.2, 0.25), 0.032), DARK),
    ])


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class ObjectKind:
    """One kind of object.

    Attributes:
        name: the prompt word ("cube").
        sdf: ``p (..., 3) → (distance (...), material (...) long)``.
        symmetric_about_y: looks the same from every azimuth (a solid of revolution about +Y).
        front_differs_from_back: the front (azimuth 0) and back (azimuth 180) renders differ in
            geometry or material, not only in lighting.
        description: one line for the model card.
    """

    name: str
    sdf: Callable[[Tensor], tuple[Tensor, Tensor]]
    symmetric_about_y: bool
    front_differs_from_back: bool
    description: str


OBJECTS: dict[str, ObjectKind] = {
    kind.name: kind
    for kind in (
        ObjectKind("sphere", sphere, True, False, "ball of radius 0.42"),
        ObjectKind("cube", cube, False, False, "axis-aligned cube of side 0.6, rounded edges"),
        ObjectKind("cylinder", cylinder, True, False, "upright cylinder, radius 0.3, height 0.68"),
        ObjectKind("cone", cone, True, False, "upright cone, base radius 0.38, height 0.72"),
        ObjectKind("torus", torus, True, False, "torus lying flat, radii 0.3 and 0.14"),
        ObjectKind("pyramid", pyramid, False, False, "square pyramid, base 0.66, height 0.58"),
        ObjectKind("house", house, False, True, "walls and gable roof; dark door and two windows on the front"),
        ObjectKind("chair", chair, False, True, "seat, four legs, backrest at the back with a dark cushion facing front"),
        ObjectKind("snowman", snowman, False, True, "two balls; dark nose, eyes and buttons on the front"),
        ObjectKind("mushroom", mushroom, False, True, "cream stem, cap leaning towards the front, cream gills"),
        ObjectKind("duck", duck, False, True, "body, head at the front with a dark beak, tail at the back"),
    )
}
OBJECT_NAMES: tuple[str, ...] = tuple(OBJECTS)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


def colour_rgb(names: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """(N, 3) albedos of colour names."""
    return torch.tensor([COLOURS[n] for n in names], dtype=torch.float32, device=device)


def material_albedo(material: Tensor, body_rgb: Tensor) -> Tensor:
    """Albedo per point: the body colour where ``material == BODY``, the fixed table otherwise.

    Args:
        material: (...,) long material ids.
        body_rgb: (..., 3) body colour of each point (broadcastable).

    Returns:
        (..., 3) albedo.
    """
    table = MATERIAL_ALBEDO.to(body_rgb.device, body_rgb.dtype)[material]
    return torch.where((material == BODY).unsqueeze(-1), body_rgb.expand_as(table), table)
