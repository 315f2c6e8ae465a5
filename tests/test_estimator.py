"""The (R, K) estimator: exact unbiasedness, variance against exact finite sums, plain-SDS parity, API."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from carv3d.config import load_config
from carv3d.estimator import (
    AutoNoiseDraws,
    ScoreDistillationEstimator,
    StepTimer,
    TimestepDistribution,
    build_estimator,
    piecewise_linear,
)


def sd_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS = sd_alphas_cumprod()
GRID = torch.arange(1000, dtype=torch.float64)
A_OF_T = 0.5 + 0.3 * torch.sin(GRID / 100.0)  # a(t)
B_OF_T = torch.cos(GRID / 170.0)  # b(t)
C_VEC = torch.tensor([[0.7, -1.2, 0.3], [2.0, 0.1, -0.5]], dtype=torch.float64)  # c: (2, 3)


def linear_teacher(x_t: torch.Tensor, t: torch.Tensor, upstream_index: torch.Tensor) -> torch.Tensor:
    """ε̂ = a(t)·x_t + b(t)·c: linear in x_t, so E_ε[ε̂ − ε] = a(t)·sqrt(ᾱ_t)·x + b(t)·c exactly."""
    a, b = A_OF_T[t].view(-1, 1, 1), B_OF_T[t].view(-1, 1, 1)
    return (a * x_t.double() + b * C_VEC).to(x_t.dtype)


def reference_pw(min_step: int, max_step: int, weighting: str) -> torch.Tensor:
    """p(t)·w(t) from the closed forms, float64."""
    a = ALPHAS.double()
    w = {"sds": 1 - a, "uniform": torch.ones_like(a), "fantasia3d": a.sqrt() * (1 - a)}[weighting]
    p = torch.zeros(1000, dtype=torch.float64)
    p[min_step : max_step + 1] = 1.0 / (max_step - min_step + 1)
    return p * w


def exact_mean(x: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    """E[g_r] = Σ_t p(t)w(t)(a(t)sqrt(ᾱ_t)x_r + b(t)c): (R, 2, 3), a finite sum over the grid."""
    coef_x = (pw * A_OF_T * ALPHAS.double().sqrt()).sum()
    coef_c = (pw * B_OF_T).sum()
    return coef_x * x.double() + coef_c * C_VEC


def make_estimator(weighting="sds", proposal="uniform", stratified=False, K=1, t_max=0.98, **kwargs):
    dist = TimestepDistribution(ALPHAS, 0.02, t_max, weighting=weighting, proposal=proposal)
    if proposal == "adaptive":  # a non-trivial adaptive table: q far from teacher-weight
        dist.set_adaptive_scale(0.2 + torch.rand(1000, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 5)
    return ScoreDistillationEstimator(dist, noise_draws=K, stratified=stratified, **kwargs)


X3 = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], [[-1.5, 0.2, 2.2], [1.1, -0.7, 0.0]],
                   [[0.3, 0.3, -3.0], [-2.0, 1.0, 1.5]]])  # three distinct upstream samples: (3, 2, 3)


@pytest.mark.parametrize("weighting", ["sds", "fantasia3d", "uniform"])
@pytest.mark.parametrize("proposal", ["uniform", "teacher-weight", "adaptive"])
@pytest.mark.parametrize("stratified,K", [(False, 1), (False, 3), (True, 1), (True, 3)])
def test_every_variant_is_unbiased(weighting, proposal, stratified, K):
    """MC mean of 1,200 seeded estimates per upstream sample vs the exact finite sum; tolerance 5 SE
    per element (36 variants × 18 elements: a false alarm at 5 SE has probability ~4e-4 overall).
    The rows are three contiguous blocks of different x, so a stratum assignment that favoured some
    rows (K = 1, strata across renders, without the random permutation) shows as bias."""
    M, calls = 600, 2
    t_max = 0.5 if (weighting, proposal) == ("sds", "adaptive") else 0.98  # also a scheduled range
    est = make_estimator(weighting, proposal, stratified, K, t_max=t_max)
    x = X3.repeat_interleave(M, 0)  # rows [0, M) are X3[0], [M, 2M) are X3[1], ...
    g = torch.Generator().manual_seed(100 + K)
    samples = torch.cat([est.estimate(x, linear_teacher, g, step=i).latent_gradient.double().view(3, M, 2, 3)
                         for i in range(calls)], dim=1)
    mean, se = samples.mean(1), samples.std(1) / math.sqrt(samples.shape[1])
    target = exact_mean(X3, reference_pw(20, int(1000 * t_max), weighting))
    z = (mean - target).abs() / se
    assert float(z.max()) < 5.0, f"max |z| = {float(z.max()):.2f}"


def exact_variance(dist: TimestepDistribution, x: torch.Tensor, K: int, stratified: bool) -> float:
    """tr Var(g) for one render x: (2, 3) under the linear teacher, as exact finite sums.

    One draw: f = c(t)(μ(t) + s(t)ε) with c = (p/q)w, μ = a·sqrt(ᾱ)x + b·c_vec, s = a·sqrt(1−ᾱ) − 1,
    so under t ~ π: E f = Σ π c μ and E‖f‖² = Σ π c²(‖μ‖² + s²D). Independent: Var/K. Stratified:
    stratum b has π_b(t) = K·|[C(t−1), C(t)) ∩ [b/K, (b+1)/K)| and Var = Σ_b Var_b / K².
    """
    a64 = ALPHAS.double()
    c = dist.ratio * dist.w.double()
    mu = (A_OF_T * a64.sqrt()).view(-1, 1) * x.double().view(1, -1) + B_OF_T.view(-1, 1) * C_VEC.view(1, -1)
    s = A_OF_T * (1 - a64).sqrt() - 1
    m1 = c.view(-1, 1) * mu
    m2 = c**2 * (mu.pow(2).sum(1) + s**2 * mu.shape[1])

    def var_under(pi: torch.Tensor) -> float:
        return float(pi @ m2 - (pi @ m1).pow(2).sum())

    if not stratified:
        return var_under(dist.q) / K
    upper = dist.cdf
    lower = torch.cat([torch.zeros(1, dtype=torch.float64), upper[:-1]])
    total = 0.0
    for b in range(K):
        pi = K * (torch.minimum(upper, torch.tensor((b + 1) / K, dtype=torch.float64))
                  - torch.maximum(lower, torch.tensor(b / K, dtype=torch.float64))).clamp_min(0)
        assert abs(float(pi.sum()) - 1) < 1e-9
        total += var_under(pi)
    return total / K**2


def test_variance_ordering_stratified_importance_sampling_beats_uniform():
    """Exact variances (finite sums) order as claimed, and each matches the estimator's Monte Carlo
    variance over 20,000 seeded estimates within 5 standard errors of the variance estimate."""
    x, K = X3[0], 4
    variances = {}
    for proposal in ("uniform", "teacher-weight"):
        for stratified in (False, True):
            est = make_estimator("sds", proposal, stratified, K)
            exact = exact_variance(est.distribution, x, K, stratified)
            n = 20_000
            g = est.estimate(x.expand(n, 2, 3), linear_teacher, torch.Generator().manual_seed(5), 0).latent_gradient.double()
            sq = (g - g.mean(0)).pow(2).sum((1, 2)) * n / (n - 1)
            mc, se = float(sq.mean()), float(sq.std() / math.sqrt(n))
            assert abs(mc - exact) < 5 * se, (proposal, stratified, mc, exact, se)
            variances[(proposal, stratified)] = exact
    uniform = variances[("uniform", False)]
    assert variances[("teacher-weight", True)] < variances[("teacher-weight", False)] < uniform
    assert variances[("uniform", True)] < uniform
    assert variances[("teacher-weight", True)] < 0.8 * uniform  # a clear gain, not a rounding effect


def test_whole_batch_goes_through_one_teacher_call():
    calls = []

    def teacher(x_t, t, upstream_index):
        calls.append((x_t.shape, t.clone(), upstream_index.clone()))
        return linear_teacher(x_t, t, upstream_index)

    est = make_estimator("sds", "teacher-weight", True, K=5)
    result = est.estimate(X3, teacher, torch.Generator().manual_seed(0), 0)
    assert len(calls) == 1
    shape, t, index = calls[0]
    assert shape == (15, 2, 3) and t.dtype == torch.long and t.shape == (15,)
    assert torch.equal(index, torch.tensor([0] * 5 + [1] * 5 + [2] * 5))
    assert torch.equal(t.view(3, 5), result.timesteps)
    assert result.latent_gradient.shape == X3.shape and result.stats["noise_draws"] == 5.0
    # chunking to a max batch gives the same numbers
    chunked_calls = []

    def chunked(x_t, t, upstream_index):
        chunked_calls.append(x_t.shape[0])
        return linear_teacher(x_t, t, upstream_index)

    est2 = make_estimator("sds", "teacher-weight", True, K=5)
    again = est2.estimate(X3, chunked, torch.Generator().manual_seed(0), 0, max_batch=4)
    assert chunked_calls == [4, 4, 4, 3]
    assert torch.equal(again.latent_gradient, result.latent_gradient)


def test_surrogate_backward_is_the_chain_rule():
    """x_r = A_r θ (linear upstream): ∂L/∂θ must equal (1/R) Σ_r A_rᵀ g_r."""
    g = torch.Generator().manual_seed(1)
    R, P = 3, 5
    A = torch.randn(R, 6, P, generator=g, dtype=torch.float64)
    theta = torch.randn(P, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.einsum("rdp,p->rd", A, theta).view(R, 2, 3)
    est = make_estimator("sds", "teacher-weight", True, K=4)
    result = est.estimate(x, linear_teacher, g, 0)
    result.surrogate.backward()
    expected = torch.einsum("rdp,rd->p", A, result.latent_gradient.reshape(R, 6)) / R
    torch.testing.assert_close(theta.grad, expected, rtol=1e-12, atol=1e-12)
    assert result.latent_gradient.grad_fn is None


def threestudio_sds(latents, predict_noise, scheduler, generator, min_step=20, max_step=980):
    """threestudio's `compute_grad_sds` (uniform t, independent per batch element, w = 1 − ᾱ_t), with
    diffusers' own DDPMScheduler.add_noise. The gradient it returns is grad = w·(ε̂ − ε)."""
    batch_size = latents.shape[0]
    alphas = scheduler.alphas_cumprod.to(latents.device)
    t = torch.randint(min_step, max_step + 1, [batch_size], dtype=torch.long, device=latents.device, generator=generator)
    with torch.no_grad():
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        latents_noisy = scheduler.add_noise(latents, noise, t)
        noise_pred = predict_noise(latents_noisy, t, torch.arange(batch_size))
    w = (1 - alphas[t]).view(-1, 1, 1, 1)
    return w * (noise_pred - noise)


@pytest.mark.parametrize("R", [1, 2])
def test_sds_preset_reproduces_plain_sds_bit_for_bit(R):
    DDPMScheduler = pytest.importorskip("diffusers").DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cfg = load_config(overrides=["estimator.preset=sds", f"estimator.upstream_samples={R}"])
    est = build_estimator(cfg.estimator, scheduler.alphas_cumprod, "cpu")

    def teacher(x_t, t, upstream_index):  # any nonlinear noise predictor
        return torch.tanh(x_t) * (t.float() / 1000).view(-1, 1, 1, 1) + 0.1 * x_t**2

    for seed in range(5):
        theta = torch.randn(R, 4, 8, 8, generator=torch.Generator().manual_seed(50 + seed), requires_grad=True)
        latents = theta * 1.5
        ours = est.estimate(latents, teacher, torch.Generator().manual_seed(seed), step=seed)
        # threestudio's min/max_step_percent set to the preset's range (0.02, its tuned t_max 0.75)
        reference = threestudio_sds(latents.detach(), teacher, scheduler, torch.Generator().manual_seed(seed),
                                    max_step=int(1000 * cfg.estimator.t_max))
        assert cfg.estimator.t_max == 0.75 and torch.equal(ours.latent_gradient, reference)
        ours.surrogate.backward()
        ours_grad, theta.grad = theta.grad.clone(), None
        latents = theta * 1.5
        ((latents * reference).sum() / R).backward()
        assert torch.equal(ours_grad, theta.grad)
        theta.grad = None
        latents = theta * 1.5
        target = (latents - reference).detach()  # threestudio's loss form: same gradient up to rounding
        (0.5 * torch.nn.functional.mse_loss(latents, target, reduction="sum") / R).backward()
        torch.testing.assert_close(ours_grad, theta.grad, rtol=1e-5, atol=1e-6)
    assert ours.stats["importance_weight_max"] == 1.0 and ours.stats["noise_draws"] == 1.0


def test_carv_preset_builds_the_full_estimator():
    cfg = load_config()  # the default preset is carv
    est = build_estimator(cfg.estimator, ALPHAS, "cpu")
    assert est.auto.adapt and est.stratified and est.adaptive is not None
    assert est.distribution.proposal == "adaptive" and 2 <= est.noise_draws <= cfg.estimator.max_noise_draws
    result = est.estimate(X3, linear_teacher, torch.Generator().manual_seed(0), 0)
    assert result.timesteps.shape == (3, est.noise_draws)


def test_gradient_clip_is_elementwise_after_averaging():
    plain = make_estimator("uniform", "uniform", False, K=2).estimate(X3 * 10, linear_teacher, torch.Generator().manual_seed(3), 0)
    clipped = make_estimator("uniform", "uniform", False, K=2, gradient_clip=0.5).estimate(
        X3 * 10, linear_teacher, torch.Generator().manual_seed(3), 0)
    assert torch.equal(clipped.latent_gradient, plain.latent_gradient.clamp(-0.5, 0.5))
    assert float(plain.latent_gradient.abs().max()) > 0.5


def test_t_max_schedule_is_applied():
    assert piecewise_linear([[0, 0.98], [100, 0.5]], 50) == pytest.approx(0.74)
    assert piecewise_linear([[5000, 0.98], [5000, 0.5]], 4999) == 0.98
    assert piecewise_linear([[5000, 0.98], [5000, 0.5]], 5000) == 0.5
    est = make_estimator("sds", "teacher-weight", False, K=8, t_max_schedule=[[0, 0.98], [10, 0.5]])
    result = est.estimate(X3, linear_teacher, torch.Generator().manual_seed(0), step=10)
    assert est.distribution.max_step == 500 and int(result.timesteps.max()) <= 500


class FakeClock:
    """A clock the test advances: the teacher costs `per_draw` per row, the upstream is recorded."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_auto_noise_draws_is_wired_to_the_anova_and_the_timers(caplog):
    """With α = 64 draws per render and this teacher's σ's, the loop moves K off its start, within
    bounds, at window ends only, logs the change, and settles on the K* of its own estimates."""
    clock = FakeClock()
    auto = AutoNoiseDraws(2, min_draws=2, max_draws=16, every=5, smoothing=0.5)
    dist = TimestepDistribution(ALPHAS, proposal="teacher-weight")
    est = ScoreDistillationEstimator(dist, noise_draws="auto", stratified=True, auto=auto, timer=StepTimer(clock=clock))

    def teacher(x_t, t, upstream_index):
        clock.now += 0.001 * x_t.shape[0]  # 1 ms per draw
        return linear_teacher(x_t, t, upstream_index)

    g = torch.Generator().manual_seed(0)
    history = []
    with caplog.at_level("INFO", logger="carv3d"):
        for step in range(120):
            x = torch.randn(1, 2, 3, generator=g) * 0.3  # a new render each step: between-render spread
            est.record_upstream_time(0.064)
            history.append(est.estimate(x, teacher, g, step).stats["noise_draws"])
    changes = [i for i in range(1, len(history)) if history[i] != history[i - 1]]
    assert changes and all(2 <= k <= 16 for k in history)
    assert all((i - 1) % 5 == 0 for i in changes)  # decided at the end of step 5, 10, ... applied after
    assert any("noise draws K" in r.getMessage() for r in caplog.records)
    assert auto.alpha == pytest.approx(64.0, rel=1e-6)
    from carv3d.estimator import best_integer_noise_draws
    assert est.noise_draws == best_integer_noise_draws(auto.alpha, auto.sigma_w2, max(auto.sigma_b2, 0), 2, 16)


def test_a_cold_teacher_call_does_not_move_the_cost_ratio():
    """One teacher call that stalls 45 s (a compile, a CUDA-graph capture) in a window of 1-ms draws:
    α stays the steady 64 draws per render instead of collapsing to ~0.3."""
    clock = FakeClock()
    auto = AutoNoiseDraws(2, min_draws=2, max_draws=16, every=5, smoothing=0.5)
    dist = TimestepDistribution(ALPHAS, proposal="teacher-weight")
    est = ScoreDistillationEstimator(dist, noise_draws="auto", stratified=True, auto=auto, timer=StepTimer(clock=clock))
    calls = []

    def teacher(x_t, t, upstream_index):
        calls.append(1)
        clock.now += 0.001 * x_t.shape[0] + (45.0 if len(calls) == 3 else 0.0)
        return linear_teacher(x_t, t, upstream_index)

    g = torch.Generator().manual_seed(0)
    for step in range(11):
        est.record_upstream_time(0.064)
        est.estimate(torch.randn(1, 2, 3, generator=g) * 0.3, teacher, g, step)
    assert auto.alpha == pytest.approx(64.0, rel=1e-6)


def test_state_dict_round_trip_continues_identically():
    cfg = load_config()
    a = build_estimator(cfg.estimator, ALPHAS, "cpu")
    g = torch.Generator().manual_seed(0)
    for step in range(60):  # past one adaptive refresh (every 50)
        a.estimate(X3, linear_teacher, g, step)
    assert a.adaptive.refreshes == 1
    b = build_estimator(cfg.estimator, ALPHAS, "cpu")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.distribution.q, b.distribution.q) and b.noise_draws == a.noise_draws
    state = g.get_state()
    ra = a.estimate(X3, linear_teacher, g, 60)
    g.set_state(state)
    rb = b.estimate(X3, linear_teacher, g, 60)
    assert torch.equal(ra.latent_gradient, rb.latent_gradient)


def test_stats_are_tensors_or_floats_and_importance_weights_average_near_one():
    est = make_estimator("sds", "teacher-weight", True, K=8)
    result = est.estimate(X3, linear_teacher, torch.Generator().manual_seed(0), 0)
    for key in ("importance_weight_mean", "importance_weight_max", "importance_weight_ess", "sigma_b2_window",
                "sigma_w2_window", "timestep_mean", "residual_mean_square"):
        assert isinstance(result.stats[key], torch.Tensor) and result.stats[key].dim() == 0, key
    for key in ("noise_draws", "alpha", "sigma_b2", "sigma_w2", "optimal_noise_draws"):
        assert isinstance(result.stats[key], float), key
    assert 0 < float(result.stats["importance_weight_ess"]) <= 1


def test_proposal_figure(tmp_path):
    est = build_estimator(load_config().estimator, ALPHAS, "cpu")
    est.estimate(X3, linear_teacher, torch.Generator().manual_seed(0), 0)
    figure = est.proposal_figure()
    assert len(figure.axes) == 3  # tables, their p/q twin axis, the adaptive m₂ panel
    figure.savefig(tmp_path / "proposal.png")
    assert (tmp_path / "proposal.png").stat().st_size > 1000


def test_estimator_imports_neither_3d_code_nor_matplotlib():
    code = (
        "import sys, carv3d.estimator; "
        "bad = [m for m in sys.modules if m.startswith(('carv3d.scene', 'carv3d.render', 'carv3d.teacher', "
        "'carv3d.config', 'matplotlib', 'omegaconf', 'scipy'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_example_in_the_package_docstring_runs():
    import carv3d.estimator as package

    block = package.__doc__.split("::\n\n", 1)[1].split("\n\n``build_estimator", 1)[0]
    namespace: dict = {}
    exec("\n".join(line[4:] for line in block.splitlines()), namespace)
    assert namespace["result"].latent_gradient.shape == (2, 4, 8, 8)
    assert all(p.grad is not None for p in namespace["decoder"].parameters())
