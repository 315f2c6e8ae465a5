"""Density control against 3DGS's rules on hand-built Gaussians, and the optimiser state following rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from carv3d.config import GaussianDensityConfig
from carv3d.scene.gaussians_density import (densify_and_prune, learning_rate_schedule, record_gradients,
                                            reset_opacity)
from carv3d.scene.gaussians_model import Gaussians, quaternion_to_rotation


def five_gaussians() -> Gaussians:
    """G0 small + high gradient (clone), G1 large + high gradient (split), G2 faint (prune),
    G3 huge (prune), G4 quiet (keep)."""
    g = Gaussians(5, sh_degree=1)
    with torch.no_grad():
        g.means.copy_(torch.arange(15, dtype=torch.float32).reshape(5, 3) / 10)
        g.log_scales.copy_(torch.tensor([0.02, 0.2, 0.05, 0.6, 0.05]).log()[:, None].expand(5, 3))
        g.log_scales[1, 2] = math.log(0.1)  # anisotropic: the split must use every axis
        g.quats.copy_(torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, -0.3, 0.2], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]))
        g.opacity_logits.copy_(torch.logit(torch.tensor([0.5, 0.6, 0.005, 0.5, 0.5])))
        g.sh_dc.copy_(torch.arange(15, dtype=torch.float32).reshape(5, 1, 3))
        g.sh_rest.copy_(-torch.arange(45, dtype=torch.float32).reshape(5, 3, 3))
    return g


CFG = GaussianDensityConfig(grad_threshold=0.01, percent_dense=0.01, extent=4.0, prune_opacity=0.01, prune_scale=0.1)
GRADS = torch.tensor([0.05, 0.02, 0.0, 0.0, 0.001])  # mean view-space gradients


def adam_with_state(g: Gaussians) -> torch.optim.Adam:
    optimizer = torch.optim.Adam([{"params": [p], "name": n} for n, p in g.tensors().items()], lr=0.01)
    for p in g.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / p.numel() + 0.1
    optimizer.step()
    return optimizer


def test_clone_split_prune_follow_the_3dgs_rules():
    g = five_gaussians()
    before = {n: p.detach().clone() for n, p in g.tensors().items()}
    generator = torch.Generator().manual_seed(7)
    report = densify_and_prune(g, None, GRADS.clone(), torch.ones(5), CFG, generator)
    # clone appends G0'; the split replaces G1 by two; G2 (opacity) and G3 (0.6 > 0.1 · 4) are pruned
    assert (report.cloned, report.split, report.pruned, report.count) == (1, 1, 2, 5)
    # order: survivors [G0, G4], the clone G0', then G1's two halves
    for name in ("opacity_logits", "sh_dc", "sh_rest", "quats"):
        expected = torch.cat([before[name][[0, 4, 0]], before[name][[1, 1]]])
        assert torch.equal(g.tensors()[name].detach(), expected), name
    assert torch.equal(g.means.detach()[:3], before["means"][[0, 4, 0]])
    assert torch.allclose(g.log_scales.detach()[3:], (before["log_scales"][1].exp() / 1.6).log().expand(2, 3))
    # the halves sit at μ + R (s ⊙ z), z drawn from the same generator
    z = torch.randn((2, 1, 3), generator=torch.Generator().manual_seed(7))
    offsets = (quaternion_to_rotation(before["quats"][1]) @ (before["log_scales"][1].exp() * z[:, 0]).T).T
    assert torch.allclose(g.means.detach()[3:], before["means"][1] + offsets, atol=1e-6)


def test_optimizer_state_follows_the_rows():
    g = five_gaussians()
    optimizer = adam_with_state(g)
    old_state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in g.tensors().items()}
    densify_and_prune(g, optimizer, GRADS.clone(), torch.ones(5), CFG, torch.Generator().manual_seed(0))
    for group in optimizer.param_groups:  # the groups hold the new tensors
        assert group["params"][0] is getattr(g, group["name"])
    for name, param in g.tensors().items():
        state = optimizer.state[param]
        assert torch.equal(state["step"], old_state[name]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            old = old_state[name][key]
            assert torch.equal(state[key][:2], old[[0, 4]]), (name, key)  # kept rows keep their moments
            assert not state[key][2:].any(), (name, key)  # new Gaussians start from zero
    for p in g.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the edited optimiser still steps


def test_growth_stops_at_max_gaussians_largest_gradient_first():
    g = Gaussians(4)
    with torch.no_grad():
        g.means.copy_(torch.arange(4, dtype=torch.float32)[:, None].expand(4, 3))
        g.log_scales.fill_(math.log(0.01))  # small: every candidate is a clone
        g.opacity_logits.fill_(2.0)
    cfg = GaussianDensityConfig(grad_threshold=0.01, max_gaussians=6, prune_scale=0.0)
    report = densify_and_prune(g, None, torch.tensor([0.02, 0.05, 0.03, 0.04]), torch.ones(4), cfg,
                               torch.Generator().manual_seed(0))
    assert report.cloned == 2 and report.count == 6
    assert g.means[4:, 0].tolist() == [1.0, 3.0]  # the copies of the two largest gradients, in row order


def test_opacity_reset_clamps_and_zeroes_only_the_opacity_moments():
    g = five_gaussians()
    optimizer = adam_with_state(g)
    before = g.opacities().detach().clone()
    reset_opacity(g, optimizer, 0.01)
    assert before[2] < 0.01 and torch.allclose(g.opacities().detach(), before.clamp(max=0.01), atol=1e-7)
    assert not optimizer.state[g.opacity_logits]["exp_avg"].any()
    assert optimizer.state[g.means]["exp_avg"].any()


def test_record_gradients_in_ndc_units_of_a_per_image_loss():
    """ĝ = ‖(g_x · W/2 · B, g_y · H/2 · B)‖ summed over the cameras that see the Gaussian."""
    accum, count = torch.zeros(2), torch.zeros(2)
    grad = torch.tensor([[[0.001, 0.002], [0.5, 0.5]], [[0.003, 0.0], [1.0, 1.0]]])  # (B=2, N=2, 2)
    radii = torch.tensor([[[2, 2], [0, 0]], [[3, 3], [4, 4]]], dtype=torch.int32)
    record_gradients(accum, count, grad, radii, width=40, height=20)
    g0 = math.hypot(0.001 * 20 * 2, 0.002 * 10 * 2) + 0.003 * 20 * 2
    g1 = math.hypot(1.0 * 20 * 2, 1.0 * 10 * 2)  # camera 0 does not see Gaussian 1
    assert torch.allclose(accum, torch.tensor([g0, g1])) and count.tolist() == [2.0, 1.0]


def test_position_learning_rate_decays_log_linearly():
    assert math.isclose(learning_rate_schedule(0, 1e-3, 2e-5, 300), 1e-3)
    assert math.isclose(learning_rate_schedule(150, 1e-3, 2e-5, 300), math.sqrt(1e-3 * 2e-5))
    assert math.isclose(learning_rate_schedule(300, 1e-3, 2e-5, 300), 2e-5)
    assert math.isclose(learning_rate_schedule(5000, 1e-3, 2e-5, 300), 2e-5)


def test_never_prunes_every_gaussian():
    g = Gaussians(3)
    with torch.no_grad():
        g.opacity_logits.copy_(torch.logit(torch.tensor([0.001, 0.002, 0.003])))
    densify_and_prune(g, None, torch.zeros(3), torch.zeros(3), SimpleNamespace(**vars(CFG)),
                      torch.Generator().manual_seed(0))
    assert len(g) == 1 and math.isclose(float(g.opacities().detach()[0]), 0.003, rel_tol=1e-4)
