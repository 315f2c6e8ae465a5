"""The embedded world: SDFs against brute force, the renderer against closed forms, the canonical pose,
the camera distribution and the prompt grammar."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from carv3d.errors import PromptError, UserError
from carv3d.cameras import VIEW_LABELS, make_cameras, view_label
from carv3d.render.rays import camera_rays
from carv3d.world import (
    AMBIENT,
    COLOUR_NAMES,
    COLOURS,
    OBJECT_NAMES,
    OBJECT_RADIUS,
    OBJECTS,
    VIEW_PROBABILITIES,
    WorldCameraRanges,
    compose_rgb,
    format_prompt,
    parse_prompt,
    render_materials,
    render_world,
    sample_world_cameras,
    tokenizer_words,
    vocabulary,
)
from carv3d.world.objects import (
    BODY,
    DARK,
    sd_box,
    sd_capped_cone_y,
    sd_ellipsoid,
    sd_pyramid,
    sd_torus_y,
)
from carv3d.world.raytrace import light_direction

STEPS = 48  # sphere-tracing steps in these tests (enough at 32 px, see test_tracing_converges)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cameras(elevation: list[float], azimuth: list[float], distance: float = 1.55, fovy: float = 50.0):
    n = len(azimuth)
    return make_cameras(torch.tensor(elevation, dtype=torch.float32), torch.tensor(azimuth, dtype=torch.float32),
                        torch.full((n,), distance), torch.full((n,), fovy))


# ------------------------------------------------------------------------------------- SDF primitives
def _brute_force_distance(points: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
    """Distance from each point to the nearest of many surface samples (an upper bound that tightens
    with the sampling density)."""
    return torch.cdist(points, surface).min(dim=1).values


def _random_points(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 3, generator=_gen(seed)) * 2.0 - 1.0) * scale


def _check_sdf(sdf_values: torch.Tensor, inside: torch.Tensor, brute: torch.Tensor, spacing: float) -> None:
    """|f| matches the brute-force distance within the surface sampling's resolution; the sign is the
    inside test computed another way."""
    assert torch.equal(sdf_values < 0, inside)
    assert (sdf_values.abs() - brute).abs().max() < spacing


def test_box_sdf_matches_brute_force() -> None:
    half = torch.tensor([0.3, 0.2, 0.1])
    g = torch.linspace(-1, 1, 61)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    on_face = (grid.abs() == 1).any(-1)
    surface = grid[on_face] * half  # the six faces, sampled every 1/30 of each half-size
    points = _random_points(1500, 0.6)
    inside = (points.abs() < half).all(-1)
    _check_sdf(sd_box(points, (0, 0, 0), half.tolist()), inside, _brute_force_distance(points, surface), 0.012)


def test_capped_cone_sdf_matches_brute_force() -> None:
    h, r0, r1 = 0.3, 0.35, 0.1
    n = 120
    y = torch.linspace(-h, h, n)
    theta = torch.linspace(0, 2 * math.pi, 2 * n)
    radius = r0 + (r1 - r0) * (y + h) / (2 * h)
    yy, tt = torch.meshgrid(y, theta, indexing="ij")
    rr = radius[:, None].expand_as(yy)
    side = torch.stack([rr * torch.sin(tt), yy, rr * torch.cos(tt)], -1).reshape(-1, 3)
    caps = []
    for yc, rc in ((-h, r0), (h, r1)):
        s = torch.linspace(0, rc, 40)
        ss, tt2 = torch.meshgrid(s, theta, indexing="ij")
        caps.append(torch.stack([ss * torch.sin(tt2), torch.full_like(ss, yc), ss * torch.cos(tt2)], -1).reshape(-1, 3))
    surface = torch.cat([side, *caps])
    points = _random_points(800, 0.55, seed=1)
    rho = points[:, [0, 2]].norm(dim=-1)
    inside = (points[:, 1].abs() < h) & (rho < r0 + (r1 - r0) * (points[:, 1] + h) / (2 * h))
    f = sd_capped_cone_y(points, (0, 0, 0), h, r0, r1)
    _check_sdf(f, inside, _brute_force_distance(points, surface), 0.01)


def test_torus_sdf_is_the_distance_to_the_tube_circle() -> None:
    major, minor = 0.3, 0.1
    phi = torch.linspace(0, 2 * math.pi, 4000)
    circle = torch.stack([major * torch.sin(phi), torch.zeros_like(phi), major * torch.cos(phi)], -1)
    points = _random_points(1000, 0.5, seed=2)
    expected = _brute_force_distance(points, circle) - minor
    torch.testing.assert_close(sd_torus_y(points, (0, 0, 0), major, minor), expected, atol=1e-3, rtol=0)


def test_pyramid_sdf_matches_brute_force() -> None:
    a, height, base_y = 0.33, 0.58, -0.28
    apex = torch.tensor([0.0, base_y + height, 0.0])
    corners = torch.tensor([[a, base_y, a], [-a, base_y, a], [-a, base_y, -a], [a, base_y, -a]])
    u = torch.linspace(0, 1, 100)
    uu, vv = torch.meshgrid(u, u, indexing="ij")
    faces = []
    for i in range(4):  # each side triangle: apex + u·(c_i − apex) + u·v·(c_{i+1} − c_i)
        c0, c1 = corners[i], corners[(i + 1) % 4]
        faces.append((apex + uu[..., None] * (c0 - apex) + (uu * vv)[..., None] * (c1 - c0)).reshape(-1, 3))
    base = torch.stack([(2 * uu - 1) * a, torch.full_like(uu, base_y), (2 * vv - 1) * a], -1).reshape(-1, 3)
    surface = torch.cat([*faces, base])
    points = _random_points(800, 0.6, seed=3)
    level = (points[:, 1] - base_y) / height  # inside: above the base, below the apex, within the shrinking square
    inside = (level > 0) & (level < 1) & (points[:, [0, 2]].abs().amax(-1) < a * (1 - level))
    _check_sdf(sd_pyramid(points, base_y, a, height), inside, _brute_force_distance(points, surface), 0.01)


@pytest.mark.parametrize("radii", [(0.36, 0.26, 0.36), (0.25, 0.19, 0.35), (0.085, 0.04, 0.11)])
def test_ellipsoid_approximation_never_exceeds_the_distance_outside(radii) -> None:
    r = torch.tensor(radii)
    direction = torch.randn(60000, 3, generator=_gen(4))
    surface = direction / direction.norm(dim=-1, keepdim=True) * r  # dense, not uniform: a tight upper bound
    points = _random_points(1000, 2.0 * max(radii), seed=5)
    outside = (points / r).norm(dim=-1) > 1.0
    f = sd_ellipsoid(points, (0, 0, 0), radii)
    brute = _brute_force_distance(points, surface)
    assert torch.equal(f > 0, outside)
    assert (f[outside] <= brute[outside] + 2e-4).all()  # safe for sphere tracing
    near = outside & (brute < 0.02)
    assert (f[near] > 0.7 * brute[near] - 4e-3).all()  # and close to it near the surface (4e-3: sampling)


# ------------------------------------------------------------------------------------------- objects
def test_world_has_enough_objects_colours_and_asymmetric_objects() -> None:
    assert len(OBJECT_NAMES) >= 10 and len(COLOUR_NAMES) >= 6
    assert sum(kind.front_differs_from_back for kind in OBJECTS.values()) >= 4


@pytest.mark.parametrize("name", OBJECT_NAMES)
def test_objects_fit_in_their_radius_and_are_solid(name: str) -> None:
    direction = torch.randn(20000, 3, generator=_gen(6))
    shell = direction / direction.norm(dim=-1, keepdim=True) * OBJECT_RADIUS
    d, _ = OBJECTS[name].sdf(shell)
    assert (d > 0).all(), f"{name} reaches outside the ball of radius {OBJECT_RADIUS}"
    g = torch.linspace(-OBJECT_RADIUS, OBJECT_RADIUS, 41)
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    inside = OBJECTS[name].sdf(grid)[0] < 0
    assert inside.float().mean() > 0.03, f"{name} is (nearly) empty"


def _material_maps(name: str, azimuth: float, elevation: float = 15.0, size: int = 32):
    """Unshaded material coverage (ambient 1 → every lit factor is 1) from one camera."""
    return render_materials(name, _cameras([elevation], [azimuth]), size, size, max_steps=STEPS, ambient=1.0)


@pytest.mark.parametrize("name", OBJECT_NAMES)
def test_symmetry_metadata_matches_the_renders(name: str) -> None:
    """Without shading, the back view (azimuth 180) equals the front view exactly when the object is
    invariant under a half turn about Y; views at azimuth 0 and 37 are equal for solids of revolution."""
    kind = OBJECTS[name]
    front, back, turned = (_material_maps(name, az).weights for az in (0.0, 180.0, 37.0))
    front_back_difference = (front - back).abs().sum().item()
    if kind.front_differs_from_back:
        assert front_back_difference > 20.0, f"{name}: front and back look alike"
    else:
        assert front_back_difference < 4.0, f"{name}: front and back differ ({front_back_difference:.1f} px)"
    turn_difference = (front - turned).abs().sum().item()
    if kind.symmetric_about_y:
        assert turn_difference < 4.0
    else:
        assert turn_difference > 4.0


@pytest.mark.parametrize("name", [n for n in OBJECT_NAMES if OBJECTS[n].front_differs_from_back])
def test_front_features_face_plus_z(name: str) -> None:
    """carv3d's convention: the front faces +Z, so azimuth 0 sees the dark front features and 180
    (mostly) does not. The mushroom is the exception that proves the rule: its front is the coloured
    dome leaning towards the camera, so from behind its cream underside shows instead."""
    front, back = _material_maps(name, 0.0, 5.0).weights, _material_maps(name, 180.0, 5.0).weights
    if name == "mushroom":
        body_front, body_back = front[:, BODY].sum(), back[:, BODY].sum()
        assert body_front > 1.3 * body_back
    else:
        assert front[:, DARK].sum() > 3.0 * back[:, DARK].sum() + 5.0


# ------------------------------------------------------------------------------------------ renderer
def test_sphere_render_matches_the_closed_form() -> None:
    """Rays hit the sphere |p| = r exactly when their distance to the centre, |o × d|, is below r; at
    the hit t = −o·d − √((o·d)² − |o|² + r²), the normal is p / r and the colour is the Lambertian
    formula with the world's light."""
    r, size = 0.42, 32
    cameras = _cameras([10.0, 40.0, -5.0], [0.0, 120.0, -150.0], distance=1.5, fovy=50.0)
    out = render_world("sphere", "blue", cameras, size, size, max_steps=64)
    o, d = camera_rays(cameras, size, size)
    b = (o * d).sum(-1)
    closest = torch.cross(o, d, dim=-1).norm(dim=-1)
    hit = closest < r
    clear = (closest - r).abs() > 2e-3  # leave the pixels that graze the silhouette
    assert torch.equal(out.mask[:, 0][clear] > 0.5, hit[clear])
    t = -b - (b * b - (o * o).sum(-1) + r * r).clamp_min(0).sqrt()
    normal = F.normalize(o + t[..., None] * d, dim=-1)
    inner = hit & ((closest - r).abs() > 0.02)
    torch.testing.assert_close(out.depth[:, 0][inner], t[inner], atol=2e-3, rtol=0)
    torch.testing.assert_close(out.normals.permute(0, 2, 3, 1)[inner], normal[inner], atol=2e-2, rtol=0)
    light = (AMBIENT + (1 - AMBIENT) * (normal @ light_direction()).clamp_min(0))[..., None]
    expected = torch.tensor(COLOURS["blue"]) * light
    torch.testing.assert_close(out.rgb.permute(0, 2, 3, 1)[inner], expected[inner], atol=2e-2, rtol=0)
    assert (out.rgb.permute(0, 2, 3, 1)[~hit & clear] == 1.0).all()  # white background


def test_supersampling_is_the_average_of_finer_renders() -> None:
    """rgb is linear in the material weights, so a 2×2-supersampled render equals the box-filtered
    render at twice the resolution, coloured per sub-ray."""
    cameras = _cameras([20.0], [30.0])
    body = torch.tensor([COLOURS["green"]])
    coarse = render_world("house", body, cameras, 16, 16, supersample=2, max_steps=STEPS)
    fine = render_world("house", body, cameras, 32, 32, supersample=1, max_steps=STEPS)
    torch.testing.assert_close(coarse.rgb, F.avg_pool2d(fine.rgb, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(coarse.mask, F.avg_pool2d(fine.mask, 2), atol=1e-6, rtol=0)


def test_mixed_batches_equal_single_object_renders() -> None:
    cameras = _cameras([10.0, 30.0, 50.0], [0.0, 90.0, 200.0])
    mixed = render_world(["cube", "duck", "cube"], ["red", "pink", "cyan"], cameras, 16, 16, max_steps=STEPS)
    duck = render_world("duck", "pink", cameras[1:2], 16, 16, max_steps=STEPS)
    cubes = render_world("cube", ["red", "cyan"], cameras[torch.tensor([0, 2])], 16, 16, max_steps=STEPS)
    torch.testing.assert_close(mixed.rgb[1:2], duck.rgb)
    torch.testing.assert_close(mixed.rgb[torch.tensor([0, 2])], cubes.rgb)
    weights = render_materials("duck", cameras[1:2], 16, 16, max_steps=STEPS)
    torch.testing.assert_close(compose_rgb(weights.weights, weights.coverage, torch.tensor([COLOURS["pink"]])), duck.rgb)


def test_the_light_is_fixed_in_the_world_and_lights_the_front() -> None:
    out = render_world("sphere", "yellow", _cameras([10.0, 10.0], [0.0, 180.0]), 32, 32, max_steps=STEPS)
    brightness = [(out.rgb[i] * out.mask[i]).sum() / out.mask[i].sum() for i in range(2)]
    assert brightness[0] > 1.3 * brightness[1]


def test_tracing_converges() -> None:
    """STEPS sphere-tracing steps give the same silhouettes as 128 steps up to a few edge pixels per image
    (grazing rays, e.g. through the torus hole, converge slowly)."""
    cameras, _ = sample_world_cameras(6, _gen(7))
    for name in ("torus", "duck"):
        reference = render_materials(name, cameras, 32, 32, max_steps=128).coverage
        fast = render_materials(name, cameras, 32, 32, max_steps=STEPS).coverage
        assert (reference - fast).abs().sum() < 0.03 * reference.sum() + 6  # torus: 24 of 1074 px at 48 steps


# ------------------------------------------------------------------------------------------- cameras
def test_world_cameras_follow_the_view_rule_and_balance_front_and_back() -> None:
    n = 4000
    cameras, labels = sample_world_cameras(n, _gen(8))
    ranges = WorldCameraRanges()
    assert labels == [view_label(e, a) for e, a in zip(cameras.elevation.tolist(), cameras.azimuth.tolist())]
    for word, p in VIEW_PROBABILITIES.items():
        share = labels.count(word) / n
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / n), (word, share)  # 4 binomial standard deviations
    assert ranges.distance[0] <= cameras.distance.min() and cameras.distance.max() <= ranges.distance[1]
    fovy = torch.rad2deg(cameras.fovy)
    assert ranges.fovy[0] - 1e-4 <= fovy.min() and fovy.max() <= ranges.fovy[1] + 1e-4
    again, labels_again = sample_world_cameras(n, _gen(8))
    assert torch.equal(again.c2w, cameras.c2w) and labels_again == labels


# ------------------------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("view", [None, *VIEW_LABELS])
def test_prompts_round_trip(view) -> None:
    for colour in COLOUR_NAMES:
        for name in OBJECT_NAMES:
            parsed = parse_prompt(format_prompt(colour, name, view))
            assert (parsed.colour, parsed.object, parsed.view) == (colour, name, view)
            assert parsed.text == format_prompt(colour, name, view)


def test_prompt_format_and_lenient_parsing() -> None:
    assert format_prompt("red", "cube", "front") == "a red cube, front view"
    assert format_prompt("orange", "cone") == "an orange cone"
    assert parse_prompt("  A Red CUBE, Front View ").view == "front"
    assert parse_prompt("red cube").object == "cube"
    assert parse_prompt("a orange cone").colour == "orange"


@pytest.mark.parametrize("text", ["", "   ", "a shiny cube", "a red teapot, front view", "a cube red", "a red cube, front",
                                  "a red cube, sideways view"])
def test_bad_prompts_are_prompt_errors_that_list_the_vocabulary(text: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_prompt(text)
    assert isinstance(info.value, UserError)
    message = str(info.value)
    assert all(name in message for name in OBJECT_NAMES) and all(c in message for c in COLOUR_NAMES)


def test_unknown_words_are_named() -> None:
    with pytest.raises(PromptError, match="teapot"):
        parse_prompt("a red teapot")


def test_vocabulary_and_tokenizer_words() -> None:
    vocab = vocabulary()
    assert vocab == {"objects": list(OBJECT_NAMES), "colours": list(COLOUR_NAMES), "views": list(VIEW_LABELS)}
    words = tokenizer_words()
    assert len(set(words)) == len(words)
    for colour in COLOUR_NAMES:
        for name in OBJECT_NAMES:
            for view in (None, *VIEW_LABELS):
                assert set(format_prompt(colour, name, view).replace(",", " ,").split()) <= set(words)
