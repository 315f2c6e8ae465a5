"""Variance accounting under stratified timesteps (issue 21 item 3) against the exact closed forms of
scripts/stratified_accounting.py, and that script's own formulas against Monte Carlo."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carv3d.estimator import AnovaSplit, ScoreDistillationEstimator, TimestepDistribution, add_noise, collapsed_strata
from carv3d.estimator.anova import collapsed_contrast_matrix
from carv3d.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "stratified_accounting.py"


def _load_script():
    return load_script("stratified_accounting")


toy = _load_script()


def test_collapsed_contrasts_are_the_scaled_within_group_deviations():
    assert collapsed_strata(2) == [[0, 1]] and collapsed_strata(3) == [[0, 1, 2]]
    assert collapsed_strata(5) == [[0, 1], [2, 3, 4]] and collapsed_strata(6) == [[0, 1], [2, 3], [4, 5]]
    g = torch.Generator().manual_seed(0)
    for K in range(2, 9):
        y = torch.randn(K, 7, generator=g, dtype=torch.float64)
        z = collapsed_contrast_matrix(K) @ y
        expected = sum(len(grp) / (len(grp) - 1) * float((y[grp] - y[grp].mean(0)).pow(2).sum())
                       for grp in collapsed_strata(K))
        assert float(z.pow(2).sum()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("proposal,K", [("teacher-weight", 4), ("uniform", 8)])
def test_the_estimators_stratified_anova_reads_the_closed_form_expectation(proposal, K):
    """σ̂_b², σ̂_w² of the estimator's own ANOVA (stratified K draws, fresh renders x = m + s·z each
    step, ε̂ = 0.9·x_t) against E[σ̂] from the closed forms, over 6 independent windows of 2,000
    renders: |mean − expected| < 5 SE (SE from the 6 windows' spread; a t-distribution with 5 df puts
    5 SE at p ≈ 0.004 per check, 4 checks). The one-way expectation (the estimator before issue 21)
    must be > 10 SE away, so the test tells the two apart; the true σ_b² is also checked to be close."""
    teacher, up, m = toy.toy(common=1.0, spread=0.25, D=64, a=0.9)
    dist = TimestepDistribution(toy.sd_alphas_cumprod(), proposal=proposal)
    exact = toy.split_at(dist, teacher, up, K)

    def predict(x_t, t, index):
        return 0.9 * x_t

    readings = []
    for seed in range(6):
        est = ScoreDistillationEstimator(dist, noise_draws=K, stratified=True, accounting_every=10**9)
        g = torch.Generator().manual_seed(seed)
        for step in range(4):
            x = m + 0.5 * torch.randn(500, 64, generator=g, dtype=torch.float64)
            est.estimate(x, predict, g, step)
        readings.append([float(est.anova.sigma_b2), float(est.anova.sigma_w2)])
    readings = torch.tensor(readings, dtype=torch.float64)
    mean, se = readings.mean(0), readings.std(0) / math.sqrt(6)
    for i, name in enumerate(("sigma_b2", "sigma_w2")):
        assert abs(float(mean[i]) - exact[f"collapsed_{name}"]) < 5 * float(se[i]), (name, mean, se, exact)
        assert abs(float(mean[i]) - exact[f"one_way_{name}"]) > 10 * float(se[i]), (name, mean, se, exact)
    assert abs(exact["collapsed_sigma_b2"] / exact["sigma_b2"] - 1) < 0.05


def test_cross_render_k1_variances_match_monte_carlo():
    """The K = 1 formulas (fixed renders, strata across them in a random order) against 400,000
    simulated steps drawn with the estimator's own draw (sample_stratified(R, ·, shuffle=True));
    tolerance 5 SE of the variance estimate. Both directions occur: +17 % under ε̂ = 0.9·x_t, a gain
    when the teacher adds a term every render shares."""
    dist = TimestepDistribution(toy.sd_alphas_cumprod(), proposal="teacher-weight")
    x3 = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0, -1.0], [-1.5, 0.2, 2.2, 1.1, -0.7, 0.0],
                       [0.3, 0.3, -3.0, -2.0, 1.0, 1.5]], dtype=torch.float64)
    grid = torch.arange(1000, dtype=torch.float64)
    c = torch.tensor([0.7, -1.2, 0.3, 2.0, 0.1, -0.5], dtype=torch.float64)
    cases = [(toy.Teacher(torch.full((1000,), 0.9, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)),
              torch.zeros(6, dtype=torch.float64), +1),
             (toy.Teacher(0.5 + 0.3 * torch.sin(grid / 100.0), torch.cos(grid / 170.0)), c, -1)]
    g = torch.Generator().manual_seed(0)
    M, R = 400_000, 3
    for teacher, cvec, sign in cases:
        exact = toy.cross_render_variances(dist, teacher, x3, cvec)
        assert sign * (exact["stratified"] - exact["independent"]) > 0.1 * exact["independent"]
        for name, t in (("stratified", dist.sample_stratified(R, M, g, shuffle=True)),
                        ("independent", dist.sample_independent(M * R, g).view(M, R))):
            t = t.reshape(-1)
            x = x3.repeat(M, 1)
            eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x_t = add_noise(dist.alphas_cumprod.double(), x, eps, t)
            f = dist.coefficient(t).double()[:, None] * (teacher.a[t, None] * x_t + teacher.b[t, None] * cvec - eps)
            step = f.view(M, R, 6).mean(1)
            sq = (step - step.mean(0)).pow(2).sum(1) * M / (M - 1)
            mc, se = float(sq.mean()), float(sq.std()) / math.sqrt(M)
            assert abs(mc - exact[name]) < 5 * se, (name, mc, exact[name], se)


def test_random_renders_never_lose_from_k1_stratification():
    """E over independent renders of the K = 1 change is −(1/R)·(1/R)Σ_s‖E[h(s) − h̄]‖² ≤ 0; zero
    when renders share no mean (the closed form; the formula is checked against MC above)."""
    for proposal in ("uniform", "teacher-weight"):
        dist = TimestepDistribution(toy.sd_alphas_cumprod(), proposal=proposal)
        for common in (0.0, 0.3, 1.0):
            teacher, up, _ = toy.toy(common, 0.25, 64, 0.9)
            for R in (2, 3, 4, 8):
                v = toy.cross_render_expected(dist, teacher, up, R)
                assert v["stratified"] <= v["independent"] * (1 + 1e-12)
                if common == 0.0:
                    assert v["stratified"] == pytest.approx(v["independent"], rel=1e-12)


def test_stratified_anova_state_round_trip_and_fixed_k():
    g = torch.Generator().manual_seed(1)
    a = AnovaSplit(stratified=True)
    a.update(torch.randn(3, 4, 5, generator=g, dtype=torch.float64))
    b = AnovaSplit(stratified=True)
    b.load_state_dict(a.state_dict())
    batch = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    a.update(batch)
    b.update(batch)
    assert torch.equal(a.sigma_b2, b.sigma_b2) and torch.equal(a.sigma_w2, b.sigma_w2)
    with pytest.raises(ValueError, match="K changed from 4 to 3"):
        a.update(torch.randn(2, 3, 5, generator=g, dtype=torch.float64))
    with pytest.raises(ValueError, match="disagree on stratified"):
        AnovaSplit(stratified=False).load_state_dict(a.state_dict())


def test_script_help_and_json(tmp_path):
    assert subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True).returncode == 0
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--k-max", "10", "--alpha", "20", "--common", "1.0",
                           "--dim", "16", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    for entry in report["accounting"]:
        (auto,) = entry["auto_k"]
        assert auto["collapsed_excess_percent"] <= auto["one_way_excess_percent"]
    assert {r["teacher"] for r in report["k1_across_renders"]["fixed_renders"]} == {"tests' a(t)x_t + b(t)c", "0.9*x_t"}
