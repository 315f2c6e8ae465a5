"""The estimator never goes silently wrong: non-finite draws, bad inputs, resumed statistics (issue 21)."""

from __future__ import annotations

import math

import pytest
import torch
from test_estimator import ALPHAS, X3, exact_mean, linear_teacher, reference_pw

from carv3d.estimator import (AdaptiveSecondMoment, AnovaSplit, AutoNoiseDraws, ScoreDistillationEstimator, StepTimer,
                              TimestepDistribution)


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
    probability ~1e-4. On the code before the fix the "inf" cases failed (max |z| = 158 with K = 1,
    175 with K = 4: q turned NaN on the bad bin and the inverse CDF drew from a broken table) and
    the cases with NaN left m₂ NaN, which silently froze q at teacher-weight (the adaptation
    assertions below).
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


# ------------------------------------------------------------------------------ what is counted and logged
def test_nonfinite_draws_are_counted_per_step_window_and_run_and_logged_when_the_window_closes(caplog):
    est = adaptive_estimator(K=4, stratified=True)
    est.auto.every = 3
    teacher = InjectNonFinite(1, ("inf", "nan"))
    g = torch.Generator().manual_seed(0)
    with caplog.at_level("WARNING", logger="carv3d"):
        stats = [est.estimate(X3, teacher, g, step).stats for step in range(7)]
    assert [float(s["nonfinite_draws"]) for s in stats] == [0, 2, 0, 0, 0, 0, 0]
    assert [float(s["nonfinite_draws_total"]) for s in stats] == [0, 2, 2, 2, 2, 2, 2]
    # the window [0, 3] closes at step 3 (auto.every = 3), after its stats were taken; the next starts empty
    assert [float(s["nonfinite_draws_window"]) for s in stats] == [0, 2, 2, 2, 0, 0, 0]
    warnings = [r.getMessage() for r in caplog.records if "non-finite teacher draw" in r.getMessage()]
    assert len(warnings) == 1 and "step 3: 2 non-finite" in warnings[0]
    assert float(est.adaptive.dropped) == 2 and float(est.anova.dropped_groups) == 0  # window restarted
    for s in stats:  # device tensors, read only at log time (no host sync in the step)
        assert all(isinstance(s[k], torch.Tensor) for k in ("nonfinite_draws", "nonfinite_draws_window",
                                                            "nonfinite_draws_total", "rejected_proposals"))


def test_anova_leaves_out_exactly_the_groups_with_a_nonfinite_value():
    """Masked updates equal updates without those groups (to rounding: the sums run in another order)."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(5, 4, 6, generator=g, dtype=torch.float64) + torch.randn(5, 1, 6, generator=g, dtype=torch.float64)
               for _ in range(3)]
    for stratified in (False, True):
        masked, clean = AnovaSplit(stratified), AnovaSplit(stratified)
        for i, batch in enumerate(batches):
            bad = batch.clone()
            bad[1, 2, 3] = float("inf")
            bad[4, 0, 0] = float("nan")
            assert float(masked.update(bad)) == 2.0
            clean.update(batch[[0, 2, 3]])
        nothing = torch.full((2, 4, 6), float("nan"), dtype=torch.float64)
        assert float(masked.update(nothing)) == 2.0  # a batch with no finite group changes nothing
        assert float(masked.n_groups) == float(clean.n_groups) == 9 and float(masked.dropped_groups) == 8
        for name in ("sigma_b2", "sigma_w2", "mean_square_between"):
            torch.testing.assert_close(getattr(masked, name), getattr(clean, name), rtol=1e-12, atol=0)
        assert math.isfinite(float(masked.sigma_b2))


def test_an_invalid_rebuilt_proposal_falls_back_to_teacher_weight_and_is_counted():
    dist = TimestepDistribution(ALPHAS, proposal="adaptive")
    scale = torch.linspace(0.5, 3.0, 1000, dtype=torch.float64)
    dist.set_adaptive_scale(scale)
    adaptive_q = dist.q.clone()
    assert float(dist.rejected_proposals) == 0
    broken = scale.clone()
    broken[500] = float("inf")  # what an unguarded m₂ handed over before the fix
    dist.set_adaptive_scale(broken, validate=False)  # the unchecked internal path: the tensor-op guard catches it
    assert torch.equal(dist.q, dist.teacher_weight_proposal) and float(dist.rejected_proposals) == 1
    t = dist.sample_independent(10_000, torch.Generator().manual_seed(0))
    assert int(t.min()) >= dist.min_step and int(t.max()) <= dist.max_step
    dist.set_adaptive_scale(scale)
    assert torch.equal(dist.q, adaptive_q) and float(dist.rejected_proposals) == 1


def test_a_checkpoint_with_a_broken_adaptive_state_is_repaired_on_load(caplog):
    """A state written by the code before the fix (m₂ = inf in a bin) must not carry over."""
    est = adaptive_estimator(K=1, stratified=False)
    for step in range(6):
        est.estimate(X3, linear_teacher, torch.Generator().manual_seed(step), step)
    state = est.state_dict()
    state["adaptive"]["m2"][7] = float("inf")
    state["adaptive"]["pending_sum"][3] = float("nan")
    state["distribution"]["adaptive_scale"][400] = float("inf")
    fresh = adaptive_estimator(K=1, stratified=False)
    with caplog.at_level("WARNING", logger="carv3d"):
        fresh.load_state_dict(state)
    assert bool(torch.isfinite(fresh.adaptive.m2).all()) and not bool(fresh.adaptive.seen[7])
    assert bool(torch.isfinite(fresh.adaptive.pending_sum).all())
    assert bool(torch.isfinite(fresh.distribution.q).all())
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 2


# ------------------------------------------------------------------------------ inputs that used to corrupt silently
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.5])
def test_alphas_cumprod_outside_0_1_or_not_finite_is_refused(bad):
    alphas = ALPHAS.clone()
    alphas[123] = bad
    with pytest.raises(ValueError, match="alphas_cumprod must be finite and in \\[0, 1\\].*t = 123"):
        TimestepDistribution(alphas, proposal="teacher-weight")
    with pytest.raises(ValueError, match="1-D"):
        TimestepDistribution(ALPHAS.view(10, 100))


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0])
def test_set_adaptive_scale_refuses_inf_nan_and_negative_values(bad):
    dist = TimestepDistribution(ALPHAS, proposal="adaptive")
    q = dist.q.clone()
    scale = torch.ones(1000, dtype=torch.float64)
    scale[300] = bad
    with pytest.raises(ValueError, match="finite and >= 0"):
        dist.set_adaptive_scale(scale)
    with pytest.raises(ValueError, match="shape"):
        dist.set_adaptive_scale(torch.ones(999))
    assert torch.equal(dist.q, q)  # unchanged


def test_loading_another_fixed_k_is_an_error_and_changes_nothing():
    source = ScoreDistillationEstimator(TimestepDistribution(ALPHAS, proposal="teacher-weight"), noise_draws=16)
    source.estimate(X3, linear_teacher, torch.Generator().manual_seed(0), 0)
    target = ScoreDistillationEstimator(TimestepDistribution(ALPHAS, proposal="teacher-weight"), noise_draws=1)
    with pytest.raises(ValueError, match="saved with K = 16 noise draws, but this estimator fixes K = 1"):
        target.load_state_dict(source.state_dict())
    assert target.noise_draws == 1
    auto = ScoreDistillationEstimator(TimestepDistribution(ALPHAS, proposal="teacher-weight"), noise_draws="auto")
    auto.load_state_dict(source.state_dict())  # auto-K takes the saved K (within its bounds)
    assert auto.noise_draws == 16


def test_step_is_required():
    est = ScoreDistillationEstimator(TimestepDistribution(ALPHAS), noise_draws=2)
    with pytest.raises(TypeError, match="step"):
        est.estimate(X3, linear_teacher, torch.Generator())


def test_dimension_zero_is_always_the_number_of_upstream_samples():
    g = torch.Generator().manual_seed(0)
    est = ScoreDistillationEstimator(TimestepDistribution(ALPHAS), noise_draws=2)
    with pytest.raises(ValueError, match="at least one sample dimension"):
        est.estimate(torch.ones(6), linear_teacher, g, 0)
    est.estimate(X3, linear_teacher, g, 0)  # (R, 2, 3): the first call fixes the rank
    with pytest.raises(ValueError, match="pass x\\[None\\]"):
        est.estimate(X3[0], linear_teacher, g, 1)  # one unbatched (2, 3) sample would read as R = 2
    est.estimate(X3[:1], linear_teacher, g, 1)  # the same sample, batched
    typed = ScoreDistillationEstimator(TimestepDistribution(ALPHAS), noise_draws=2, sample_ndim=2)
    with pytest.raises(ValueError, match="with 2 sample dimensions"):
        typed.estimate(X3[0], linear_teacher, g, 0)  # refused even on the first call
    assert typed.estimate(X3, linear_teacher, g, 0).latent_gradient.shape == X3.shape


# ------------------------------------------------------------------------------ resume (issue 21 item 16)
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def resumable_run(steps: range, state=None, generator_state=None):
    """The carv estimator (adaptive q refreshed every 2 steps, stratified, auto-K over windows of 5),
    on a deterministic clock; a NaN draw at step 1 so the non-finite counters cross the save too."""
    clock = Clock()
    dist = TimestepDistribution(ALPHAS, proposal="adaptive")
    est = ScoreDistillationEstimator(dist, noise_draws="auto", stratified=True, adaptive=AdaptiveSecondMoment(1000),
                                     adaptive_refresh_every=2, auto=AutoNoiseDraws(4, every=5, smoothing=0.5),
                                     timer=StepTimer(clock=clock))
    if state is not None:
        est.load_state_dict(state)
    g = torch.Generator().manual_seed(5)
    if generator_state is not None:
        g.set_state(generator_state)
    bad = InjectNonFinite(0, ("nan",))  # called at step 1 only
    results = []
    for step in steps:
        x = X3 + 0.3 * torch.randn(X3.shape, generator=g)  # new renders every step: a between-render spread

        def teacher(x_t, t, index, step=step):
            clock.now += 0.001 * x_t.shape[0]  # 1 ms per draw
            return bad(x_t, t, index) if step == 1 else linear_teacher(x_t, t, index)

        est.record_upstream_time(0.05 + 0.01 * step)  # costs that vary: a partial window would read another α
        results.append(est.estimate(x, teacher, g, step))
    return est, g, results


def same_stat(a, b) -> bool:
    a, b = (float(v) if isinstance(v, (int, float)) else v for v in (a, b))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return torch.equal(a, b) or (bool(a.isnan().all()) and bool(b.isnan().all()))


def test_a_resumed_estimator_continues_with_the_uninterrupted_statistics():
    """A runs 7 steps; B runs 3 and saves; a fresh C loads and runs 4: C's steps equal A's 3..6.

    The window that closes at step 5 straddles the save, so σ_b², σ_w² (window and smoothed), K and
    K* after it are only equal if the ANOVA sums were restored; α is equal here because the clock is
    deterministic — with a wall clock the restored seconds are measurements, never bit-identical.
    """
    _, _, uninterrupted = resumable_run(range(7))
    first, g, _ = resumable_run(range(3))
    state = first.state_dict()
    resumed, _, continued = resumable_run(range(3, 7), state=state, generator_state=g.get_state())
    for a, c in zip(uninterrupted[3:], continued):
        assert torch.equal(a.latent_gradient, c.latent_gradient)
        assert a.stats.keys() == c.stats.keys()
        different = [k for k in a.stats if not same_stat(a.stats[k], c.stats[k])]
        assert not different, different
    last = uninterrupted[-1].stats
    assert math.isfinite(last["sigma_b2"]) and math.isfinite(last["alpha"]) and last["sigma_b2"] != 0
    assert float(last["nonfinite_draws_total"]) == 1


def test_gradient_clipping_does_not_hide_a_nonfinite_step():
    est = ScoreDistillationEstimator(TimestepDistribution(ALPHAS), noise_draws=2, gradient_clip=0.5)
    result = est.estimate(X3 * 10, InjectNonFinite(0, ("inf",)), torch.Generator().manual_seed(0), 0)
    g = result.latent_gradient
    assert not bool(torch.isfinite(g[1]).all())  # row 2 of 6 is render 1's first draw (K = 2)
    assert bool(torch.isfinite(g[[0, 2]]).all()) and float(g[[0, 2]].abs().max()) == 0.5  # the others are clipped
