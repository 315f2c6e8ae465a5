"""The guidance seam: SDS and Classifier Score Distillation (CSD) share the estimator's sampling.

CSD's residual is ε̂_c(x_t, t) − ε̂_u(x_t, t). With linear branches ε̂_c = a_c(t)·x_t + b_c(t)·c and
ε̂_u = a_u(t)·x_t + b_u(t)·c the expected latent gradient is a finite sum over the timestep grid,

    E[g] = Σ_t p(t) w(t) [ (a_c − a_u)(t) · √ᾱ_t · x + (b_c − b_u)(t) · c ],

because E_ε[x_t] = √ᾱ_t·x (the injected noise enters only through x_t and averages out).
"""

from __future__ import annotations

import math

import pytest
import torch

from carv3d.config import load_config
from carv3d.estimator import (ClassifierScoreDistillation, Draws, ScoreDistillation, ScoreDistillationEstimator,
                              TimestepDistribution, build_estimator)

from test_estimator import ALPHAS, C_VEC, GRID, X3, reference_pw

A_C, A_U = 0.9 + 0.2 * torch.cos(GRID / 90.0), 0.4 + 0.1 * torch.sin(GRID / 60.0)
B_C, B_U = torch.sin(GRID / 210.0), 0.3 * torch.cos(GRID / 50.0)


class LinearBranches:
    """Closed-form conditional and unconditional predictions; the guided one with scale s."""

    def __init__(self, scale: float = 7.5):
        self.scale = scale
        self.calls = {"guided": 0, "branches": 0}

    def _branch(self, a, b, x_t, t):
        return (a[t].view(-1, 1, 1) * x_t.double() + b[t].view(-1, 1, 1) * C_VEC).to(x_t.dtype)

    def branches(self, x_t, t, upstream_index):
        self.calls["branches"] += 1
        return self._branch(A_U, B_U, x_t, t), self._branch(A_C, B_C, x_t, t)

    def __call__(self, x_t, t, upstream_index):
        self.calls["guided"] += 1
        u, c = self._branch(A_U, B_U, x_t, t), self._branch(A_C, B_C, x_t, t)
        return u + self.scale * (c - u)


def exact_csd_mean(x: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    coef_x = (pw * (A_C - A_U) * ALPHAS.double().sqrt()).sum()
    coef_c = (pw * (B_C - B_U)).sum()
    return coef_x * x.double() + coef_c * C_VEC


def test_csd_residual_is_the_difference_of_the_branches_row_by_row():
    x_t = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([20, 100, 500, 700, 980])
    draws = Draws(x=x_t * 0, x_t=x_t, t=t, noise=torch.randn_like(x_t), upstream_index=torch.arange(5))
    teacher = LinearBranches()
    u, c = teacher.branches(x_t, t, draws.upstream_index)
    assert torch.equal(ClassifierScoreDistillation().residual(draws, teacher), c - u)
    # and SDS subtracts the injected noise from the guided prediction
    assert torch.equal(ScoreDistillation().residual(draws, teacher), teacher(x_t, t, draws.upstream_index) - draws.noise)
    # chunked calls give the same rows
    assert torch.equal(ClassifierScoreDistillation().residual(draws, teacher, max_batch=2), c - u)


@pytest.mark.parametrize("proposal,stratified,K", [("uniform", False, 1), ("teacher-weight", True, 4),
                                                   ("adaptive", True, 3)])
def test_csd_through_the_estimator_is_unbiased(proposal, stratified, K):
    """MC mean of 1,200 estimates per upstream sample vs the exact finite sum, 5 SE per element
    (3 variants × 18 elements: a false alarm at 5 SE has probability ~3e-5 overall). CARV's
    proposal, importance weights and strata apply to CSD unchanged."""
    dist = TimestepDistribution(ALPHAS, 0.02, 0.98, weighting="sds", proposal=proposal)
    if proposal == "adaptive":
        dist.set_adaptive_scale(0.2 + torch.rand(1000, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 5)
    est = ScoreDistillationEstimator(dist, noise_draws=K, stratified=stratified,
                                     guidance=ClassifierScoreDistillation())
    M = 600
    x = X3.repeat_interleave(M, 0)
    teacher = LinearBranches()
    g = torch.Generator().manual_seed(7 + K)
    samples = torch.cat([est.estimate(x, teacher, g, step=i).latent_gradient.double().view(3, M, 2, 3)
                         for i in range(2)], dim=1)
    mean, se = samples.mean(1), samples.std(1) / math.sqrt(samples.shape[1])
    target = exact_csd_mean(X3, reference_pw(20, 980, "sds"))
    z = (mean - target).abs() / se
    assert float(z.max()) < 5.0, f"max |z| = {float(z.max()):.2f}"
    assert teacher.calls["guided"] == 0 and teacher.calls["branches"] == 2  # one batched call per step


def test_guidance_type_is_a_config_key_and_csd_needs_both_branches():
    cfg = load_config(overrides=["guidance.type=csd", "estimator.preset=sds"])
    est = build_estimator(cfg.estimator, ALPHAS, "cpu", cfg.guidance)
    assert isinstance(est.guidance, ClassifierScoreDistillation)
    assert isinstance(build_estimator(cfg.estimator, ALPHAS, "cpu").guidance, ScoreDistillation)  # default
    with pytest.raises(TypeError, match="branches"):  # a plain function has only the guided prediction
        est.estimate(X3, lambda x_t, t, i: x_t, torch.Generator().manual_seed(0), step=0)


def test_csd_trains_end_to_end_with_the_real_teacher(tiny_sd_path, tmp_path):
    """`guidance.type=csd` through the whole step: the teacher's branch predictions, a finite gradient
    that differs from SDS's on the same draws."""
    from carv3d.step import DistillationStep

    def step_gradient(guidance: str) -> torch.Tensor:
        cfg = load_config(overrides=[f"teacher.pretrained={tiny_sd_path}", f"guidance.type={guidance}",
                                     "estimator.preset=sds", "scene.grid.n_levels=4", "scene.grid.log2_hashmap_size=12",
                                     "render.width=16", "render.height=16", "render.samples_per_ray=8"],
                          prompt="a red cube")
        step = DistillationStep.from_config(cfg, torch.device("cpu"))
        out = step(0)
        assert torch.isfinite(out.loss)
        return out.estimate.latent_gradient

    csd, sds = step_gradient("csd"), step_gradient("sds")
    assert torch.isfinite(csd).all() and csd.abs().sum() > 0
    assert not torch.allclose(csd, sds)
