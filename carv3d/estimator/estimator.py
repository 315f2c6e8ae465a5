"""The (R, K) score-distillation estimator: many cheap teacher draws per expensive upstream sample.

Given an upstream tensor x: (R, ...) that carries the graph to the parameters θ (R renders encoded
to latents, or any differentiable generator's output) and a noise predictor ε̂, one step computes

.. math::

    g_r = \\frac{1}{K} \\sum_{k=1}^{K} \\frac{p(t_{rk})}{q(t_{rk})}\\, w(t_{rk})
          \\big(\\hat ε(x_{t,rk}, t_{rk}) − ε_{rk}\\big),
    \\qquad x_{t,rk} = \\sqrt{\\bar α_{t_{rk}}}\\, x_r + \\sqrt{1 − \\bar α_{t_{rk}}}\\, ε_{rk},

(paper Eq. 13) with all R·K rows in **one** call of ``predict_noise``, and the surrogate

.. math::

    L = \\frac{1}{R} \\sum_r \\langle x_r, \\mathrm{sg}(g_r) \\rangle
    \\quad\\Rightarrow\\quad
    \\frac{\\partial L}{\\partial θ} = \\frac{1}{R} \\sum_r g_r^\\top \\frac{\\partial x_r}{\\partial θ},

whose single backward pass carries the K averaged residuals through the upstream once per render.
E[g_r | x_r] = Σ_t p(t)·w(t)·E_ε[ε̂(x_t, t) − ε] for every proposal q and draw scheme offered, because
the table q that draws t is the table that weights it (:mod:`carv3d.estimator.timesteps`).

Random draws of one :meth:`ScoreDistillationEstimator.estimate`, all from ``generator`` on its device,
in this fixed order:

1. timesteps t: (R, K) —
   independent + uniform proposal: ``torch.randint(min_step, max_step + 1, (R·K,))``;
   independent + other proposals: ``torch.rand((R·K,), float64)`` → inverse CDF;
   stratified, K ≥ 2: ``torch.rand((R, K), float64)`` jitter, K strata per render;
   stratified, K = 1: ``torch.rand((1, R), float64)`` jitter, R strata across the renders, then
   ``torch.rand((1, R), float64)`` keys of a random permutation (so each render's draw is marginally
   q-distributed even when the renders are not exchangeable);
2. noise ε = ``torch.randn((R·K, ...), dtype=x.dtype)``, row n = r·K + k;
3. the guidance's own draws in ``Guidance.update``, if it trains a part of its own (VSD's particle
   model; SDS and CSD draw nothing).

With R = K = 1, the uniform proposal and no stratification, these are threestudio's draws
(``randint`` for t, then one ``randn`` of x's shape for ε), x_t is computed with diffusers'
``add_noise`` arithmetic and g = w(t)·(ε̂ − ε) with w = 1 − ᾱ_t: plain SDS, bit for bit.

Non-finite draws. A teacher output with an inf or NaN (an fp16 U-Net overflow) makes that draw's
residual non-finite. The gradient of *that* step stays non-finite for the render it belongs to —
on purpose: replacing or dropping the draw would bias the step (overflows are not independent of
the value), and a non-finite gradient is what the training loop already detects and skips. What
must never happen is a *later* step going wrong, so the draw is kept out of everything that
accumulates across steps: the adaptive second moments (and hence q), the ANOVA window (σ_b², σ_w²,
auto-K). It is counted (``nonfinite_draws`` this step, ``nonfinite_draws_window``,
``nonfinite_draws_total``) and a warning is logged when its accounting window closes. All of this
is masks and ``torch.where`` on the device: no host sync is added to a step.

Upstream shape. Dimension 0 of the upstream is always R, the number of upstream samples: a single
image or latent (C, H, W) must be passed as x[None]. The estimator cannot tell a (C, H, W) latent
from C renders of shape (H, W) by itself; it refuses a 0-D or 1-D upstream, a sample rank that
differs from its first call's, and — given ``sample_ndim`` — any other rank.

Stratification across renders (K = 1). With one draw per render the R renders share one set of R
strata, in a random order. Given the renders this can raise the variance: with h_r(s) the mean
draw of render r in stratum s, tr Var changes by −Σ_{r≠r'} C(r, r')/(R²(R − 1)) with
C(r, r') = (1/R)Σ_s ⟨h_r(s) − h̄_r, h_{r'}(s) − h̄_{r'}⟩, an increase when renders' t-profiles point
in opposite directions. But the renders of a step are random too, and for renders drawn
independently E[C(r, r')] = (1/R)Σ_s ‖E_x[h_x(s) − h̄_x]‖² ≥ 0: averaged over the renders — the
variance training sees — it never raises the variance. Measured exactly on closed-form problems
(``python scripts/stratified_accounting.py``, ε̂ = 0.9·x_t): the tests' three fixed renders +10 %
(uniform q) and +17 % (teacher-weight q), the same renders under the tests' teacher with a shared
b(t)·c term −31 %; random renders x = m + s·z −0.2 % to −29 % when they share a mean, exactly 0 when
they do not. It therefore stays on. (The argument needs independent renders; with camera strata the
renders of a step are dependent, which the argument does not cover.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch

from carv3d.estimator.accounting import AutoNoiseDraws, logger
from carv3d.estimator.anova import AnovaSplit
from carv3d.estimator.adaptive import AdaptiveSecondMoment
from carv3d.estimator.guidance import (Draws, Guidance, NoisePredictor, PredictNoise, ScoreDistillation, as_predictor,
                                       build_guidance)
from carv3d.estimator.timesteps import TimestepDistribution
from carv3d.estimator.timing import StepTimer

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

Stat = Union[float, torch.Tensor]


@dataclass
class EstimateResult:
    """One step's output.

    Attributes:
        latent_gradient: g: (R, ...), no graph; clipped elementwise when ``gradient_clip`` > 0.
        surrogate: () tensor, (x · g).sum()/R; its backward gives (1/R) Σ_r g_r·∂x_r/∂θ.
        stats: scalars to log; tensors stay on the device (call ``.item()`` at log time).
        timesteps: (R, K) long, the drawn t.
    """

    latent_gradient: torch.Tensor
    surrogate: torch.Tensor
    stats: dict[str, Stat] = field(default_factory=dict)
    timesteps: Optional[torch.Tensor] = None


def piecewise_linear(schedule: Sequence[Sequence[float]], step: int) -> float:
    """Value of a schedule [[step_0, v_0], [step_1, v_1], ...] (steps non-decreasing) at ``step``.

    Linear between points, constant before the first and after the last. A repeated step is a jump:
    [[5000, 0.98], [5000, 0.5]] gives 0.98 before step 5000 and 0.5 from it on.
    """
    points = [(float(s), float(v)) for s, v in schedule]
    if step < points[0][0]:
        return points[0][1]
    i = max(j for j, (s, _) in enumerate(points) if s <= step)
    if i == len(points) - 1:
        return points[-1][1]
    (s0, v0), (s1, v1) = points[i], points[i + 1]
    return v0 + (v1 - v0) * (step - s0) / (s1 - s0)


def add_noise(alphas_cumprod: torch.Tensor, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε with diffusers' ``DDPMScheduler.add_noise`` arithmetic.

    ᾱ is cast to x's device and dtype first, and both roots are ``** 0.5``, as there.

    Args:
        alphas_cumprod: (T,).
        x, noise: (N, ...).
        t: (N,) long.
    """
    a = alphas_cumprod.to(device=x.device, dtype=x.dtype)
    shape = (-1,) + (1,) * (x.dim() - 1)
    sqrt_alpha = (a[t] ** 0.5).flatten().reshape(shape)
    sqrt_one_minus_alpha = ((1 - a[t]) ** 0.5).flatten().reshape(shape)
    return sqrt_alpha * x + sqrt_one_minus_alpha * noise


class ScoreDistillationEstimator:
    """The CARV estimator: render reuse (K draws per upstream sample), timestep importance sampling,
    stratified draws and compute-aware accounting, behind one :meth:`estimate` call.

    Args:
        distribution: the timestep tables (p, w, q) and draws.
        noise_draws: K, or ``"auto"`` to let ``auto`` choose it.
        stratified: stratified inverse-CDF draws (K strata per render; across renders when K = 1,
            which can raise the variance for given renders but never on average over independent
            ones: see the module docstring).
        gradient_clip: clip g elementwise to ±value after averaging the K draws; 0 = off. Clipping
            biases the estimate; after the average it bites less often than per draw. Non-finite
            elements are left as they are, so the caller still sees (and skips) a bad step.
        auto: the K controller; default ``AutoNoiseDraws(4)`` for ``"auto"``, and a non-adapting one
            (it only logs σ_b², σ_w², α and K*) for a fixed K.
        adaptive: the per-bin second-moment estimate, required for ``proposal == "adaptive"``.
        adaptive_refresh_every: steps between rebuilds of the adaptive proposal's tables.
        t_max_schedule: [[step, t_max], ...] for :func:`piecewise_linear`; empty keeps t_max fixed.
        accounting_every: window (steps) of the ANOVA and timers when ``auto`` is not given.
        timer: the :class:`StepTimer`; the loop times its upstream with ``estimator.timer("upstream")``.
        guidance: the residual per draw (:mod:`carv3d.estimator.guidance`); default SDS.
        sample_ndim: the rank of one upstream sample (3 for (C, H, W) latents); given, an upstream of
            any other rank than 1 + sample_ndim is refused with a ValueError. None: the first call's
            rank is kept and later calls must match it.
    """

    def __init__(
        self,
        distribution: TimestepDistribution,
        noise_draws: Union[int, str] = 1,
        stratified: bool = False,
        gradient_clip: float = 0.0,
        auto: Optional[AutoNoiseDraws] = None,
        adaptive: Optional[AdaptiveSecondMoment] = None,
        adaptive_refresh_every: int = 50,
        t_max_schedule: Sequence[Sequence[float]] = (),
        accounting_every: int = 50,
        timer: Optional[StepTimer] = None,
        guidance: Optional[Guidance] = None,
        sample_ndim: Optional[int] = None,
    ) -> None:
        self.distribution = distribution
        self.guidance = guidance if guidance is not None else ScoreDistillation()
        if noise_draws == "auto":
            self.auto = auto if auto is not None else AutoNoiseDraws(4, every=accounting_every)
        elif isinstance(noise_draws, int) and noise_draws >= 1:
            self.auto = AutoNoiseDraws(noise_draws, min_draws=1, max_draws=max(noise_draws, 1),
                                       every=auto.every if auto else accounting_every, adapt=False)
        else:
            raise ValueError(f"noise_draws must be a positive integer or 'auto'; got {noise_draws!r}")
        if distribution.proposal == "adaptive" and adaptive is None:
            adaptive = AdaptiveSecondMoment(distribution.num_timesteps, device=distribution.device)
        self.adaptive = adaptive
        self.stratified = bool(stratified)
        self.gradient_clip = float(gradient_clip)
        self.adaptive_refresh_every = int(adaptive_refresh_every)
        self.t_max_schedule = [list(map(float, point)) for point in t_max_schedule]
        self.timer = timer if timer is not None else StepTimer(distribution.device)
        # K ≥ 2 stratified draws are column k = stratum k of every render: the ANOVA uses that structure
        self.anova = AnovaSplit(stratified=self.stratified)
        self._last_refresh: Optional[int] = None
        if sample_ndim is not None and int(sample_ndim) < 1:
            raise ValueError(f"sample_ndim must be >= 1 (the rank of one upstream sample); got {sample_ndim}")
        self.sample_ndim = None if sample_ndim is None else int(sample_ndim)
        self._upstream_ndim: Optional[int] = None
        # non-finite draws left out of the statistics: () float64 device tensors (read at window ends)
        self._nonfinite_total: Optional[torch.Tensor] = None
        self._nonfinite_window: Optional[torch.Tensor] = None
        self._rejected_at_window_start = 0.0

    # ------------------------------------------------------------------ public state
    @property
    def noise_draws(self) -> int:
        """K used by the next :meth:`estimate`."""
        return self.auto.noise_draws

    def record_upstream_time(self, seconds: float) -> None:
        """Add upstream (render + encode + backward) seconds measured by the caller."""
        self.timer.record("upstream", seconds)

    def cost_ratio(self) -> float:
        """α = (upstream seconds per render)/(teacher seconds per draw) over the current window's
        steady steps (:meth:`StepTimer.steady`: a step that took over 5× the median, compiling or
        recording a graph, is left out).

        NaN when the upstream was not timed. Reading it synchronises with CUDA.
        """
        steady = self.timer.steady()  # steps that compiled or recorded a graph are left out
        renders, draws = steady["counts"].get("renders", 0.0), steady["counts"].get("draws", 0.0)
        upstream, teacher = steady["seconds"].get("upstream", 0.0), steady["seconds"].get("teacher", 0.0)
        if renders <= 0 or draws <= 0 or upstream <= 0 or teacher <= 0:
            return math.nan
        return (upstream / renders) / (teacher / draws)

    # ------------------------------------------------------------------ the step
    def _draw_timesteps(self, R: int, K: int, generator: torch.Generator) -> torch.Tensor:
        dist = self.distribution
        if not self.stratified:
            return dist.sample_independent(R * K, generator).reshape(R, K)
        if K == 1:
            return dist.sample_stratified(R, 1, generator, shuffle=True).reshape(R, 1)
        return dist.sample_stratified(K, R, generator)

    def _before_step(self, step: int) -> None:
        if self.t_max_schedule:
            self.distribution.set_t_max(piecewise_linear(self.t_max_schedule, step))
        if self.adaptive is not None:
            if self._last_refresh is None:
                self._last_refresh = step
            elif step - self._last_refresh >= self.adaptive_refresh_every:
                self.adaptive.refresh()
                # m₂ is finite and ≥ 0 by construction (non-finite draws never enter it), so no
                # validating host sync here; the rebuild's tensor-op check still guards q.
                self.distribution.set_adaptive_scale(self.adaptive.scale_per_timestep(), validate=False)
                self._last_refresh = step

    def _close_window(self, step: int) -> None:
        """End an accounting window: read σ_b², σ_w², α and the non-finite counts (the window's one
        host sync) into the K controller and the log."""
        sigma_b2, sigma_w2 = float(self.anova.sigma_b2), float(self.anova.sigma_w2)  # NaN without enough data
        self.auto.update(step, sigma_b2, sigma_w2, self.cost_ratio())
        self._warn_nonfinite(step)
        self.anova.reset()
        self.timer.reset()

    def _warn_nonfinite(self, step: int) -> None:
        """Log the window's non-finite draws and rejected proposal tables, if any (reads two counters)."""
        dropped = float(self._nonfinite_window) if self._nonfinite_window is not None else 0.0
        rejected = float(self.distribution.rejected_proposals)
        if dropped > 0:
            logger.warning("step %d: %d non-finite teacher draw(s) in this accounting window were left out of the "
                           "estimator's statistics (adaptive proposal, sigma_b2/sigma_w2, auto-K); the gradients of "
                           "their steps were non-finite (%d so far in this run)", step, dropped,
                           float(self._nonfinite_total))
        if rejected > self._rejected_at_window_start:
            logger.warning("step %d: %d rebuilt proposal table(s) were not a valid distribution; the teacher-weight "
                           "proposal was used instead", step, rejected - self._rejected_at_window_start)
        self._rejected_at_window_start = rejected
        if self._nonfinite_window is not None:
            self._nonfinite_window = torch.zeros_like(self._nonfinite_window)

    def _check_upstream(self, upstream: torch.Tensor) -> None:
        """Dimension 0 is R (see the module docstring); host-side shape checks only."""
        if upstream.dim() < 2 or upstream.shape[0] < 1:
            raise ValueError(f"upstream must be (R, ...) with R >= 1 samples along dimension 0 and at least one sample "
                             f"dimension; got shape {tuple(upstream.shape)} (one sample of shape S: pass x[None])")
        ndim = upstream.dim()
        if self.sample_ndim is not None and ndim != self.sample_ndim + 1:
            raise ValueError(f"upstream must be (R, ...) with {self.sample_ndim} sample dimensions; got shape "
                             f"{tuple(upstream.shape)} (one unbatched sample? pass x[None])")
        if self._upstream_ndim is not None and ndim != self._upstream_ndim:
            raise ValueError(f"upstream has shape {tuple(upstream.shape)}, but earlier calls had {self._upstream_ndim} "
                             "dimensions (R, ...): dimension 0 is always R (one unbatched sample? pass x[None])")
        self._upstream_ndim = ndim

    def _count_nonfinite(self, row_finite: torch.Tensor) -> torch.Tensor:
        """Add this step's non-finite draws to the window and run totals: () float64, on the device."""
        bad = (~row_finite).sum().to(torch.float64)
        if self._nonfinite_total is None or self._nonfinite_window is None:
            self._nonfinite_total = torch.zeros_like(bad)
            self._nonfinite_window = torch.zeros_like(bad)
        self._nonfinite_total = self._nonfinite_total + bad
        self._nonfinite_window = self._nonfinite_window + bad
        return bad

    def estimate(
        self,
        upstream: torch.Tensor,
        predict_noise: Union[NoisePredictor, PredictNoise],
        generator: torch.Generator,
        step: int,
        max_batch: Optional[int] = None,
        update_guidance: bool = True,
    ) -> EstimateResult:
        """One gradient estimate.

        Args:
            upstream: x: (R, ...), carries the graph to the parameters. Dimension 0 is R, always.
            predict_noise: the teacher, a :class:`NoisePredictor` or a plain :data:`PredictNoise`
                function (enough for SDS); called with N = R·K rows at once (or in chunks of
                ``max_batch`` rows when given).
            generator: every draw of the step (see the module docstring for their order).
            step: the training step (schedules, adaptive refreshes, the K controller's windows).
                Required: with a constant default those would silently never happen.
            max_batch: chunk the teacher call; None = one call.
            update_guidance: let the guidance train its own parts on this upstream after the
                residual (VSD's particle model); False holds them fixed (gradient measurements).
                Timed as upstream: the training is per upstream sample, not per draw.

        Returns:
            :class:`EstimateResult`. The K of this step is ``stats["noise_draws"]``; a new K chosen
            at the end of an accounting window applies from the next call.
        """
        self._check_upstream(upstream)
        self.timer.next_step()  # a step's group: the last backward, this render, encode and teacher call
        self._before_step(step)
        dist = self.distribution
        R, K = int(upstream.shape[0]), self.noise_draws
        N = R * K
        with torch.no_grad():
            x = upstream.detach()
            t = self._draw_timesteps(R, K, generator).to(x.device)  # (R, K)
            t_flat = t.reshape(N)
            noise = torch.randn((N, *x.shape[1:]), generator=generator, device=generator.device, dtype=x.dtype)
            noise = noise.to(x.device)
            x_rep = x if K == 1 else x.repeat_interleave(K, dim=0)
            x_t = add_noise(dist.alphas_cumprod, x_rep, noise, t_flat)
            upstream_index = torch.arange(R, device=x.device).repeat_interleave(K)
            draws = Draws(x_rep, x_t, t_flat, noise, upstream_index)
            with self.timer("teacher"):
                residual = self.guidance.residual(draws, as_predictor(predict_noise), max_batch)  # (N, ...)
            self.timer.add_count("renders", R)
            self.timer.add_count("draws", N)
            coef = dist.coefficient(t_flat).to(x.device)  # (p/q)·w: (N,)
            weighted = coef.reshape((N,) + (1,) * (x.dim() - 1)) * residual  # f: (N, ...)
            g = weighted.reshape(R, K, *x.shape[1:]).mean(1)
            if self.gradient_clip > 0:  # a non-finite g stays non-finite: clipping an inf would hide a bad step
                g = torch.where(torch.isfinite(g), g.clamp(-self.gradient_clip, self.gradient_clip), g)
            ratio = dist.importance_weight(t_flat)  # (N,) float64
            mean_square = residual.reshape(N, -1).pow(2).mean(1)
            row_finite = torch.isfinite(weighted.reshape(N, -1)).all(1) & torch.isfinite(mean_square)
            nonfinite = self._count_nonfinite(row_finite)
            if self.adaptive is not None:  # leaves non-finite draws out itself
                self.adaptive.accumulate(t_flat, ratio, mean_square)
            if K >= 2:  # leaves renders with a non-finite draw out itself
                self.anova.update(weighted.reshape(R, K, -1))
        guidance_stats: dict[str, Stat] = {}
        if update_guidance:
            with self.timer("upstream"):
                guidance_stats = self.guidance.update(x, as_predictor(predict_noise), generator)
        surrogate = (upstream * g).sum() / R
        stats = self._stats(R, K, t_flat, ratio, mean_square)
        stats.update(guidance_stats)
        stats["nonfinite_draws"] = nonfinite
        stats["nonfinite_draws_window"] = self._nonfinite_window
        stats["nonfinite_draws_total"] = self._nonfinite_total
        stats["rejected_proposals"] = dist.rejected_proposals
        if self.auto.due(step):
            self._close_window(step)
        return EstimateResult(latent_gradient=g, surrogate=surrogate, stats=stats, timesteps=t)

    def _stats(self, R: int, K: int, t: torch.Tensor, ratio: torch.Tensor, mean_square: torch.Tensor) -> dict[str, Stat]:
        """Per-step scalars; tensors are not read here (no host sync)."""
        ratio = ratio.to(torch.float32)
        return {
            "noise_draws": float(K),
            "upstream_samples": float(R),
            "timestep_mean": t.to(torch.float32).mean(),
            "t_max": self.distribution.t_max,
            "importance_weight_mean": ratio.mean(),
            "importance_weight_min": ratio.min(),
            "importance_weight_max": ratio.max(),
            "importance_weight_ess": ratio.sum().square() / (ratio.numel() * ratio.square().sum()),
            "residual_mean_square": mean_square.to(torch.float32).mean(),
            "sigma_b2_window": self.anova.sigma_b2.to(torch.float32),
            "sigma_w2_window": self.anova.sigma_w2.to(torch.float32),
            "sigma_b2": self.auto.sigma_b2,
            "sigma_w2": self.auto.sigma_w2,
            "alpha": self.auto.alpha,
            "optimal_noise_draws": self.auto.optimal,
        }

    # ------------------------------------------------------------------ checkpoints and plots
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue as if uninterrupted (CPU tensors and numbers).

        The current accounting window is included — the ANOVA sums and the timers' seconds and
        counts — so σ_b², σ_w² and auto-K after a resume equal the uninterrupted run's bit for bit.
        α is the exception: its seconds are wall clock (restored as measured, never reproducible).
        Reading the timers resolves CUDA events: one host sync, at checkpoint time.
        """
        cpu = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
        return {
            "distribution": self.distribution.state_dict(),
            "auto": self.auto.state_dict(),
            "adaptive": self.adaptive.state_dict() if self.adaptive is not None else None,
            "last_refresh": self._last_refresh,
            "guidance": self.guidance.state_dict(),
            "anova": self.anova.state_dict(),
            "timer": self.timer.state_dict(),
            "nonfinite": {"total": cpu(self._nonfinite_total), "window": cpu(self._nonfinite_window),
                          "rejected_at_window_start": self._rejected_at_window_start},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises ValueError when the state cannot belong to this estimator: another fixed K (see
        :meth:`AutoNoiseDraws.load_state_dict`), another proposal, weighting or stratification.
        A state from before the window was saved restarts the window (ANOVA, timers).
        """
        self.auto.load_state_dict(state["auto"])  # first: refuses another fixed K before anything changes
        self.distribution.load_state_dict(state["distribution"])
        if (state["adaptive"] is None) != (self.adaptive is None):
            raise ValueError("estimator checkpoint and this run disagree on the adaptive proposal")
        if self.adaptive is not None:
            self.adaptive.load_state_dict(state["adaptive"])
        self._last_refresh = state["last_refresh"]
        self.guidance.load_state_dict(state.get("guidance", {}))
        self.anova.reset()
        self.timer.reset()
        if state.get("anova") is not None:
            self.anova.load_state_dict(state["anova"], device=self.distribution.device)
        if state.get("timer") is not None:
            self.timer.load_state_dict(state["timer"])
        nonfinite = state.get("nonfinite") or {}
        device = self.distribution.device
        self._nonfinite_total = None if nonfinite.get("total") is None else nonfinite["total"].to(device)
        self._nonfinite_window = None if nonfinite.get("window") is None else nonfinite["window"].to(device)
        self._rejected_at_window_start = float(nonfinite.get("rejected_at_window_start", 0.0))

    def proposal_figure(self) -> "Figure":
        """matplotlib Figure of p, w, q and the adaptive m₂ estimate (see :mod:`carv3d.estimator.plots`)."""
        from carv3d.estimator.plots import proposal_figure

        return proposal_figure(self.distribution, self.adaptive)


def build_estimator(estimator_cfg: Any, alphas_cumprod: torch.Tensor, device: Any = None,
                    guidance_cfg: Any = None, particle: Any = None) -> ScoreDistillationEstimator:
    """The estimator an ``estimator`` config section describes (``carv3d.config.EstimatorConfig``).

    Every field is read from the typed section (its defaults live there, once); presets
    (``estimator.preset``) are resolved by ``carv3d.config.load_config`` before this is called.
    With ``noise_draws="auto"``, K starts at 4 (clamped to the bounds). ``upstream_samples`` (R) is
    the caller's: the estimator takes R from the upstream tensor. ``guidance_cfg`` is the
    ``guidance`` section (its ``type``); None = SDS. ``particle``: the trainable model of a guidance
    that has one (VSD: ``carv3d.teacher.lora.build_particle``).
    """
    cfg = estimator_cfg
    device = torch.device(device) if device is not None else alphas_cumprod.device
    distribution = TimestepDistribution(
        alphas_cumprod.to(device), t_min=float(cfg.t_min), t_max=float(cfg.t_max), weighting=str(cfg.weighting),
        proposal=str(cfg.proposal), defensive=float(cfg.adaptive_defensive_mixture), device=device,
    )
    every = int(cfg.auto_every)
    noise_draws: Union[int, str] = cfg.noise_draws
    auto = None
    if noise_draws == "auto":
        auto = AutoNoiseDraws(4, min_draws=int(cfg.min_noise_draws), max_draws=int(cfg.max_noise_draws), every=every,
                              smoothing=float(cfg.auto_smoothing))
    adaptive = None
    if distribution.proposal == "adaptive":
        adaptive = AdaptiveSecondMoment(distribution.num_timesteps, int(cfg.adaptive_bins), device=device)
    return ScoreDistillationEstimator(
        distribution,
        noise_draws=noise_draws,
        stratified=bool(cfg.stratified),
        gradient_clip=float(cfg.gradient_clip),
        auto=auto,
        adaptive=adaptive,
        adaptive_refresh_every=int(cfg.adaptive_refresh_every),
        t_max_schedule=[list(point) for point in cfg.t_max_schedule],
        accounting_every=every,
        timer=StepTimer(device),
        guidance=build_guidance(guidance_cfg, particle),
    )
