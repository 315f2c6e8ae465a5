"""The estimator never goes silently wrong: non-finite draws, bad inputs, resumed statistics (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch
from test_estimator import ALPHAS, X3, exact_mean, linear_teacher, reference_pw

from carv3d.estimator import AdaptiveSecondMoment, ScoreDistillationEstimator, TimestepDistribution


class InjectNonFinite:
    """The linear teacher, except that call number ``at`` returns +inf and/or NaN in single elements.

    ``kinds`` names what is injected: "inf" puts +inf in one element of row 2, "nan" NaN in one
    element of row 1 — what an fp16 U-Net overflow or a 0/0 in a custom teacher produces. Row 2
    (stratum 3 of 4 with K = 4) lies inside the nominal range: an inf in the bin below t_min
    (where p = 0) only ever made q NaN·0 = NaN everywhere, i.e. the teacher-weight fallback.
    """

    def __init__(self, at: int, kinds: tuple[str, ...]) -> None:
        self.at, self.kinds, self.calls = at, kinds, 0

    def __call__(self, x_t, t, upstream_index):
        out = linear_teacher(x_t, t, upstream_index)
        if self.calls == self.at:
            if "inf" in self.kinds:
                out[2, 0, 0] = float("inf")
            if "nan" in self.kinds:
                out[1, 0, 1] = float("nan")
        self.calls += 1
        return out


def adaptive_estimator(K: int, stratified: bool, refresh_every: int = 5) -> ScoreDistillationEstimator:
    dist = TimestepDistribution(ALPHAS, 0.02, 0.98, weighting="sds", proposal="adaptive")
    adaptive = AdaptiveSecondMoment(1000, bins=20)
    return ScoreDistillationEstimator(dist, noise_draws=K, stratified=stratified, adaptive=adaptive,
                                      adaptive_refresh_every=refresh_every)


@pytest.mark.parametrize("kinds", [("inf",), ("nan",), ("inf", "nan")])
@pytest.mark.parametrize("K,stratified", [(1, False), (4, True)])
def test_exactly_unbiased_after_injected_nonfinite_draws(kinds, K, stratified):
    """One step's teacher output holds +inf and/or NaN; every later gradient must stay unbiased.

    The adaptive proposal refreshes every 5 steps, so the bad step's draws would reach q at the next
    refresh (step 5). The mean over the 40 clean steps after the bad one (M = 100 renders of each of
    the three X3 samples per step: 4,000 samples per sample, per element) is compared with the exact
    finite sum Σ_t p(t)w(t)E[ε̂ − ε] at 5 standard errors per element: gradients of different steps
    are independent given the past and all have that conditional mean whatever q the past built, so
    the CLT applies to their average; 18 elements × 6 cases at 5 SE give a false alarm with
    probability ~1e-4. On the code before the fix the "inf" cases failed (|z| up to ~20: q turned
    NaN on the bad bin and the inverse CDF drew from the wrong table) and the cases with NaN left
    m₂ NaN, which silently froze q at teacher-weight (the adaptation assertions below).
    """
    M, bad_step, steps = 100, 2, 43
    est = adaptive_estimator(K, stratified)
    teacher = InjectNonFinite(bad_step, kinds)
    x = X3.repeat_interleave(M, 0)
    g = torch.Generator().manual_seed(7)
    samples = []
    for step in range(steps):
        result = est.estimate(x, teacher, g, step)
        finite = bool(torch.isfinite(result.latent_gradient).all())
        assert finite == (step != bad_step)  # the bad step itself stays visibly non-finite (the loop skips it)
        if step > bad_step:
            samples.append(result.latent_gradient.double().view(3, M, 2, 3))
    samples = torch.cat(samples, 1)
    mean, se = samples.mean(1), samples.std(1) / math.sqrt(samples.shape[1])
    z = (mean - exact_mean(X3, reference_pw(20, 980, "sds"))) / se
    assert float(z.abs().max()) < 5.0, f"max |z| = {float(z.abs().max()):.2f}"
    # the adaptation goes on: m₂ finite and observed everywhere, q a proper table away from teacher-weight
    assert est.adaptive.refreshes == 8 and bool(torch.isfinite(est.adaptive.m2).all())
    q = est.distribution.q
    assert bool(torch.isfinite(q).all()) and bool((q >= 0).all()) and abs(float(q.sum()) - 1) < 1e-12
    assert float((q - est.distribution.teacher_weight_proposal).abs().max()) > 1e-5
