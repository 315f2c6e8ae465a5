"""Timestep tables, draws and the adaptive proposal of carv3d.estimator (references computed by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from carv3d.estimator import (
    AdaptiveSecondMoment,
    TimestepDistribution,
    build_proposal,
    defensive_mixture,
    step_range,
    timestep_weighting,
)


def sd_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule (0.00085 → 0.012), float32 like diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS = sd_alphas_cumprod()


def reference_pw(alphas: torch.Tensor, min_step: int, max_step: int, weighting: str) -> list[float]:
    """p(t)·w(t) with Python floats, one t at a time."""
    out = []
    for t, a in enumerate(alphas.tolist()):
        w = {"sds": 1 - a, "uniform": 1.0, "fantasia3d": math.sqrt(a) * (1 - a)}[weighting]
        out.append(w / (max_step - min_step + 1) if min_step <= t <= max_step else 0.0)
    return out


def test_step_range_matches_threestudio():
    assert step_range(1000, 0.02, 0.98) == (20, 980)  # threestudio: int(1000·0.02), int(1000·0.98)
    assert step_range(1000, 0.02, 0.5) == (20, 500)
    assert step_range(1000, 0.0, 1.0) == (0, 999)  # capped at T − 1
    with pytest.raises(ValueError):
        step_range(1000, 0.5, 0.5)


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_tables_match_closed_forms(weighting):
    dist = TimestepDistribution(ALPHAS, 0.02, 0.98, weighting=weighting, proposal="teacher-weight")
    assert (dist.min_step, dist.max_step) == (20, 980)
    p = torch.zeros(1000, dtype=torch.float64)
    p[20:981] = 1 / 961
    assert torch.equal(dist.p, p)
    if weighting == "sds":  # bit-identical to threestudio's `1 - self.alphas[t]`
        assert torch.equal(dist.w, 1 - ALPHAS)
    pw = reference_pw(ALPHAS, 20, 980, weighting)
    Z = math.fsum(pw)
    q_ref = torch.tensor([v / Z for v in pw], dtype=torch.float64)
    torch.testing.assert_close(dist.q, q_ref, rtol=1e-6, atol=1e-12)  # w is float32: 1e-6 relative
    torch.testing.assert_close(dist.cdf[-1], torch.tensor(1.0, dtype=torch.float64))
    support = q_ref > 0
    torch.testing.assert_close(dist.ratio[support], (p / q_ref)[support], rtol=1e-6, atol=0)


def test_fantasia3d_weighting_formula():
    w = timestep_weighting("fantasia3d", ALPHAS)
    assert torch.equal(w, ALPHAS**0.5 * (1 - ALPHAS))  # threestudio: alphas[t] ** 0.5 * (1 - alphas[t])
    assert torch.equal(timestep_weighting("uniform", ALPHAS), torch.ones(1000))


def test_uniform_independent_draws_are_threestudio_randint():
    dist = TimestepDistribution(ALPHAS, proposal="uniform")
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(dist.sample_independent(64, g1), torch.randint(20, 981, (64,), generator=g2))
    assert torch.equal(dist.ratio[20:981], torch.ones(961, dtype=torch.float64))  # p/q = 1 exactly


def test_inverse_cdf_is_exact_and_skips_zero_probability():
    alphas = ALPHAS.clone()
    alphas[-1] = 0.0  # zero terminal SNR: the fantasia3d weight sqrt(ᾱ)(1 − ᾱ) vanishes at t = T − 1
    dist = TimestepDistribution(alphas, 0.0, 1.0, weighting="fantasia3d", proposal="teacher-weight")
    assert dist.q[-1] == 0 and int(dist.last_support) == 998
    C = dist.cdf
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), C[:-1]])
    t = torch.arange(1000)
    has_mass = dist.q > 0
    # u at the left end and in the middle of t's interval [C(t−1), C(t)) must map back to t
    assert torch.equal(dist.inverse_cdf(lower[has_mass]), t[has_mass])
    assert torch.equal(dist.inverse_cdf((lower + C)[has_mass] / 2), t[has_mass])
    u_top = torch.tensor([1 - 1e-16, 1 - 2**-53, 0.999999])
    assert int(dist.inverse_cdf(u_top).max()) == 998


@pytest.mark.parametrize("proposal", ["uniform", "teacher-weight", "adaptive"])
def test_importance_weights_have_mean_one_under_q(proposal):
    dist = TimestepDistribution(ALPHAS, proposal=proposal)
    scale = torch.rand(1000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    dist.set_adaptive_scale(scale)
    # exactly: Σ_t q(t)·p(t)/q(t) = Σ_t p(t) = 1
    torch.testing.assert_close((dist.q * dist.ratio).sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=0)
    # by Monte Carlo: 200k seeded draws; tolerance 5 standard errors of the mean
    rho = dist.importance_weight(dist.sample_independent(200_000, torch.Generator().manual_seed(2)))
    se = rho.std() / math.sqrt(rho.numel())
    assert abs(float(rho.mean()) - 1.0) <= 5 * float(se) + 1e-12


def test_stratified_draws_one_per_stratum():
    dist = TimestepDistribution(ALPHAS, proposal="teacher-weight")
    B, G = 7, 500
    g = torch.Generator().manual_seed(3)
    u = dist.stratified_uniforms(B, G, g)
    assert torch.equal(torch.floor(u * B).long(), torch.arange(B).expand(G, B))  # column b in stratum b
    t = dist.sample_stratified(B, G, torch.Generator().manual_seed(3))
    assert torch.equal(t, dist.inverse_cdf(u))
    # t's own q-interval [C(t−1), C(t)) meets stratum [b/B, (b+1)/B): one draw per stratum
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), dist.cdf[:-1]])
    b = torch.arange(B, dtype=torch.float64)
    assert bool((lower[t] < (b + 1) / B).all() and (dist.cdf[t] > b / B).all())
    shuffled = dist.stratified_uniforms(B, G, torch.Generator().manual_seed(4), shuffle=True)
    assert torch.equal(torch.floor(shuffled * B).long().sort(dim=1).values, torch.arange(B).expand(G, B))
    assert not torch.equal(torch.floor(shuffled * B).long(), torch.arange(B).expand(G, B))  # order is random


def _bin_counts(t: torch.Tensor, q: torch.Tensor, edges: list[int]) -> tuple[list[float], list[float]]:
    observed = [float(((t >= lo) & (t < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
    expected = [float(q[lo:hi].sum()) * t.numel() for lo, hi in zip(edges[:-1], edges[1:])]
    return observed, expected


@pytest.mark.parametrize("proposal,stratified", [("teacher-weight", False), ("adaptive", False), ("teacher-weight", True), ("uniform", True)])
def test_marginal_of_t_matches_q_chi_square(proposal, stratified):
    """Chi-square goodness of fit on 40 bins, 100k seeded draws; reject only below p = 1e-3."""
    dist = TimestepDistribution(ALPHAS, proposal=proposal)
    ramp = torch.linspace(0.2, 3.0, 1000, dtype=torch.float64)
    dist.set_adaptive_scale(ramp)
    g = torch.Generator().manual_seed(5)
    t = dist.sample_stratified(8, 12_500, g).flatten() if stratified else dist.sample_independent(100_000, g)
    edges = [20 + round(i * 961 / 40) for i in range(41)]
    observed, expected = _bin_counts(t, dist.q, edges)
    assert min(expected) > 5
    assert chisquare(observed, expected).pvalue > 1e-3
    assert int(t.min()) >= 20 and int(t.max()) <= 980


def test_set_t_max_rebuilds_the_tables():
    dist = TimestepDistribution(ALPHAS, proposal="teacher-weight")
    dist.set_t_max(0.5)
    assert dist.max_step == 500
    assert float(dist.p[501:].sum()) == 0 and float(dist.q[501:].sum()) == 0
    torch.testing.assert_close(dist.p.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert int(dist.sample_independent(10_000, torch.Generator().manual_seed(0)).max()) <= 500
    q_before = dist.q.clone()
    dist.set_t_max(0.5004)  # same integer range: tables unchanged
    assert torch.equal(dist.q, q_before) and dist.t_max == 0.5004


def test_state_dict_round_trip():
    a = TimestepDistribution(ALPHAS, proposal="adaptive")
    a.set_adaptive_scale(torch.linspace(1, 2, 1000))
    a.set_t_max(0.7)
    b = TimestepDistribution(ALPHAS, proposal="adaptive")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.q, b.q) and torch.equal(a.cdf, b.cdf) and b.max_step == 700
    with pytest.raises(ValueError):
        TimestepDistribution(ALPHAS, proposal="uniform").load_state_dict(a.state_dict())


# ---------------------------------------------------------------------- adaptive proposal
def test_defensive_mixture_bounds_the_weights():
    dist = TimestepDistribution(ALPHAS, proposal="adaptive", defensive=0.25)
    g = torch.Generator().manual_seed(6)
    scale = torch.rand(1000, generator=g, dtype=torch.float64) ** 8 * 1e6  # wildly uneven
    scale[100:300] = 0.0  # an m₂ estimate of zero must not starve these timesteps
    dist.set_adaptive_scale(scale)
    q_tw = dist.teacher_weight_proposal
    pws = dist.p * dist.w.double() * scale
    torch.testing.assert_close(dist.q, 0.75 * pws / pws.sum() + 0.25 * q_tw, rtol=1e-12, atol=1e-15)
    support = dist.p > 0
    assert bool((dist.q[support] >= 0.25 * q_tw[support] * (1 - 1e-12)).all())
    ratio_tw = dist.p[support] / q_tw[support]
    assert bool((dist.ratio[support] <= ratio_tw / 0.25 * (1 + 1e-12)).all())  # p/q ≤ (1/λ)·p/q_tw
    torch.testing.assert_close(defensive_mixture(q_tw, q_tw, 0.3), q_tw)


def test_build_proposal_degenerate_scale_falls_back_to_teacher_weight():
    dist = TimestepDistribution(ALPHAS, proposal="teacher-weight")
    q = build_proposal("adaptive", dist.p, dist.w, torch.zeros(1000, dtype=torch.float64), 0.3)
    torch.testing.assert_close(q, dist.q)


def test_adaptive_second_moment_bins_and_refresh():
    T, B = 100, 10
    est = AdaptiveSecondMoment(T, bins=B, decay=0.5)
    assert torch.equal(est.bin_of(torch.arange(T)), torch.arange(T) // 10)
    edges = est.bin_edges()
    assert torch.equal(edges, torch.arange(0, 101, 10))
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, 60, (500,), generator=g)  # bins 6..9 never observed
    rho = torch.rand(500, generator=g, dtype=torch.float64) + 0.5
    m = torch.rand(500, generator=g, dtype=torch.float64) * 4
    est.accumulate(t, rho, m)
    est.refresh()
    ref = [float((rho * m)[t // 10 == b].sum() / rho[t // 10 == b].sum()) for b in range(6)]
    torch.testing.assert_close(est.m2[:6], torch.tensor(ref, dtype=torch.float64))
    torch.testing.assert_close(est.m2[6:], torch.full((4,), sum(ref) / 6, dtype=torch.float64))  # unseen: mean of seen
    assert bool(est.seen[:6].all()) and not bool(est.seen[6:].any())
    # second window: only bin 0, with m = 2 everywhere → blend 0.5·old + 0.5·2
    est.accumulate(torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64))
    est.refresh()
    torch.testing.assert_close(est.m2[0], torch.tensor(0.5 * ref[0] + 1.0, dtype=torch.float64))
    torch.testing.assert_close(est.m2[1:6], torch.tensor(ref[1:], dtype=torch.float64))
    torch.testing.assert_close(est.scale_per_timestep(), est.m2.sqrt().repeat_interleave(10))
    other = AdaptiveSecondMoment(T, bins=B)
    other.load_state_dict(est.state_dict())
    assert torch.equal(other.m2, est.m2) and other.refreshes == 2


def test_adaptive_bin_estimate_is_self_normalised_importance_sampling():
    """Drawn from q, the bin estimate targets E_p[m | bin]; tolerance 5 delta-method standard errors."""
    dist = TimestepDistribution(ALPHAS, proposal="teacher-weight")
    est = AdaptiveSecondMoment(1000, bins=20)
    t = dist.sample_independent(400_000, torch.Generator().manual_seed(9))
    m_of_t = 1.0 + torch.sin(torch.arange(1000, dtype=torch.float64) / 37.0) ** 2  # varies inside bins
    rho = dist.importance_weight(t)
    est.accumulate(t, rho, m_of_t[t])
    est.refresh()
    for b in (1, 5, 10, 19):
        lo, hi = max(b * 50, 20), min(b * 50 + 50, 981)
        target = float((dist.p[lo:hi] * m_of_t[lo:hi]).sum() / dist.p[lo:hi].sum())
        inside = est.bin_of(t) == b
        r, m = rho[inside], m_of_t[t][inside]
        se = float(((r * (m - est.m2[b])) ** 2).sum().sqrt() / r.sum())
        assert abs(float(est.m2[b]) - target) <= 5 * se + 1e-12
