"""The torch splat rasteriser against closed forms, a brute-force per-pixel loop, gsplat's PyTorch
reference functions (where gsplat is installed) and finite differences."""

from __future__ import annotations

import math

import pytest
import torch

from carv3d.cameras import make_cameras
from carv3d.render.rays import camera_rays
from carv3d.scene.gaussians_model import covariance, quaternion_to_rotation
from carv3d.scene.gaussians_raster import (EPS_2D, MAX_ALPHA, MIN_ALPHA, MIN_TRANSMITTANCE, camera_matrices, project,
                                           rasterize)


def one_camera(elevation=0.0, azimuth=0.0, distance=2.0, fovy=50.0, dtype=torch.float32):
    cams = make_cameras(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([distance]),
                        torch.tensor([fovy]))
    cams.c2w = cams.c2w.to(dtype)
    cams.fovy = cams.fovy.to(dtype)
    return cams


def render(means, quats, scales, opacities, colours, cams, height, width, **kwargs):
    viewmats, ks = camera_matrices(cams, height, width)
    projection = project(means, covariance(quats, scales), viewmats, ks, width, height, opacities)
    features = colours.expand(len(cams), -1, -1)
    return rasterize(projection, opacities, features, height, width, **kwargs), projection


def random_gaussians(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 0.8
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    scales = 0.03 + 0.1 * torch.rand(n, 3, generator=g, dtype=dtype)
    opacities = 0.1 + 0.85 * torch.rand(n, generator=g, dtype=dtype)
    colours = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, quats, scales, opacities, colours


def test_pixel_centres_are_the_nerf_rays():
    """A point on carv3d's ray through pixel (i, j) projects to (j + ½, i + ½): splats and the NeRF
    see the same image for the same camera."""
    cams = one_camera(elevation=20.0, azimuth=-35.0, distance=1.7, fovy=45.0)
    height, width = 12, 18
    origins, directions = camera_rays(cams, height, width)
    points = (origins + 1.3 * directions)[0].reshape(-1, 3)
    viewmats, ks = camera_matrices(cams, height, width)
    tiny = torch.eye(3).expand(points.shape[0], 3, 3) * 1e-6
    projected = project(points, tiny, viewmats, ks, width, height)
    ii, jj = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    expected = torch.stack([jj + 0.5, ii + 0.5], dim=-1).reshape(-1, 2).float()
    assert torch.allclose(projected.means2d[0], expected, atol=1e-4)
    forward = -cams.c2w[0, :3, 2]  # the camera looks down its −Z
    assert torch.allclose(projected.depths[0], 1.3 * directions[0].reshape(-1, 3) @ forward, atol=1e-5)


def test_single_isotropic_gaussian_is_its_closed_form():
    """An isotropic Gaussian (std s) at the origin seen from distance d: α(p) = o·exp(−|p − c|² / 2v),
    v = (f s / d)² + 0.3, at the image centre c (f = (H/2) / tan(fovy/2)); zero where α < 1/255."""
    height = width = 32
    distance, fovy, s, o = 2.0, 40.0, 0.05, 0.8
    cams = one_camera(distance=distance, fovy=fovy)
    colour = torch.tensor([[0.2, 0.5, 0.9]])
    (image, alpha), _ = render(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s),
                               torch.tensor([o]), colour, cams, height, width)
    f = 0.5 * height / math.tan(math.radians(fovy) / 2)
    v = (f * s / distance) ** 2 + EPS_2D
    ii, jj = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    expected = o * torch.exp(-((jj - width / 2) ** 2 + (ii - height / 2) ** 2) / (2 * v))
    expected = torch.where(expected >= MIN_ALPHA, expected, torch.zeros_like(expected))
    assert torch.allclose(alpha[0, ..., 0], expected, atol=1e-6)
    assert torch.allclose(image[0], expected[..., None] * colour, atol=1e-6)


def test_two_gaussians_composite_front_to_back_whatever_their_order():
    """On the line of sight: colour = α_n c_n + (1 − α_n) α_f c_f, opacity = 1 − (1 − α_n)(1 − α_f)."""
    height = width = 9
    cams = one_camera(distance=2.0)
    means = torch.tensor([[0.0, 0.0, 0.3], [0.0, 0.0, -0.3]])  # the first is nearer (camera on +Z)
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    scales = torch.full((2, 3), 0.1)
    opacities = torch.tensor([0.6, 0.9])
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    (image, alpha), projection = render(means, quats, scales, opacities, colours, cams, height, width)
    a_near, a_far = opacities  # at the image centre both Gaussians are at their peak
    centre = image[0, height // 2, width // 2]
    assert torch.allclose(centre, a_near * colours[0] + (1 - a_near) * a_far * colours[1], atol=1e-6)
    assert torch.allclose(alpha[0, height // 2, width // 2, 0], 1 - (1 - a_near) * (1 - a_far), atol=1e-6)
    flipped = torch.tensor([1, 0])
    (image2, alpha2), _ = render(means[flipped], quats, scales, opacities[flipped], colours[flipped], cams, height, width)
    assert torch.equal(image, image2) and torch.equal(alpha, alpha2)


def brute_force(projection, opacities, colours, height, width):
    """Per pixel, per Gaussian, in Python: gsplat's classic rasterisation loop."""
    image = torch.zeros(height, width, colours.shape[-1], dtype=torch.float64)
    acc = torch.zeros(height, width, dtype=torch.float64)
    stopped = 0
    order = torch.argsort(projection.depths[0])
    for i in range(height):
        for j in range(width):
            t = 1.0
            for k in order.tolist():
                if not (projection.radii[0, k] > 0).all():
                    continue
                dx, dy = j + 0.5 - float(projection.means2d[0, k, 0]), i + 0.5 - float(projection.means2d[0, k, 1])
                a, b, c = projection.conics[0, k].tolist()
                power = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(MAX_ALPHA, float(opacities[k]) * math.exp(-power))
                if power < 0 or alpha < MIN_ALPHA:
                    continue
                if t * (1 - alpha) <= MIN_TRANSMITTANCE:
                    stopped += 1
                    break
                image[i, j] += alpha * t * colours[k].double()
                acc[i, j] += alpha * t
                t *= 1 - alpha
    return image, acc, stopped


def test_matches_a_per_pixel_loop_with_early_stop():
    """20 overlapping Gaussians, some nearly opaque so that the 1e-4 transmittance stop matters."""
    height, width = 10, 12
    means, quats, scales, opacities, colours = random_gaussians(20, seed=3)
    means[:6] = means[:6] * 0.2  # near the line of sight, large and nearly opaque
    scales[:6] = 0.2
    opacities[:6] = 0.995
    cams = one_camera(elevation=15.0, azimuth=30.0, distance=1.6)
    (image, alpha), projection = render(means, quats, scales, opacities, colours, cams, height, width)
    ref_image, ref_alpha, stopped = brute_force(projection, opacities, colours, height, width)
    assert torch.allclose(image[0].double(), ref_image, atol=2e-6)
    assert torch.allclose(alpha[0, ..., 0].double(), ref_alpha, atol=2e-6)
    assert stopped >= 4  # the early stop was reached at some pixels


def test_tiles_and_chunks_only_cull():
    """The tile size and the pair budget change nothing (outside its box a Gaussian's α < 1/255)."""
    means, quats, scales, opacities, colours = random_gaussians(60, seed=1)
    cams = make_cameras(torch.tensor([10.0, 50.0]), torch.tensor([0.0, 140.0]), torch.tensor([1.5, 1.8]),
                        torch.tensor([50.0, 40.0]))
    (ref, ref_alpha), _ = render(means, quats, scales, opacities, colours, cams, 21, 27, tile=32)
    for kwargs in ({"tile": 4}, {"tile": 8, "max_pairs": 500}, {"tile": 16}):
        (image, alpha), _ = render(means, quats, scales, opacities, colours, cams, 21, 27, **kwargs)
        assert torch.allclose(image, ref, atol=1e-6) and torch.allclose(alpha, ref_alpha, atol=1e-6), kwargs


def test_gradients_match_finite_differences():
    """torch.autograd.gradcheck in float64 through projection and compositing (3 Gaussians, 7 × 6 px)."""
    means, quats, scales, opacities, colours = random_gaussians(3, seed=5, dtype=torch.float64)
    means = means * 0.5
    scales = scales + 0.05
    opacities = opacities.clamp(max=0.8)
    cams = one_camera(elevation=10.0, azimuth=20.0, distance=1.2, dtype=torch.float64)

    def images(means, log_scales, quats, opacity_logits, colours):
        (image, alpha), _ = render(means, quats, log_scales.exp(), torch.sigmoid(opacity_logits), colours, cams, 7, 6)
        return image, alpha

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, scales.log(), quats,
                                                            torch.logit(opacities), colours))
    assert torch.autograd.gradcheck(images, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_projection_and_covariance_match_gsplat_reference():
    """gsplat's own PyTorch projection (``gsplat.cuda._torch_impl``) gives the same 2D means, conics,
    depths and radii."""
    torch_impl = pytest.importorskip("gsplat.cuda._torch_impl")
    means, quats, scales, opacities, _ = random_gaussians(40, seed=2)
    cams = make_cameras(torch.tensor([5.0, 60.0]), torch.tensor([-20.0, 100.0]), torch.tensor([1.4, 2.0]),
                        torch.tensor([50.0, 35.0]))
    height, width = 24, 30
    viewmats, ks = camera_matrices(cams, height, width)
    ours = covariance(quats, scales)
    theirs, _ = torch_impl._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    assert torch.allclose(ours, theirs, atol=1e-7)
    radii, means2d, depths, conics, _ = torch_impl._fully_fused_projection(means, theirs, viewmats, ks, width, height)
    projection = project(means, ours, viewmats, ks, width, height)
    assert torch.allclose(projection.means2d, means2d, atol=1e-4)
    assert torch.allclose(projection.conics, conics, rtol=1e-4, atol=1e-6)
    assert torch.allclose(projection.depths, depths)
    assert torch.equal(projection.radii, radii.to(torch.int32))
    assert torch.allclose(quaternion_to_rotation(quats), torch_impl._quat_to_rotmat(quats), atol=1e-7)
