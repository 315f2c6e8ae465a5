"""Accounting: Welford, the ANOVA split, K*, auto-K under a simulated cost model, timers, ECM."""

from __future__ import annotations

import math
import time

import pytest
import torch

from carv3d.estimator import (
    AnovaSplit,
    AutoNoiseDraws,
    StepTimer,
    Welford,
    best_integer_noise_draws,
    ecm,
    optimal_noise_draws,
    relative_efficiency,
    variance_cost_product,
)


def test_welford_matches_batch_formulas():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(57, 9, generator=g, dtype=torch.float64) * 3 + 1
    acc = Welford()
    start = 0
    for size in (1, 5, 20, 1, 30):  # uneven batches exercise the merge
        acc.update(rows[start : start + size])
        start += size
    assert acc.count == 57
    torch.testing.assert_close(acc.mean, rows.mean(0))
    torch.testing.assert_close(acc.variance, rows.var(0).sum())  # unbiased trace of the covariance
    weighted = Welford()  # a frequency weight of 3 is the row repeated three times
    weighted.update(rows[:10], weight=3.0)
    weighted.update(rows[10:])
    repeated = torch.cat([rows[:10].repeat(3, 1), rows[10:]])
    torch.testing.assert_close(weighted.mean, repeated.mean(0))
    torch.testing.assert_close(weighted.m2, (repeated - repeated.mean(0)).pow(2).sum())
    assert math.isnan(float(Welford().variance))


def brute_force_anova(groups: list[torch.Tensor]) -> tuple[float, float]:
    """σ_b², σ_w² from the textbook one-way ANOVA on all data at once (unbalanced)."""
    N = sum(g.shape[0] for g in groups)
    G = len(groups)
    grand = torch.cat(groups).mean(0)
    ssw = sum(float((g - g.mean(0)).pow(2).sum()) for g in groups)
    ssb = sum(g.shape[0] * float((g.mean(0) - grand).pow(2).sum()) for g in groups)
    msw, msb = ssw / (N - G), ssb / (G - 1)
    n0 = (N - sum(g.shape[0] ** 2 for g in groups) / N) / (G - 1)
    return (msb - msw) / n0, msw


def test_anova_online_equals_batch_formulas_unbalanced():
    g = torch.Generator().manual_seed(1)
    anova, groups = AnovaSplit(), []
    for G, K in ((3, 2), (1, 5), (4, 3)):  # groups arrive over updates with different K
        batch = torch.randn(G, K, 4, generator=g, dtype=torch.float64) + torch.randn(G, 1, 4, generator=g, dtype=torch.float64)
        anova.update(batch)
        groups.extend(batch.unbind(0))
    sigma_b2, sigma_w2 = brute_force_anova(groups)
    assert float(anova.sigma_b2) == pytest.approx(sigma_b2, rel=1e-10)
    assert float(anova.sigma_w2) == pytest.approx(sigma_w2, rel=1e-10)


def test_anova_recovers_known_between_and_within_variances():
    """Two-level Gaussian problem with tr Cov_between = 2, tr Cov_within = 5 over D = 50 dims.

    Tolerance 5 SE, with the SE from the sampling distributions: per dim MS_W ~ s_w²χ²(N−G)/(N−G)
    and MS_B ~ (K s_b² + s_w²)χ²(G−1)/(G−1), independent, summed over D dims."""
    D, G, K = 50, 400, 4
    sigma_b2, sigma_w2 = 2.0, 5.0
    g = torch.Generator().manual_seed(2)
    anova = AnovaSplit()
    for _ in range(4):  # 4 steps of 100 renders each
        means = torch.randn(G // 4, 1, D, generator=g, dtype=torch.float64) * math.sqrt(sigma_b2 / D)
        anova.update(means + torch.randn(G // 4, K, D, generator=g, dtype=torch.float64) * math.sqrt(sigma_w2 / D))
    N = G * K
    se_w = sigma_w2 * math.sqrt(2 / (D * (N - G)))
    se_msb = (K * sigma_b2 + sigma_w2) * math.sqrt(2 / (D * (G - 1)))
    se_b = math.sqrt(se_msb**2 + se_w**2) / K
    assert abs(float(anova.sigma_w2) - sigma_w2) < 5 * se_w
    assert abs(float(anova.sigma_b2) - sigma_b2) < 5 * se_b
    assert se_b < 0.15 * sigma_b2  # the check is sharp enough to mean something


def test_anova_needs_two_draws_per_group_and_two_groups():
    anova = AnovaSplit()
    anova.update(torch.randn(5, 1, 3))  # K = 1: within-render spread unobservable
    assert math.isnan(float(anova.sigma_w2)) and math.isnan(float(anova.sigma_b2))
    single = AnovaSplit()
    single.update(torch.randn(1, 4, 3))
    assert math.isnan(float(single.sigma_b2)) and math.isfinite(float(single.sigma_w2))


def test_optimal_noise_draws_formula_and_brute_force():
    assert optimal_noise_draws(9.0, 4.0, 1.0) == pytest.approx(6.0)  # sqrt(9·4/1)
    assert optimal_noise_draws(2.0, 3.9e5, 0.75e5) == pytest.approx(math.sqrt(2 * 3.9e5 / 0.75e5))
    assert optimal_noise_draws(1.0, 1.0, 0.0) == math.inf
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        alpha, sw, sb = (float(v) for v in torch.rand(3, generator=g) * torch.tensor([50.0, 10.0, 2.0]) + 0.05)
        grid = torch.linspace(0.01, 200, 400_001, dtype=torch.float64)
        product = (sb + sw / grid) * (alpha + grid)
        k_star = optimal_noise_draws(alpha, sw, sb)
        if k_star < 200:
            assert float(grid[product.argmin()]) == pytest.approx(k_star, abs=1e-3)
        integers = range(1, 33)
        best = min(integers, key=lambda k: variance_cost_product(k, alpha, sw, sb))
        assert best_integer_noise_draws(alpha, sw, sb, 1, 32) == best


def simulate_auto_k(steps: int, alpha: float, sigma_b2: float, sigma_w2: float, seed: int = 0,
                    every: int = 10, max_draws: int = 16) -> tuple[AutoNoiseDraws, list[int]]:
    """One render per step; f_k = b + e_k with tr Cov(b) = σ_b², tr Cov(e) = σ_w² over D = 256 dims.
    Costs through a StepTimer on a simulated clock: upstream α units per render, 1 unit per draw."""
    D = 256
    g = torch.Generator().manual_seed(seed)
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    auto = AutoNoiseDraws(2, min_draws=1, max_draws=max_draws, every=every, smoothing=0.8)
    anova = AnovaSplit()
    history = []
    for step in range(steps):
        K = auto.noise_draws
        history.append(K)
        with timer("upstream"):
            now[0] += alpha
        with timer("teacher"):
            now[0] += 1.0 * K
        b = torch.randn(1, 1, D, generator=g, dtype=torch.float64) * math.sqrt(sigma_b2 / D)
        anova.update(b + torch.randn(1, K, D, generator=g, dtype=torch.float64) * math.sqrt(sigma_w2 / D))
        timer.add_count("renders", 1)
        timer.add_count("draws", K)
        if auto.due(step):
            measured = (timer.seconds("upstream") / timer.count("renders")) / (timer.seconds("teacher") / timer.count("draws"))
            auto.update(step, float(anova.sigma_b2), float(anova.sigma_w2), measured)
            anova.reset()
            timer.reset()
    return auto, history


def test_auto_k_settles_at_k_star_under_a_simulated_cost_model(caplog):
    """α = 9, σ_w² = 4, σ_b² = 1 ⇒ K* = 6; the integer optimum is 6 unless the estimate leaves
    (sqrt(30), sqrt(42)) = (5.48, 6.48). Seeded; smoothed estimates over 30 windows sit well inside."""
    with caplog.at_level("INFO", logger="carv3d"):
        auto, history = simulate_auto_k(400, alpha=9.0, sigma_b2=1.0, sigma_w2=4.0)
    assert auto.min_draws == 2  # raised from 1: K = 1 cannot be measured
    assert history[-100:] == [6] * 100
    assert auto.alpha == pytest.approx(9.0)
    assert auto.optimal == pytest.approx(6.0, rel=0.08)
    changes = [i for i in range(1, len(history)) if history[i] != history[i - 1]]
    assert changes and all(b - a >= 10 for a, b in zip(changes, changes[1:]))  # at most every N steps
    assert any("noise draws K 2 -> " in r.getMessage() for r in caplog.records)


def test_auto_k_respects_its_bounds():
    auto, history = simulate_auto_k(200, alpha=400.0, sigma_b2=0.1, sigma_w2=4.0, max_draws=8)  # K* = 126
    assert history[-50:] == [8] * 50
    auto, history = simulate_auto_k(200, alpha=0.5, sigma_b2=4.0, sigma_w2=1.0)  # K* = 0.35
    assert history[-50:] == [2] * 50


def test_auto_k_state_and_fixed_mode():
    auto = AutoNoiseDraws(4, min_draws=2, max_draws=16, every=5)
    assert not auto.due(0) and not auto.due(4) and auto.due(5)
    auto.update(5, sigma_b2=1.0, sigma_w2=4.0, alpha=9.0)
    auto.update(10, sigma_b2=float("nan"), sigma_w2=float("nan"), alpha=9.0)  # NaN windows are skipped
    assert auto.noise_draws == 6 and auto.sigma_b2 == 1.0
    copy = AutoNoiseDraws(4, min_draws=2, max_draws=16, every=5)
    copy.load_state_dict(auto.state_dict())
    assert copy.noise_draws == 6 and copy.last_update_step == 10
    fixed = AutoNoiseDraws(3, min_draws=1, max_draws=3, adapt=False)
    fixed.update(1, 1.0, 4.0, 9.0)
    assert fixed.noise_draws == 3 and fixed.optimal == pytest.approx(6.0)  # K* logged, K kept


def test_step_timer_sections_counts_and_reset():
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    with timer("upstream"):
        now[0] += 2.0
    timer.start("teacher")
    now[0] += 0.5
    timer.stop("teacher")
    with timer("upstream"):
        now[0] += 1.0
    timer.record("upstream", 0.25)
    timer.add_count("draws", 8)
    assert timer.seconds("upstream") == 3.25 and timer.seconds("teacher") == 0.5 and timer.count("draws") == 8
    assert timer.totals() == {"upstream": 3.25, "teacher": 0.5}
    with pytest.raises(RuntimeError):
        timer.start("teacher")
        timer.start("teacher")
    timer.reset()
    assert timer.seconds("upstream") == 0.0 and timer.count("draws") == 0.0


def test_step_timer_wall_clock_on_cpu():
    timer = StepTimer("cpu")
    with timer("upstream"):
        time.sleep(0.02)
    assert 0.02 <= timer.seconds("upstream") < 5.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_timer_cuda_events():
    timer = StepTimer("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    with timer("teacher"):
        for _ in range(10):
            a = a @ a / 2048
    assert timer._pending and not timer._seconds  # nothing read yet: no sync
    assert timer.seconds("teacher") > 0


def test_ecm_and_relative_efficiency():
    # REFERENCE §5: K = 1 uniform 4.7e5 vs K = 8 reuse 1.24e5 at equal cost ≈ 60 ms: ECM ≈ 3.8
    assert ecm(4.7e5, 60.0, 1.24e5, 60.0) == pytest.approx(3.79, abs=0.01)
    assert ecm(2.0, 1.0, 1.0, 4.0) == 0.5  # half the variance at four times the cost is a loss
    assert relative_efficiency(1.24e5, 1.13e5) == pytest.approx(1.097, abs=1e-3)


def test_auto_noise_draws_moves_at_most_a_factor_two_per_window():
    """A window with σ_b² ≈ 0 (K* = ∞) doubles K instead of jumping to the upper bound."""
    from carv3d.estimator.accounting import AutoNoiseDraws

    auto = AutoNoiseDraws(4, min_draws=2, max_draws=32, every=1, smoothing=0.0)
    assert auto.update(1, sigma_b2=0.0, sigma_w2=10.0, alpha=4.0) == 8
    assert auto.update(2, sigma_b2=0.0, sigma_w2=10.0, alpha=4.0) == 16
    assert auto.update(3, sigma_b2=0.0, sigma_w2=10.0, alpha=4.0) == 32
    # K* = sqrt(4 · 10 / 10) = 2: halves per window on the way down.
    assert [auto.update(s, sigma_b2=10.0, sigma_w2=10.0, alpha=4.0) for s in (4, 5, 6, 7)] == [16, 8, 4, 2]


def test_welford_leaves_out_nonfinite_rows():
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(20, 5, generator=g, dtype=torch.float64)
    acc, clean = Welford(), Welford()
    for i in range(0, 20, 5):
        batch = rows[i : i + 5].clone()
        batch[1, 2] = float("inf") if i % 10 else float("nan")
        acc.update(batch)
        clean.update(batch[[0, 2, 3, 4]])
    assert float(acc.count) == 16 and float(acc.dropped) == 4
    torch.testing.assert_close(acc.mean, clean.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.variance, clean.variance, rtol=1e-12, atol=0)
    acc.update(torch.full((3, 5), float("nan"), dtype=torch.float64))  # nothing finite: nothing changes
    torch.testing.assert_close(acc.variance, clean.variance, rtol=1e-12, atol=0)


def test_steady_totals_leave_out_a_cold_step_and_keep_everything_when_too_few():
    """Ten steps of 1 s upstream + 0.5 s teacher, one of which compiled for 45 s: the steady totals are
    the nine others' exactly; the plain totals keep all ten. With two steps there is no median."""
    now = [0.0]
    timer = StepTimer(clock=lambda: now[0])
    for step in range(10):
        timer.next_step()
        with timer("upstream"):
            now[0] += 1.0
        with timer("teacher"):
            now[0] += 0.5 + (45.0 if step == 3 else 0.0)
        timer.add_count("draws", 4)
    steady = timer.steady()
    assert steady["seconds"] == {"upstream": 9.0, "teacher": 4.5} and steady["counts"] == {"draws": 36.0}
    assert steady["steps"] == 9 and steady["left_out"] == 1 and steady["left_out_seconds"] == pytest.approx(46.5)
    assert timer.seconds("teacher") == pytest.approx(50.0) and timer.count("draws") == 40  # the plain totals
    # a resumed window is one aggregate step: kept whole, never compared with single steps
    restored = StepTimer(clock=lambda: now[0])
    restored.load_state_dict(timer.state_dict())
    for step in range(3):
        restored.next_step()
        with restored("teacher"):
            now[0] += 0.5 + (10.0 if step == 1 else 0.0)
    again = restored.steady()
    assert again["seconds"]["teacher"] == pytest.approx(4.5 + 1.0) and again["left_out"] == 1
    few = StepTimer(clock=lambda: now[0])
    for extra in (0.0, 45.0):
        few.next_step()
        with few("teacher"):
            now[0] += 0.5 + extra
    assert few.steady()["seconds"]["teacher"] == pytest.approx(46.0) and few.steady()["left_out"] == 0
