"""``scene.type: gaussians`` behind the seam: its field, its RenderOutput, training, exact resume with
densification, export (splat PLY and mesh) and the backend choice."""

from __future__ import annotations

import math

import pytest
import torch

from carv3d.cameras import make_cameras
from carv3d.checkpoint import latest_checkpoint, load_checkpoint
from carv3d.config import load_config
from carv3d.errors import BackendUnavailableError, ConfigError
from carv3d.scene import build_scene
from carv3d.scene.gaussians_field import GaussianField
from carv3d.scene.gaussians_model import Gaussians
from carv3d.scene.gaussians_ply import read_splats


def scene_config(*extra):
    return load_config(overrides=["scene.type=gaussians", "scene.n_points=50", "render.width=16",
                                  "render.height=16", *extra])


def set_gaussians(scene, means, scales, opacities, colours=None, quats=None):
    n = means.shape[0]
    g = Gaussians(n)
    with torch.no_grad():
        g.means.copy_(means)
        g.log_scales.copy_(scales.log())
        g.quats.copy_(quats if quats is not None else torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4))
        g.opacity_logits.copy_(torch.logit(opacities))
        if colours is not None:
            g.sh_dc.copy_(((colours - 0.5) / 0.28209479177387814)[:, None, :])
    scene.gaussians = g
    scene.grad_accum, scene.grad_count = torch.zeros(n), torch.zeros(n)
    return g


def test_field_density_has_the_splats_opacity_along_a_ray():
    """∫ σ dt through the centre of an isotropic Gaussian is −ln(1 − o): a volume render of the field
    has the splat's own opacity; the density is κ·G(x) with κ = −ln(1 − o) / (√(2π) s)."""
    s, o = 0.1, 0.7
    g = Gaussians(1)
    with torch.no_grad():
        g.log_scales.fill_(math.log(s))
        g.quats[:, 0] = 1.0
        g.opacity_logits.fill_(math.log(o / (1 - o)))
    field = GaussianField(lambda: g, radius=1.0)
    t = torch.linspace(-0.3, 0.3, 6001)  # ±3σ: the field's own cut-off
    line = torch.stack([t, torch.zeros_like(t), torch.zeros_like(t)], dim=-1)
    density = field.density(line)
    kappa = -math.log(1 - o) / (math.sqrt(2 * math.pi) * s)
    inner = t.abs() < 0.2999  # the cut-off itself is at ±3σ up to rounding
    assert torch.allclose(density[inner], kappa * torch.exp(-0.5 * (t[inner] / s) ** 2), rtol=1e-5, atol=1e-7)
    optical_depth = torch.trapezoid(density.detach(), t)
    erf3 = math.erf(3 / math.sqrt(2))  # the fraction of the integral inside ±3σ
    assert math.isclose(float(optical_depth), -math.log(1 - o) * erf3, rel_tol=1e-4)
    assert float(field.density(torch.tensor([[0.35, 0.0, 0.0], [2.0, 0.0, 0.0]])).detach().abs().max()) == 0.0


def test_field_blocks_only_cull(monkeypatch):
    """Blocks of space change nothing: one block (every Gaussian against every point) gives the same
    density and albedo, and so does a brute-force sum of κ·G over the 3σ ellipsoids."""
    import carv3d.scene.gaussians_field as gf

    g = Gaussians.in_ball(150, 0.5, 0.3, 0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        g.quats.copy_(torch.randn(150, 4, generator=torch.Generator().manual_seed(1)))
        g.log_scales.add_(0.3 * torch.randn(150, 3, generator=torch.Generator().manual_seed(2)))
    field = GaussianField(lambda: g, radius=1.0)
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(3)) * 1.4 - 0.7
    with torch.no_grad():
        sigma, albedo = field(x)
        monkeypatch.setattr(gf, "MIN_BLOCKS_PER_AXIS", 1)
        monkeypatch.setattr(gf, "MAX_BLOCKS_PER_AXIS", 1)
        sigma_one, albedo_one = field(x)
        d = x[:, None, :] - g.means[None]
        m2 = torch.einsum("pmi,mij,pmj->pm", d, gf.precision(g.quats, g.scales()), d)
        kappa = -torch.log1p(-g.opacities()) / (math.sqrt(2 * math.pi) * g.scales().prod(-1) ** (1 / 3))
        brute = torch.where(m2 <= 9.0, kappa * torch.exp(-0.5 * m2), torch.zeros_like(m2)).sum(-1)
    assert (sigma > 0).float().mean() > 0.3
    scale = float(sigma.max())
    assert torch.allclose(sigma, sigma_one, atol=1e-5 * scale) and torch.allclose(albedo, albedo_one, atol=1e-5)
    near_edge = ((m2 - 9.0).abs() < 1e-3).any(-1)  # float rounding may put a pair on either side of the cut
    assert torch.allclose(sigma[~near_edge], brute[~near_edge], atol=1e-5 * scale)


def test_field_albedo_is_the_density_weighted_colour():
    g = Gaussians(2)
    with torch.no_grad():
        g.means.copy_(torch.tensor([[-0.05, 0.0, 0.0], [0.05, 0.0, 0.0]]))
        g.log_scales.fill_(math.log(0.1))
        g.quats[:, 0] = 1.0
        g.opacity_logits.copy_(torch.logit(torch.tensor([0.5, 0.9])))
        g.sh_dc.copy_(((torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) - 0.5) / 0.28209479177387814)[:, None])
    field = GaussianField(lambda: g, radius=1.0)
    x = torch.tensor([[0.02, 0.01, -0.03]])
    sigma, albedo = field(x)
    kappa = -torch.log1p(-torch.tensor([0.5, 0.9])) / (math.sqrt(2 * math.pi) * 0.1)
    w = kappa * torch.exp(-0.5 * ((x - g.means.detach()) ** 2).sum(-1) / 0.01)
    assert torch.allclose(sigma, w.sum(), rtol=1e-5)
    assert torch.allclose(albedo[0], torch.stack([w[0], torch.tensor(0.0), w[1]]) / w.sum(), atol=1e-5)


def test_render_output_depth_normals_and_background():
    """One flat, nearly opaque Gaussian facing the camera: depth is its distance, the normal its thin
    axis turned towards the camera, the background shows where it does not cover."""
    cfg = scene_config("render.background=white")
    scene = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
    set_gaussians(scene, torch.tensor([[0.0, 0.0, 0.2]]), torch.tensor([[0.2, 0.2, 0.01]]), torch.tensor([0.95]),
                  torch.tensor([[0.2, 0.4, 0.6]]))
    for azimuth, facing in ((0.0, 1.0), (180.0, -1.0)):
        cams = make_cameras(torch.tensor([0.0]), torch.tensor([azimuth]), torch.tensor([2.0]), torch.tensor([40.0]))
        with torch.no_grad():
            out = scene.render(cams, shading="albedo", need_normals=True, height=15, width=15)  # pixel 7: the centre
        centre = (0, slice(None), 7, 7)
        assert math.isclose(float(out.opacity[0, 0, 7, 7]), 0.95, rel_tol=1e-5)
        assert math.isclose(float(out.depth[0, 0, 7, 7]), 2.0 - 0.2 * facing, rel_tol=1e-5)
        assert torch.allclose(out.normal[centre] / out.opacity[0, 0, 7, 7], torch.tensor([0.0, 0.0, facing]), atol=1e-5)
        expected = 0.95 * torch.tensor([0.2, 0.4, 0.6]) + 0.05 * torch.ones(3)
        assert torch.allclose(out.rgb[centre], expected, atol=2e-3)
        assert torch.equal(out.rgb[0, :, 0, 0], torch.ones(3))  # a corner sees only the white background
        assert out.orientation is None
    with torch.no_grad():
        lit = scene.render(cams, shading="textureless", height=15, width=15)  # a headlight on a facing disc: light 1
    assert math.isclose(float(lit.rgb[0, 0, 7, 7]), 1.0, abs_tol=1e-4)


def test_backend_choice_and_config_errors():
    cfg = scene_config("scene.rasterizer=gsplat")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
    with pytest.raises(ConfigError, match="scene.rasterizer"):
        scene_config("scene.rasterizer=inria")
    with pytest.raises(ConfigError, match="scene.density.every"):
        scene_config("scene.density.every=0")
    with pytest.raises(ConfigError, match="unknown config key 'scene.grid"):
        scene_config("scene.grid.n_levels=4")  # a NeRF key
    assert build_scene(scene_config().scene, scene_config().render, torch.device("cpu"), 0).backends == {
        "rasterizer": "torch"}


def gaussian_overrides(teacher_path, out_dir, steps, name, **extra):
    overrides = {
        "teacher.pretrained": str(teacher_path),
        "scene.type": "gaussians",
        "scene.n_points": 60,
        "scene.density.every": 2,
        "scene.density.grad_threshold": 1e-7,  # the tiny random teacher's gradients are small: grow anyway
        "scene.density.opacity_reset_every": 3,
        "scene.density.opacity_reset_margin": 0,  # the reset at 3 happens however short the run
        "scene.density.stop": 4,  # densify at 2 and 4, reset at 3: both sides of the checkpoint at 3
        "scene.density.max_gaussians": 400,
        "scene.lr.position_decay_steps": 4,
        "render.width": 16,
        "render.height": 16,
        "render.shading": "random",
        "render.background": "learned",
        "estimator.noise_draws": 1,
        "estimator.upstream_samples": 2,
        "camera.stratified": True,
        "export.resolution": 16,
        "export.threshold": 0.01,  # the opacity reset at step 3 leaves faint Gaussians
        "export.texture_size": 0,
        "train.steps": steps,
        "train.val_every": 0,
        "train.checkpoint_every": 3,
        "train.log_every": 1,
        "train.turntable_frames": 0,
        "train.val_resolution": 16,
        "train.output_dir": str(out_dir),
        "train.run_name": name,
        "train.progress": False,
        "train.tensorboard": False,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def test_resume_with_densification_is_bit_identical_and_exports(tiny_pixel_path, tmp_path):
    from carv3d.saved_scene import load_scene
    from carv3d.train import resume, train

    full = train(load_config(overrides=gaussian_overrides(tiny_pixel_path, tmp_path, 6, "full"), prompt="a red cube"))
    half = train(load_config(overrides=gaussian_overrides(tiny_pixel_path, tmp_path, 3, "half",
                                                          **{"export.at_end": False}), prompt="a red cube"))
    assert load_checkpoint(latest_checkpoint(half))["scene"]["gaussians.means"].shape[0] != 60  # it densified
    resume(half, ["train.steps=6"])
    a, b = load_checkpoint(latest_checkpoint(full)), load_checkpoint(latest_checkpoint(half))
    assert a["step"] == b["step"] == 6
    assert a["scene"]["gaussians.means"].shape[0] != 60
    for key in a["scene"]:
        if key.endswith("_extra_state"):
            assert torch.equal(a["scene"][key]["split_generator"], b["scene"][key]["split_generator"])
        else:
            assert torch.equal(a["scene"][key], b["scene"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]

    # outputs: the splat PLY holds the trained Gaussians, and a mesh came through the export pipeline
    saved = load_scene(full)
    splats = read_splats(full / "mesh" / "splats.ply")
    assert torch.equal(splats["means"], saved.scene.gaussians.means.detach())
    assert (full / "mesh" / "mesh.glb").is_file()
    cams = make_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([1.55]), torch.tensor([50.0]))
    assert saved.scene.render(cams).rgb.shape == (1, 3, 16, 16)


def test_export_queries_the_gaussians_on_their_own_device():
    """The export evaluates a field on ``field_device(field)``: the Gaussians' field is not a module,
    so it states its device (a CUDA run's export once sent CPU points to CUDA Gaussians)."""
    from carv3d.export.isosurface import density_grid, field_device

    g = Gaussians(3)
    with torch.no_grad():
        g.log_scales.fill_(math.log(0.2))
        g.quats[:, 0] = 1.0
    field = GaussianField(lambda: g, radius=1.0)
    assert field_device(field) == torch.device("cpu") == field.device

    class StatesCuda:
        device, radius = torch.device("cuda", 0), 1.0

    assert field_device(StatesCuda()) == torch.device("cuda", 0)   # stated: no tensor needed to know it
    assert field_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")  # a module: its parameters
    assert field_device(object()) == torch.device("cpu")

    seen = []

    class Recording:
        radius = 1.0
        device = torch.device("cpu")

        def density(self, x):
            seen.append(x.device)
            return field.density(x)

    grid = density_grid(Recording(), 5)
    assert set(seen) == {torch.device("cpu")} and grid.shape == (5, 5, 5)


def test_no_opacity_reset_in_the_last_steps_of_a_run():
    """A reset empties the render for ~20 steps; a run ending inside that window exported a nearly
    transparent scene (train.steps=1400 with the default reset every 700). The reset is skipped when
    fewer than ``opacity_reset_margin`` steps remain, and applied otherwise."""
    cfg = scene_config("scene.density.opacity_reset_every=5", "scene.density.opacity_reset_margin=3",
                       "scene.density.stop=100", "scene.density.every=1000")

    def opacities_after_step(step, total_steps):
        scene = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
        if total_steps is not None:
            scene.plan(total_steps)
        optimizer = torch.optim.Adam(scene.parameter_groups(cfg.optim))
        scene.after_step(step, optimizer)
        return scene.gaussians.opacities().detach()

    initial = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0).gaussians.opacities().detach()
    assert initial.max() > 0.05  # something for a reset to clamp
    clamped = torch.clamp(initial, max=0.01)
    # 10 − 5 = 5 steps left ≥ 3: reset; 7 − 5 = 2 < 3: skipped; at the last step: skipped
    assert torch.allclose(opacities_after_step(5, 10), clamped, atol=1e-6)
    assert torch.equal(opacities_after_step(5, 7), initial)
    assert torch.equal(opacities_after_step(5, 5), initial)
    # outside a run (no plan) the schedule alone decides
    assert torch.allclose(opacities_after_step(5, None), clamped, atol=1e-6)
