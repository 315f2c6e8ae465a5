"""Rays, ray/box clipping and stratified samples against closed forms and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from carv3d.cameras import make_cameras, orbit_cameras
from carv3d.render.rays import camera_rays, ray_box_intersect
from carv3d.render.sampling import RaySegments, stratified_samples


def _angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = (a * b).sum() / (a.norm() * b.norm())
    return math.acos(float(cos.clamp(-1.0, 1.0)))


# ---------------------------------------------------------------- camera_rays


def test_centre_ray_points_at_origin():
    g = torch.Generator().manual_seed(3)
    n = 6
    cameras = make_cameras(
        -10 + 100 * torch.rand(n, generator=g), -180 + 360 * torch.rand(n, generator=g),
        1 + torch.rand(n, generator=g), 40 + 30 * torch.rand(n, generator=g),
    )
    origins, directions = camera_rays(cameras, 33, 47)  # odd sides: a pixel sits on the optical axis
    assert origins.shape == directions.shape == (n, 33, 47, 3)
    centre = directions[:, 16, 23]
    expected = -cameras.positions / cameras.positions.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(centre, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(origins[:, 5, 7], cameras.positions)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(n, 33, 47), atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width", [(21, 21), (15, 41)])
def test_fovy_matches_angle_between_edge_rays(height, width):
    fovy_deg = 55.0
    cameras = orbit_cameras(1, elevation_deg=20.0, fovy_deg=fovy_deg)
    _, directions = camera_rays(cameras, height, width)
    top, bottom = directions[0, 0, width // 2], directions[0, -1, width // 2]
    left, right = directions[0, height // 2, 0], directions[0, height // 2, -1]
    half = math.tan(math.radians(fovy_deg) / 2)
    # Pixel centres sit half a pixel inside the image edges: the outermost centres span
    # (H − 1)/H of the image height (and (W − 1)/H of it horizontally; pixels are square).
    assert _angle(top, bottom) == pytest.approx(2 * math.atan(half * (height - 1) / height), abs=1e-5)
    assert _angle(left, right) == pytest.approx(2 * math.atan(half * (width - 1) / height), abs=1e-5)


def test_image_axes_follow_opengl_convention():
    # At azimuth 0, elevation 0 the camera sits on +Z looking at −Z: image right = world +X, image up = +Y.
    cameras = orbit_cameras(1, elevation_deg=0.0, distance=2.0)
    _, d = camera_rays(cameras, 9, 9)
    assert d[0, 4, -1, 0] > 0 and d[0, 4, 0, 0] < 0  # right column looks towards +X
    assert d[0, 0, 4, 1] > 0 and d[0, -1, 4, 1] < 0  # top row looks up (+Y)
    assert torch.all(d[0, :, :, 2] < 0)


# ---------------------------------------------------------------- ray_box_intersect


def _brute_force_interval(o: np.ndarray, d: np.ndarray, radius: float, near: float, t_max: float, step: float):
    t = np.arange(near, t_max, step)
    inside = np.all(np.abs(o[None] + t[:, None] * d[None]) <= radius, axis=-1)
    if not inside.any():
        return None
    idx = np.nonzero(inside)[0]
    return t[idx[0]], t[idx[-1]]


def test_ray_box_intersect_matches_brute_force_marching():
    rng = np.random.default_rng(0)
    radius, near, step = 0.8, 0.05, 1e-4
    origins = rng.uniform(-2.5, 2.5, size=(150, 3))
    origins[:20] = rng.uniform(-0.7, 0.7, size=(20, 3))  # cameras inside the box
    targets = rng.uniform(-1.5, 1.5, size=(150, 3))
    directions = targets - origins
    directions[140:, :2] = 0.0  # axis-parallel rays: zero components inside and outside the slabs
    directions[145:, 2] = -np.sign(origins[145:, 2])
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    t_near, t_far, hit = ray_box_intersect(
        torch.tensor(origins, dtype=torch.float32), torch.tensor(directions, dtype=torch.float32), radius, near=near
    )
    n_hits = 0
    for i in range(len(origins)):
        reference = _brute_force_interval(origins[i], directions[i], radius, near, 8.0, step)
        if reference is None:
            assert not hit[i], i
            assert float(t_far[i]) == float(t_near[i])
            continue
        n_hits += 1
        assert hit[i], i
        assert float(t_near[i]) == pytest.approx(reference[0], abs=step + 1e-5)
        assert float(t_far[i]) == pytest.approx(reference[1], abs=step + 1e-5)
    assert 40 < n_hits < 150  # the set has both hits and misses
    assert torch.all(t_near >= near)


# ---------------------------------------------------------------- stratified_samples


def test_stratified_without_generator_is_equal_bins():
    t_near = torch.tensor([0.5, 1.0, 2.0])
    t_far = torch.tensor([1.5, 1.0, 5.0])  # the middle ray has an empty range
    starts, ends = stratified_samples(t_near, t_far, 8)
    for i in range(3):
        edges = torch.linspace(float(t_near[i]), float(t_far[i]), 9)
        torch.testing.assert_close(starts[i], edges[:-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(ends[i], edges[1:], atol=1e-6, rtol=0)


def test_stratified_jitter_is_contiguous_reproducible_and_centred():
    n_rays, n = 4000, 6
    t_near = torch.full((n_rays,), 1.0)
    t_far = torch.full((n_rays,), 4.0)
    starts, ends = stratified_samples(t_near, t_far, n, torch.Generator().manual_seed(7))
    again, _ = stratified_samples(t_near, t_far, n, torch.Generator().manual_seed(7))
    assert torch.equal(starts, again)
    assert torch.equal(ends[:, :-1], starts[:, 1:])  # contiguous
    assert torch.all(starts[:, 0] == 1.0) and torch.all(ends[:, -1] == 4.0)  # exact cover
    delta = 3.0 / n
    cuts = ends[:, :-1]  # boundary k = (s_k + s_{k+1}) / 2 with s_k uniform in bin k
    lower = 1.0 + (torch.arange(n - 1) + 0.5) * delta
    assert torch.all(cuts >= lower - 1e-6) and torch.all(cuts <= lower + delta + 1e-6)
    # E[cut_k] = t_near + (k + 1)Δ; Var = Δ²/24, so the mean of 4000 draws has std Δ/310: 5σ ≈ 0.016Δ.
    torch.testing.assert_close(cuts.mean(0), 1.0 + (torch.arange(n - 1) + 1.0) * delta, atol=0.016 * delta, rtol=0)
    assert not torch.allclose(cuts, cuts[:1])  # the draws actually vary


def test_batched_segments_points_are_interval_midpoints():
    starts, ends = stratified_samples(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.5]), 4)
    segments = RaySegments.batched(starts, ends)
    origins = torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]])
    directions = torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    points = segments.points(origins, directions)
    assert points.shape == (2, 4, 3)
    torch.testing.assert_close(points[0, :, 2], 5.0 - torch.tensor([1.25, 1.75, 2.25, 2.75]))
    torch.testing.assert_close(points[1, :, 0], 1.0 + torch.tensor([2.0625, 2.1875, 2.3125, 2.4375]))
