"""Volume rendering against closed forms: a constant-density box, a thin slab, a dense sphere.

Reference quantities are computed here independently of the renderer (numpy float64 slab
lengths, explicit loops, formulas for exponential media).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from carv3d.config import Config
from carv3d.errors import BackendUnavailableError, UserError
from carv3d.log import logger
from carv3d.render.background import Background
from carv3d.cameras import orbit_cameras
from carv3d.render.compositing import compute_weights
from carv3d.render.occupancy import OccupancyGridSampler
from carv3d.render.renderer import VolumeRenderer, select_sampler
from carv3d.render.sampling import RaySegments
from carv3d.render.shading import sample_light_directions, shade

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---------------------------------------------------------------- analytic fields


class ConstantBox(nn.Module):
    """σ inside [−a, a]³ (0 outside), constant albedo; normals of the nearest face."""

    def __init__(self, sigma: float, half_side: float, radius: float = 1.0, dtype=torch.float32):
        super().__init__()
        self.radius = radius
        self.half_side = half_side
        self.sigma = nn.Parameter(torch.tensor(sigma, dtype=dtype))
        self.colour = nn.Parameter(torch.tensor([0.2, 0.5, 0.9], dtype=dtype))

    def density(self, x):
        return self.sigma * (x.abs().amax(dim=-1) <= self.half_side).to(x.dtype)

    def forward(self, x):
        return self.density(x), self.colour.expand(x.shape[0], 3)

    def normals(self, x):
        axis = x.abs().argmax(dim=-1, keepdim=True)
        return torch.zeros_like(x).scatter(-1, axis, torch.sign(x.gather(-1, axis)))


class Slab(nn.Module):
    """σ for |z − z0| ≤ h, anywhere in the box."""

    radius = 1.0

    def __init__(self, sigma: float, z0: float, h: float):
        super().__init__()
        self.sigma, self.z0, self.h = sigma, z0, h

    def density(self, x):
        return self.sigma * ((x[:, 2] - self.z0).abs() <= self.h).float()

    def forward(self, x):
        return self.density(x), torch.ones_like(x)

    def normals(self, x):
        return torch.tensor([0.0, 0.0, 1.0]).expand_as(x)


class Sphere(nn.Module):
    """A dense ball of radius ρ; normals outward (or inward with ``flip``)."""

    radius = 1.0

    def __init__(self, sigma: float = 400.0, rho: float = 0.5, flip: bool = False):
        super().__init__()
        self.sigma, self.rho, self.flip = sigma, rho, flip

    def density(self, x):
        return self.sigma * (x.norm(dim=-1) <= self.rho).float()

    def forward(self, x):
        return self.density(x), 0.5 + 0.5 * torch.tanh(x)

    def normals(self, x):
        n = torch.nn.functional.normalize(x, dim=-1)
        return -n if self.flip else n


def _renderer(**kwargs) -> VolumeRenderer:
    kwargs.setdefault("background", "white")
    return VolumeRenderer(1.0, **kwargs)


def _random_rays(n: int, seed: int, dtype=torch.float32):
    rng = np.random.default_rng(seed)
    origins = rng.normal(size=(n, 3))
    origins = 2.5 * origins / np.linalg.norm(origins, axis=-1, keepdims=True)
    targets = rng.uniform(-1.4, 1.4, size=(n, 3))  # some rays miss the box
    directions = targets - origins
    directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
    return origins, directions, torch.tensor(origins, dtype=dtype), torch.tensor(directions, dtype=dtype)


def _chord_length(o: np.ndarray, d: np.ndarray, a: float, near: float) -> np.ndarray:
    """Length of {t ≥ near : |o + t d|_∞ ≤ a}, float64: per axis the solution set of
    |o_k + t d_k| ≤ a is an interval; intersect the three and [near, ∞)."""
    lengths = np.zeros(len(o))
    for i in range(len(o)):
        lo, hi = near, np.inf
        for k in range(3):
            if d[i, k] == 0.0:
                if abs(o[i, k]) > a:
                    lo, hi = 1.0, 0.0
                continue
            ends = sorted(((-a - o[i, k]) / d[i, k], (a - o[i, k]) / d[i, k]))
            lo, hi = max(lo, ends[0]), min(hi, ends[1])
        lengths[i] = max(0.0, hi - lo)
    return lengths


# ---------------------------------------------------------------- compositing


def test_weights_match_explicit_loop_and_sum_to_opacity():
    g = torch.Generator().manual_seed(0)
    sigmas = 3.0 * torch.rand(5, 12, generator=g, dtype=torch.float64)
    deltas = 0.2 * torch.rand(5, 12, generator=g, dtype=torch.float64)
    t_ends = torch.cumsum(deltas, dim=-1)
    segments = RaySegments.batched(t_ends - deltas, t_ends)
    weights, trans, alphas = compute_weights(segments, sigmas, 5)
    for r in range(5):
        optical_depth = 0.0
        for i in range(12):
            expected = math.exp(-optical_depth) * (1.0 - math.exp(-float(sigmas[r, i] * deltas[r, i])))
            assert float(weights[r, i]) == pytest.approx(expected, rel=1e-12, abs=1e-15)
            optical_depth += float(sigmas[r, i] * deltas[r, i])
        assert float(weights[r].sum()) == pytest.approx(1.0 - math.exp(-optical_depth), rel=1e-12)


# ---------------------------------------------------------------- closed forms through the renderer


def test_constant_box_filling_the_scene_gives_exact_opacity():
    sigma, near = 2.0, 0.05
    o_np, d_np, origins, directions = _random_rays(300, seed=1)
    lengths = _chord_length(o_np, d_np, 1.0, near)
    assert 30 < (lengths == 0).sum() < 200  # hits and misses
    field = ConstantBox(sigma, half_side=1.0)
    out = _renderer(samples_per_ray=16, near=near).render_rays(field, origins, directions)
    expected = 1.0 - np.exp(-sigma * lengths)
    # The intervals tile the clipped chord exactly and every midpoint is inside: exact up to float32.
    np.testing.assert_allclose(out.opacity[:, 0].detach().numpy(), expected, atol=2e-6)
    torch.testing.assert_close(out.rgb, out.opacity * field.colour.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", [None, 5])
def test_constant_box_inside_the_scene_matches_closed_form_within_quadrature_bound(seed):
    sigma, a, near, n_samples = 3.0, 0.6, 0.05, 128
    o_np, d_np, origins, directions = _random_rays(300, seed=2)
    lengths = _chord_length(o_np, d_np, a, near)
    scene = _chord_length(o_np, d_np, 1.0, near)  # the range the samples cover
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = _renderer(samples_per_ray=n_samples, near=near).render_rays(
        ConstantBox(sigma, half_side=a), origins, directions, generator=generator
    )
    expected = 1.0 - np.exp(-sigma * lengths)
    # Midpoint rule: only the (at most two) intervals that straddle a face of the inner box are
    # wrong, each by at most σ·δ/2 in optical depth, and |d opacity / d depth| ≤ 1. Intervals are
    # Δ = range/n wide without jitter and at most 2Δ with it.
    width = scene / n_samples * (1.0 if seed is None else 2.0)
    bound = sigma * width + 1e-5
    error = np.abs(out.opacity[:, 0].detach().numpy() - expected)
    assert np.all(error <= bound), float((error - bound).max())
    assert error.mean() < 0.25 * bound.mean()  # and typically much smaller than the bound


def test_thin_slab_depth_matches_exponential_medium():
    sigma, z0, h, n_samples = 50.0, 0.3, 0.05, 512
    origins = torch.tensor([[0.0, 0.0, 3.0], [0.2, -0.1, 3.0], [-0.3, 0.4, 3.0]])
    directions = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, -1.0], [0.1, 0.05, -1.0], [0.2, -0.3, -1.0]]), dim=-1)
    out = _renderer(samples_per_ray=n_samples).render_rays(Slab(sigma, z0, h), origins, directions)
    for i in range(3):
        cos = -float(directions[i, 2])
        t_a = (3.0 - (z0 + h)) / cos  # where the ray enters the slab
        length = 2 * h / cos
        tau = sigma * length
        # Mean termination distance of an exponential medium of length L, given termination:
        # E[t | t < t_a + L] = t_a + 1/σ − L e^{−σL} / (1 − e^{−σL}).
        expected_depth = t_a + 1 / sigma - length * math.exp(-tau) / (1 - math.exp(-tau))
        delta = _chord_length(origins[i : i + 1].double().numpy(), directions[i : i + 1].double().numpy(), 1.0, 0.05)[0] / n_samples
        assert float(out.depth[i]) == pytest.approx(expected_depth, abs=delta)
        assert float(out.opacity[i]) == pytest.approx(1 - math.exp(-tau), abs=sigma * delta)


def test_opacity_gradient_matches_finite_differences_and_closed_form():
    sigma, near = 1.3, 0.05
    o_np, d_np, origins, directions = _random_rays(40, seed=3, dtype=torch.float64)
    lengths = _chord_length(o_np, d_np, 1.0, near)
    coefficients = torch.linspace(0.5, 1.5, 40, dtype=torch.float64)
    field = ConstantBox(sigma, half_side=1.0, dtype=torch.float64)
    renderer = _renderer(samples_per_ray=8, near=near)

    def objective() -> torch.Tensor:
        return (coefficients * renderer.render_rays(field, origins, directions).opacity[:, 0]).sum()

    field.zero_grad()
    objective().backward()
    autograd = float(field.sigma.grad)
    eps = 1e-6
    with torch.no_grad():
        field.sigma += eps
        up = float(objective())
        field.sigma -= 2 * eps
        down = float(objective())
        field.sigma += eps
    finite_difference = (up - down) / (2 * eps)
    closed_form = float((coefficients.numpy() * lengths * np.exp(-sigma * lengths)).sum())  # d/dσ (1 − e^{−σL})
    assert autograd == pytest.approx(finite_difference, rel=1e-7)
    assert autograd == pytest.approx(closed_form, rel=1e-9)


def test_rgb_gradient_reaches_albedo_through_forward():
    field = ConstantBox(4.0, half_side=0.5)
    renderer = _renderer(samples_per_ray=32)
    out = renderer(field, orbit_cameras(2, distance=2.0), height=12, width=12)
    out.rgb[:, 1].sum().backward()  # d/dc_g of Σ (c_g·A + (1 − A)·1) = Σ A
    expected = float(out.opacity.detach().sum())
    assert expected > 10
    assert float(field.colour.grad[1]) == pytest.approx(expected, rel=1e-5)
    assert float(field.colour.grad[0]) == 0.0 and float(field.sigma.grad) != 0.0


def test_dense_sphere_normals_and_orientation_penalty():
    rho = 0.5
    b = torch.tensor([0.0, 0.1, 0.25, 0.4])  # impact parameters
    origins = torch.stack([b, torch.zeros(4), torch.full((4,), 2.0)], dim=-1)
    directions = torch.tensor([0.0, 0.0, -1.0]).expand(4, 3)
    renderer = _renderer(samples_per_ray=512)
    outward = renderer.render_rays(Sphere(rho=rho), origins, directions, need_normals=True)
    inward = renderer.render_rays(Sphere(rho=rho, flip=True), origins, directions, need_normals=True)
    torch.testing.assert_close(outward.opacity[:, 0], torch.ones(4), atol=1e-3, rtol=0)
    # The weight concentrates at the entry point, whose outward normal is (b, 0, √(ρ² − b²)) / ρ.
    entry_normal = torch.stack([b, torch.zeros(4), (rho**2 - b**2).sqrt()], dim=-1) / rho
    torch.testing.assert_close(outward.normal, entry_normal, atol=0.02, rtol=0)
    assert torch.all(outward.orientation == 0)  # visible normals face the camera: no penalty
    # Inward normals face away: penalty Σ w (n·d)² ≈ (n_z)² = 1 − b²/ρ².
    torch.testing.assert_close(inward.orientation[:, 0], 1 - b**2 / rho**2, atol=0.02, rtol=0)


def test_depth_of_dense_sphere_from_orbit_camera():
    renderer = _renderer(samples_per_ray=256)
    out = renderer(Sphere(), orbit_cameras(1, distance=2.0, elevation_deg=30.0), height=9, width=9)
    # The centre pixel looks at the origin: the surface is at distance 2 − ρ.
    assert float(out.depth[0, 0, 4, 4]) == pytest.approx(1.5, abs=2 * math.sqrt(3) / 256)
    assert float(out.opacity[0, 0, 0, 0]) == 0.0 and float(out.depth[0, 0, 0, 0]) == 0.0
    torch.testing.assert_close(out.rgb[0, :, 0, 0], torch.ones(3))  # white background where empty


def test_chunked_render_equals_unchunked():
    renderer = _renderer(samples_per_ray=32)
    cameras = orbit_cameras(2, distance=1.8)
    whole = renderer(Sphere(), cameras, shading="lambertian", height=10, width=10)
    chunked = renderer(Sphere(), cameras, shading="lambertian", height=10, width=10, chunk_rays=37)
    for name in ("rgb", "opacity", "depth", "normal", "orientation"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-6, rtol=0)
    assert whole.rgb.shape == (2, 3, 10, 10) and whole.normal.shape == (2, 3, 10, 10)


@pytest.mark.parametrize("shading", ["lambertian", "textureless", "albedo"])
def test_albedo_beside_a_shaded_render_equals_a_separate_albedo_render(shading):
    """``need_albedo`` gives the albedo image of the same samples: a second, albedo-shaded render
    (deterministic, generator None) must agree, over the same background, and the shaded image must
    be the one a render without the flag gives."""
    renderer = _renderer(samples_per_ray=24)
    cameras = orbit_cameras(3, distance=1.8, elevation_deg=20.0)
    both = renderer(Sphere(), cameras, shading=shading, height=9, width=9, need_albedo=True, chunk_rays=50)
    albedo = renderer(Sphere(), cameras, shading="albedo", height=9, width=9)
    shaded = renderer(Sphere(), cameras, shading=shading, height=9, width=9)
    torch.testing.assert_close(both.albedo, albedo.rgb, atol=1e-6, rtol=0)
    torch.testing.assert_close(both.rgb, shaded.rgb, atol=1e-6, rtol=0)
    if shading != "albedo":  # the shaded image differs from the albedo where the surface is lit obliquely
        assert float((both.rgb - both.albedo).abs().max()) > 0.05
    assert shaded.albedo is None  # only on request


def test_render_is_reproducible_with_a_seeded_generator():
    renderer = _renderer(samples_per_ray=16, background="random", shading="random")
    cameras = orbit_cameras(2, distance=1.8)
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(11)
        mode = renderer.sample_shading(g)
        outs.append(renderer(ConstantBox(3.0, 0.4), cameras, g, shading=mode, height=8, width=8).rgb)
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------- shading and light


def test_shading_formulas_on_hand_built_normals():
    ambient = 0.2
    albedo = torch.tensor([[0.5, 0.25, 1.0]]).expand(4, 3)
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    theta = math.radians(60)
    light = torch.tensor([0.0, math.sin(theta), math.cos(theta)]).expand(4, 3)
    diffuse = torch.tensor([math.cos(theta), math.cos(theta), 0.0, 0.0])  # max(0, n·l)
    factor = (ambient + (1 - ambient) * diffuse).unsqueeze(-1)
    torch.testing.assert_close(shade(albedo, normals, light, "lambertian", ambient), albedo * factor)
    torch.testing.assert_close(shade(albedo, normals, light, "textureless", ambient), factor.expand(4, 3))
    assert shade(albedo, None, None, "albedo", ambient) is albedo
    assert float(shade(albedo, normals, light, "lambertian", ambient)[2, 0]) == pytest.approx(0.5 * ambient)


def test_light_directions_sit_near_the_camera():
    positions = torch.tensor([[0.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(sample_light_directions(positions, 0.5), torch.nn.functional.normalize(positions, dim=-1))
    many = positions.repeat(4000, 1)
    lights = sample_light_directions(many, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(lights.norm(dim=-1), torch.ones(8000))
    again = sample_light_directions(many, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(lights, again)
    # The offset is isotropic, so the mean light direction is the camera direction.
    mean_dir = torch.nn.functional.normalize(lights.view(4000, 2, 3).mean(0), dim=-1)
    torch.testing.assert_close(mean_dir, torch.nn.functional.normalize(positions, dim=-1), atol=0.02, rtol=0)
    assert float((lights.view(4000, 2, 3) * torch.nn.functional.normalize(positions, dim=-1)).sum(-1).min()) < 0.9


# ---------------------------------------------------------------- backgrounds


def test_random_background_is_one_seeded_colour_per_image():
    directions = torch.nn.functional.normalize(torch.randn(3, 5, 6, 3), dim=-1)
    background = Background("random")
    colours = background(directions, torch.Generator().manual_seed(4))
    reference = torch.rand((3, 3), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(colours, reference[:, None, None, :].expand(3, 5, 6, 3))
    assert torch.equal(background(directions), torch.ones_like(directions))  # no generator: white
    assert torch.equal(Background("white")(directions, torch.Generator()), torch.ones_like(directions))
    assert list(Background("random").parameters()) == []


def test_renderer_composites_the_random_background_where_empty():
    renderer = _renderer(samples_per_ray=16, background="random")
    out = renderer(Sphere(rho=0.3), orbit_cameras(2, distance=2.0), torch.Generator().manual_seed(9), height=8, width=8)
    colours = torch.rand((2, 3), generator=torch.Generator().manual_seed(9))  # drawn first in the render
    torch.testing.assert_close(out.rgb[:, :, 0, 0], colours)
    torch.testing.assert_close(out.background[:, :, 3, 5], colours)


def test_learned_background_gets_gradients_and_learns_a_colour():
    background = Background("learned")
    directions = torch.nn.functional.normalize(torch.randn(2, 64, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    target = torch.tensor([0.9, 0.2, 0.4])
    values = background(directions)
    loss = ((values - target) ** 2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in background.parameters())
    # Output bias b_k: ∂L/∂b_k = mean over rays of 2 (v_k − t_k) · v_k (1 − v_k) / 3  (sigmoid' = v(1 − v)).
    v = values.detach()
    expected = (2 * (v - target) * v * (1 - v)).sum(dim=(0, 1)) / v.numel()
    torch.testing.assert_close(background.mlp[-1].bias.grad, expected, atol=1e-7, rtol=1e-5)
    initial = loss.item()
    for _ in range(25):  # plain gradient descent: the parameters are trainable
        background.zero_grad()
        loss = ((background(directions) - target) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            for p in background.parameters():
                p -= 2.0 * p.grad
    assert loss.item() < 0.2 * initial
    values = background(directions).detach()
    assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0


# ---------------------------------------------------------------- sampler choice and shading draws


def _render_cfg(**overrides):
    cfg = OmegaConf.structured(Config).render
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_select_sampler_decides_from_the_device():
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        assert select_sampler(_render_cfg(sampler="auto"), "cpu") == "stratified"
        assert select_sampler(_render_cfg(sampler="auto"), torch.device("cuda:0")) == "occupancy_grid"
        assert select_sampler(_render_cfg(sampler="stratified"), "cuda") == "stratified"
        assert select_sampler(_render_cfg(sampler="occupancy_grid"), "cuda") == "occupancy_grid"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert any("stratified" in m and "not CUDA" in m for m in messages)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device") as info:
        select_sampler(_render_cfg(sampler="occupancy_grid"), "cpu")
    assert isinstance(info.value, UserError)
    with pytest.raises(BackendUnavailableError):
        VolumeRenderer.from_config(_render_cfg(sampler="occupancy_grid"), 1.0, "cpu")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        OccupancyGridSampler(1.0, 32, 0.01, 16, 0.01, 0.05, device="cpu")


def test_from_config_on_cpu_is_stratified_with_config_values():
    cfg = _render_cfg(sampler="auto", samples_per_ray=24, background="learned", width=20, height=10)
    renderer = VolumeRenderer.from_config(cfg, 1.0, "cpu")
    assert renderer.sampler == "stratified" and renderer.occupancy is None
    assert (renderer.samples_per_ray, renderer.width, renderer.height) == (24, 20, 10)
    assert len(list(renderer.background.parameters())) == 4
    assert renderer(Sphere(), orbit_cameras(1)).rgb.shape == (1, 3, 10, 20)


def test_sample_shading_frequencies():
    renderer = _renderer(shading="random", albedo_probability=0.4)
    g = torch.Generator().manual_seed(0)
    draws = [renderer.sample_shading(g) for _ in range(4000)]
    n = len(draws)
    # Binomial counts: 4 standard deviations is a false alarm rate of about 1e-4 per mode.
    for mode, p in (("albedo", 0.4), ("lambertian", 0.3), ("textureless", 0.3)):
        assert abs(draws.count(mode) - n * p) < 4 * math.sqrt(n * p * (1 - p)), mode
    assert _renderer(shading="textureless").sample_shading(g) == "textureless"


# ---------------------------------------------------------------- occupancy grid (CUDA)


def renderer_step(n_samples: int) -> float:
    return 2 * math.sqrt(3) / n_samples  # the box diagonal over the sample count


def _occupancy_renderer(n_samples: int = 256, resolution: int = 64) -> VolumeRenderer:
    step = renderer_step(n_samples)
    occupancy = OccupancyGridSampler(1.0, resolution, 0.01, 16, step, 0.05, device="cuda")
    return VolumeRenderer(1.0, sampler="occupancy_grid", samples_per_ray=n_samples, occupancy=occupancy).cuda()


@pytest.mark.gpu
@gpu
def test_occupancy_grid_marks_exactly_the_cells_of_an_aligned_box():
    renderer = _occupancy_renderer(resolution=64)
    field = ConstantBox(5.0, half_side=0.5).cuda()  # faces on cell boundaries: 32³ of 64³ cells
    renderer.train()
    renderer.update_occupancy(field, step=0)
    assert renderer.occupancy.occupied_fraction() == pytest.approx(1 / 8)
    renderer.update_occupancy(field, step=1)  # not a multiple of update_every: no update
    assert int(renderer.occupancy.n_updates) == 1


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed", [None, 3])
def test_occupancy_grid_opacity_matches_stratified_and_closed_form(seed):
    sigma, a, near, n_samples = 5.0, 0.5, 0.05, 256
    o_np, d_np, origins, directions = _random_rays(2000, seed=4)
    lengths = _chord_length(o_np, d_np, a, near)
    field = ConstantBox(sigma, half_side=a).cuda()
    renderer = _occupancy_renderer(n_samples)
    renderer.occupancy.initialize_if_needed(field)
    generator = None if seed is None else torch.Generator(device="cuda").manual_seed(seed)
    packed = renderer.render_rays(field, origins.cuda(), directions.cuda(), generator=generator)
    stratified = _renderer(samples_per_ray=n_samples, near=near).cuda().render_rays(field, origins.cuda(), directions.cuda())
    expected = 1.0 - np.exp(-sigma * lengths)
    step = renderer.render_step_size
    # Fixed-length steps on a lattice: each of the two face crossings is resolved to one step Δt,
    # an optical-depth error of at most σΔt per crossing (|d opacity / d depth| ≤ 1). The early
    # stop (transmittance < 1e-4) adds at most 1e-4.
    error = np.abs(packed.opacity[:, 0].detach().cpu().numpy() - expected)
    assert np.all(error <= 2 * sigma * step + 1e-4), float(error.max())
    assert error.mean() < 0.5 * sigma * step
    gap = (packed.opacity - stratified.opacity).detach().abs()
    assert float(gap.mean()) < sigma * step
    assert (lengths == 0).sum() > 100 and float(packed.opacity.detach().cpu()[torch.tensor(lengths == 0)].abs().max()) == 0.0


@pytest.mark.gpu
@gpu
def test_occupancy_grid_render_is_differentiable_and_agrees_with_stratified():
    field = ConstantBox(5.0, half_side=0.5).cuda()
    cameras = orbit_cameras(2, distance=2.0, device="cuda")
    packed = _occupancy_renderer(256)(field, cameras, shading="lambertian", height=24, width=24)
    stratified = _renderer(samples_per_ray=256).cuda()(field, cameras, shading="lambertian", height=24, width=24)
    packed.opacity.sum().backward()
    packed_grad = float(field.sigma.grad)
    field.zero_grad()
    stratified.opacity.sum().backward()
    assert packed_grad == pytest.approx(float(field.sigma.grad), rel=0.05)
    assert float((packed.rgb - stratified.rgb).detach().abs().mean()) < 0.02
    solid = (packed.opacity > 0.5) & (stratified.opacity > 0.5)  # rims: a step decides whether a ray hits
    assert int(solid.sum()) > 100
    assert float((packed.depth - stratified.depth).detach()[solid].abs().max()) < 2 * renderer_step(256)
