"""Timestep distributions on a diffusion teacher's discrete grid: nominal p, weighting w, proposal q.

The score-distillation gradient of one upstream sample x is an expectation over a *discrete*
timestep t ∈ {0, …, T−1} and a Gaussian noise ε:

.. math::

    g(x) = \\sum_t p(t)\\, w(t)\\, E_ε[\\hat ε(x_t, t) − ε],
    \\qquad x_t = \\sqrt{\\bar α_t}\\, x + \\sqrt{1 − \\bar α_t}\\, ε,

with p the nominal distribution (uniform on the integers [min_step, max_step]) and w a weighting.
Drawing t from a proposal q instead and multiplying by the importance weight p(t)/q(t) leaves the
expectation unchanged for every q that is positive wherever p·w is:

.. math::

    \\sum_t q(t) \\frac{p(t)}{q(t)} w(t)\\, r(t) = \\sum_t p(t)\\, w(t)\\, r(t).

Because t is discrete this identity is exact — no quadrature error — provided the *same* table q
is used to draw t and to weight it. :class:`TimestepDistribution` holds the tables (p, w, q, the
cumulative sum of q and p/q) and draws from them, so every variant it offers is exactly unbiased.

Proposals (``build_proposal``):

* ``uniform``: q = p. Drawn with ``torch.randint`` when not stratified (bit-identical to threestudio).
* ``teacher-weight``: q ∝ p·w (Bettencourt et al. 2026). The weighted integrand becomes
  (p/q)·w·r = Z·r with Z = Σ_t p(t)w(t): a constant times the residual, so weights cannot explode.
* ``adaptive``: q ∝ p·w·sqrt(m₂(bin(t))) with m₂ an online estimate of E‖ε̂ − ε‖² per timestep bin
  (:mod:`carv3d.estimator.adaptive`), mixed with teacher-weight by a defensive mixture.

Tables p, q, the CDF and p/q are float64; w keeps the dtype of ``alphas_cumprod`` (float32 for every
diffusers scheduler), the dtype threestudio multiplies with.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from carv3d.estimator.adaptive import defensive_mixture

logger = logging.getLogger("carv3d")

WEIGHTINGS = ("sds", "uniform", "fantasia3d")
PROPOSALS = ("uniform", "teacher-weight", "adaptive")


def step_range(num_timesteps: int, t_min: float, t_max: float) -> tuple[int, int]:
    """Integer timestep bounds from fractions, exactly as threestudio computes them.

    ``min_step = int(T·t_min)``, ``max_step = int(T·t_max)`` (both inclusive; ``int`` truncates),
    and max_step is capped at T − 1. For T = 1000 and (0.02, 0.98) this gives (20, 980), and draws
    are ``torch.randint(min_step, max_step + 1, ...)``.
    """
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1 (fractions of the timesteps); got t_min={t_min}, t_max={t_max}")
    min_step = int(num_timesteps * t_min)
    max_step = min(int(num_timesteps * t_max), num_timesteps - 1)
    if max_step < min_step:
        raise ValueError(f"t range [{t_min}, {t_max}] holds no integer timestep of a {num_timesteps}-step teacher")
    return min_step, max_step


def nominal_distribution(num_timesteps: int, min_step: int, max_step: int, device: Any = None) -> torch.Tensor:
    """Uniform p on the integers [min_step, max_step]: p(t) = 1/(max_step − min_step + 1) there, 0 elsewhere.

    Returns:
        p: (T,) float64, sums to 1.
    """
    p = torch.zeros(num_timesteps, dtype=torch.float64, device=device)
    p[min_step : max_step + 1] = 1.0 / (max_step - min_step + 1)
    return p


def timestep_weighting(name: str, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The weighting w(t) of the score-distillation residual, on the whole grid.

    * ``sds``: w = 1 − ᾱ_t (DreamFusion's σ_t², threestudio's default).
    * ``uniform``: w = 1.
    * ``fantasia3d``: w = sqrt(ᾱ_t)·(1 − ᾱ_t), threestudio's ``weighting_strategy == "fantasia3d"``
      (``self.alphas[t] ** 0.5 * (1 - self.alphas[t])`` in
      threestudio/models/guidance/stable_diffusion_guidance.py).

    Args:
        name: one of ``WEIGHTINGS``.
        alphas_cumprod: ᾱ: (T,), the teacher's cumulative product of alphas.

    Returns:
        w: (T,) in the dtype and on the device of ``alphas_cumprod``, computed with the same
        arithmetic as threestudio so the sds weighting is bit-identical.
    """
    a = alphas_cumprod
    if name == "sds":
        return 1 - a
    if name == "uniform":
        return torch.ones_like(a)
    if name == "fantasia3d":
        return a**0.5 * (1 - a)
    raise ValueError(f"unknown weighting '{name}'; expected one of {', '.join(WEIGHTINGS)}")


def build_proposal(
    kind: str,
    p: torch.Tensor,
    w: torch.Tensor,
    adaptive_scale: Optional[torch.Tensor] = None,
    defensive: float = 0.3,
) -> torch.Tensor:
    """The proposal q on the grid, normalised to sum 1.

    .. math::

        q_{uniform} = p, \\qquad q_{tw} = \\frac{p\\,w}{\\sum_t p\\,w}, \\qquad
        q_{adaptive} = (1 − λ) \\frac{p\\,w\\,s}{\\sum_t p\\,w\\,s} + λ\\, q_{tw},

    with s(t) = ``adaptive_scale`` (sqrt of the per-bin second moment of the residual) and
    λ = ``defensive``. Where p·w = 0 (for example ᾱ_t = 0 with the fantasia3d weighting) q is 0 too:
    the integrand p·w·r vanishes there, so dropping those t keeps the estimator unbiased.

    Args:
        kind: one of ``PROPOSALS``.
        p: (T,) nominal distribution.
        w: (T,) weighting (any float dtype; non-negative).
        adaptive_scale: (T,) non-negative, only for ``adaptive``; None means all ones.
        defensive: λ ∈ (0, 1], the teacher-weight share of the adaptive mixture.

    Returns:
        q: (T,) float64.
    """
    p = p.to(torch.float64)
    pw = p * w.to(device=p.device, dtype=torch.float64)  # w ≥ 0 for every weighting here
    q_teacher = pw / pw.sum()
    if kind == "uniform":
        return p.clone()  # p is already normalised; q = p exactly makes p/q = 1 exactly
    if kind == "teacher-weight":
        return q_teacher
    if kind == "adaptive":
        if adaptive_scale is None:
            return q_teacher
        scale = adaptive_scale.to(device=p.device, dtype=torch.float64)
        pws = torch.where(pw > 0, pw * scale, torch.zeros_like(pw))  # 0·inf would be NaN where p·w = 0
        total = pws.sum()
        q_adaptive = torch.where(total > 0, pws / total.clamp_min(torch.finfo(torch.float64).tiny), q_teacher)
        return defensive_mixture(q_adaptive, q_teacher, defensive)
    raise ValueError(f"unknown proposal '{kind}'; expected one of {', '.join(PROPOSALS)}")


def proposal_is_valid(q: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    """Whether q can draw and weight timesteps without bias: () bool tensor (no host sync).

    q must be finite and ≥ 0, sum to 1 (to 1e-9), and be positive wherever p·w is: the identity
    Σ_t q·(p/q)·w·r = Σ_t p·w·r needs q(t) > 0 at every t the target puts weight on.
    """
    finite = torch.isfinite(q).all()
    safe = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
    return (finite & (safe >= 0).all() & ((safe.sum() - 1.0).abs() < 1e-9)
            & ((safe > 0) | ~(pw > 0)).all())


def check_alphas_cumprod(alphas_cumprod: torch.Tensor) -> None:
    """ᾱ must be a 1-D tensor of finite values in [0, 1] (one host sync; construction time only).

    A NaN would make p·w NaN, the teacher-weight proposal fall back silently and every gradient
    zero; a value outside [0, 1] makes sqrt(1 − ᾱ) or sqrt(ᾱ) NaN in x_t.
    """
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 1:
        raise ValueError(f"alphas_cumprod must be a 1-D tensor (T,); got shape {tuple(alphas_cumprod.shape)}")
    a = alphas_cumprod.detach().to(torch.float64)
    bad = ~torch.isfinite(a) | (a < 0) | (a > 1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"alphas_cumprod must be finite and in [0, 1]; {int(bad.sum())} of {a.numel()} values are not "
                         f"(first at t = {first}: {float(a[first])}). Check the teacher's noise scheduler.")


def check_adaptive_scale(scale: torch.Tensor, num_timesteps: int) -> None:
    """s(t) must be (T,), finite and ≥ 0 (one host sync: a user-facing check, not on the step path)."""
    if tuple(scale.shape) != (num_timesteps,):
        raise ValueError(f"the adaptive scale must have shape ({num_timesteps},); got {tuple(scale.shape)}")
    s = scale.detach().to(torch.float64)
    if not bool((torch.isfinite(s) & (s >= 0)).all()):
        raise ValueError("the adaptive scale must be finite and >= 0 at every timestep: an infinite value would put every "
                         "draw at that timestep, a negative one would make q negative")


class TimestepDistribution:
    """Tables p, w, q on the teacher's grid, inverse-CDF draws from q, and importance weights p/q.

    Draws (all made on the generator's device, then moved to the tables' device):

    * :meth:`sample_independent`: n i.i.d. draws from q. For the ``uniform`` proposal this is
      ``torch.randint(min_step, max_step + 1, (n,))``, threestudio's draw, so plain SDS reproduces
      bit for bit; otherwise u ~ U[0, 1) (``torch.rand``, float64) and t = CDF_q⁻¹(u).
    * :meth:`sample_stratified`: per group, B strata of equal q-probability with independent jitter,
      u_b = (b + ξ_b)/B, ξ_b ~ U[0, 1), t_b = CDF_q⁻¹(u_b) (paper Eq. 17). The average of any h(t_b)
      over the B strata is unbiased for E_q[h]: the strata tile [0, 1).

    The discrete inverse CDF is t = min{t : C(t) > u} with C(t) = Σ_{s≤t} q(s), i.e.
    ``searchsorted(C, u, right=True)``, so P(t) = C(t) − C(t−1) = q(t) exactly, and timesteps with
    q(t) = 0 are never drawn.

    Args:
        alphas_cumprod: ᾱ: (T,), the teacher's noise schedule.
        t_min, t_max: the nominal range as fractions of T (see :func:`step_range`).
        weighting: one of ``WEIGHTINGS``.
        proposal: one of ``PROPOSALS``.
        defensive: λ of the adaptive proposal's defensive mixture.
        device: where the tables live (default: the device of ``alphas_cumprod``).
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        t_min: float = 0.02,
        t_max: float = 0.98,
        weighting: str = "sds",
        proposal: str = "uniform",
        defensive: float = 0.3,
        device: Any = None,
    ) -> None:
        if proposal not in PROPOSALS:
            raise ValueError(f"unknown proposal '{proposal}'; expected one of {', '.join(PROPOSALS)}")
        if not 0.0 < defensive <= 1.0:
            raise ValueError(f"the defensive mixture weight must be in (0, 1]; got {defensive}")
        check_alphas_cumprod(alphas_cumprod)
        device = torch.device(device) if device is not None else alphas_cumprod.device
        self.alphas_cumprod = alphas_cumprod.detach().to(device)
        self.num_timesteps = int(self.alphas_cumprod.shape[0])
        self.weighting = weighting
        self.proposal = proposal
        self.defensive = float(defensive)
        self.device = device
        self.w = timestep_weighting(weighting, self.alphas_cumprod)
        self.adaptive_scale = torch.ones(self.num_timesteps, dtype=torch.float64, device=device)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.rejected_proposals = torch.zeros((), dtype=torch.float64, device=device)  # see _rebuild
        self._rebuild()

    # ------------------------------------------------------------------ tables
    def _rebuild(self) -> None:
        """Rebuild p, q, the CDF and p/q, with q checked by :func:`proposal_is_valid`.

        A q that fails the check (non-finite or negative adaptive scale, a rounding catastrophe) is
        replaced by the teacher-weight proposal (by p if that fails too, which cannot happen for a
        checked ᾱ) and counted in ``rejected_proposals``. The choice is made with ``torch.where``,
        so a rebuild never synchronises with the host; the count is read when someone logs it.
        """
        self.min_step, self.max_step = step_range(self.num_timesteps, self.t_min, self.t_max)
        self.p = nominal_distribution(self.num_timesteps, self.min_step, self.max_step, self.device)
        scale = self.adaptive_scale if self.proposal == "adaptive" else None
        candidate = build_proposal(self.proposal, self.p, self.w, scale, self.defensive)
        pw = self.p * self.w.to(torch.float64)
        q_teacher = build_proposal("teacher-weight", self.p, self.w)
        valid = proposal_is_valid(candidate, pw)
        fallback = torch.where(proposal_is_valid(q_teacher, pw), q_teacher, self.p)
        self.q = torch.where(valid, candidate, fallback)
        self.rejected_proposals = self.rejected_proposals + (~valid).to(torch.float64)
        # Tensor ops only (no host sync), so a rebuild is cheap enough to happen at any step.
        positive = self.q > 0
        grid = torch.arange(self.num_timesteps, device=self.device)
        self.last_support = positive.long().cumsum(0).argmax()  # last t with q > 0: (), long
        cdf = torch.cumsum(self.q, 0)
        self.cdf = torch.where(grid >= self.last_support, torch.ones_like(cdf), cdf)  # no rounding gap at 1
        tiny = torch.finfo(torch.float64).tiny
        self.ratio = torch.where(positive, self.p / self.q.clamp_min(tiny), torch.zeros_like(self.p))  # 1.0 where q = p

    def set_range(self, t_min: Optional[float] = None, t_max: Optional[float] = None) -> None:
        """Change the nominal range (fractions of T); p, q and the CDF are rebuilt when the integer
        range [min_step, max_step] changes."""
        t_min = self.t_min if t_min is None else float(t_min)
        t_max = self.t_max if t_max is None else float(t_max)
        steps = step_range(self.num_timesteps, t_min, t_max)
        self.t_min, self.t_max = t_min, t_max
        if steps != (self.min_step, self.max_step):
            self._rebuild()

    def set_t_max(self, t_max: float) -> None:
        """Schedule hook: lower or raise the top of p's range (e.g. ProlificDreamer's 0.98 → 0.5)."""
        self.set_range(t_max=t_max)

    def set_adaptive_scale(self, scale: torch.Tensor, validate: bool = True) -> None:
        """Per-timestep factor s(t) ≥ 0 of the adaptive proposal q ∝ p·w·s; rebuilds the tables.

        Args:
            scale: (T,) finite, ≥ 0.
            validate: raise ValueError for a wrong shape, a non-finite or a negative value (one
                host sync). The estimator's own refresh passes False: its scale is finite and ≥ 0 by
                construction, and the rebuild's tensor-op check still replaces an invalid q.
        """
        if validate:
            check_adaptive_scale(scale, self.num_timesteps)
        self.adaptive_scale = scale.detach().to(device=self.device, dtype=torch.float64).clone()
        if self.proposal == "adaptive":
            self._rebuild()

    @property
    def teacher_weight_proposal(self) -> torch.Tensor:
        """q_tw = p·w / Σ p·w: (T,) float64."""
        return build_proposal("teacher-weight", self.p, self.w)

    # ------------------------------------------------------------------ lookups
    def importance_weight(self, t: torch.Tensor) -> torch.Tensor:
        """p(t)/q(t) for drawn timesteps t: (...,) long → (...,) float64."""
        return self.ratio[t]

    def coefficient(self, t: torch.Tensor) -> torch.Tensor:
        """(p/q)(t)·w(t) in w's dtype: the factor that multiplies the residual ε̂ − ε.

        Computed in float64 and rounded once; with q = p the ratio is exactly 1, so this is w(t)
        bit for bit.
        """
        return (self.ratio[t] * self.w[t].to(torch.float64)).to(self.w.dtype)

    def expectation(self, values: torch.Tensor) -> torch.Tensor:
        """Σ_t p(t)·w(t)·values[t]: the exact target of the estimator for a per-t quantity.

        Args:
            values: (T, ...) any float tensor.

        Returns:
            (...,) float64.
        """
        pw = self.p * self.w.to(torch.float64)
        return torch.tensordot(pw, values.to(device=self.device, dtype=torch.float64), dims=1)

    # ------------------------------------------------------------------ draws
    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """t = min{t : C(t) > u} for u ∈ [0, 1): (...,) float → (...,) long on the tables' device."""
        u = u.to(device=self.device, dtype=torch.float64)
        t = torch.searchsorted(self.cdf, u.reshape(-1), right=True).reshape(u.shape)
        return t.clamp_(max=self.last_support)

    def sample_independent(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n i.i.d. timesteps from q: (n,) long.

        Random draws: ``randint`` (uniform proposal) or one ``rand((n,), float64)``.
        """
        if self.proposal == "uniform":
            t = torch.randint(self.min_step, self.max_step + 1, (n,), generator=generator, device=generator.device)
            return t.to(self.device)
        u = torch.rand((n,), generator=generator, device=generator.device, dtype=torch.float64)
        return self.inverse_cdf(u)

    def stratified_uniforms(
        self, n_per_group: int, n_groups: int, generator: torch.Generator, shuffle: bool = False
    ) -> torch.Tensor:
        """u[g, b] = (b + ξ_gb)/B with ξ ~ U[0, 1) independent: (n_groups, n_per_group) float64.

        With ``shuffle`` the strata of each group are put in a uniformly random order (argsort of a
        second ``rand`` of the same shape): each column then sees a uniformly random stratum, so
        u[g, b] alone is U[0, 1) — needed when the columns are not exchangeable (K = 1: strata spread
        across R different upstream samples).

        Random draws, in order: ``rand((G, B), float64)`` (jitter), then with shuffle
        ``rand((G, B), float64)`` (permutation keys).
        """
        B = n_per_group
        xi = torch.rand((n_groups, B), generator=generator, device=generator.device, dtype=torch.float64)
        strata = torch.arange(B, device=generator.device, dtype=torch.float64).expand(n_groups, B)
        u = (strata + xi) / B
        if shuffle and B > 1:
            keys = torch.rand((n_groups, B), generator=generator, device=generator.device, dtype=torch.float64)
            u = torch.gather(u, 1, keys.argsort(dim=1))
        return u.clamp_(max=1.0 - torch.finfo(torch.float64).eps / 2)

    def sample_stratified(
        self, n_per_group: int, n_groups: int, generator: torch.Generator, shuffle: bool = False
    ) -> torch.Tensor:
        """Stratified inverse-CDF draws: exactly one t per stratum of equal q-probability, per group.

        Returns:
            t: (n_groups, n_per_group) long; t[g, b] = CDF_q⁻¹(u[g, b]) with u from
            :meth:`stratified_uniforms`.
        """
        return self.inverse_cdf(self.stratified_uniforms(n_per_group, n_groups, generator, shuffle))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "t_min": self.t_min,
            "t_max": self.t_max,
            "weighting": self.weighting,
            "proposal": self.proposal,
            "adaptive_scale": self.adaptive_scale.cpu(),
            "rejected_proposals": self.rejected_proposals.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("weighting", "proposal"):
            if state[key] != getattr(self, key):
                raise ValueError(f"estimator checkpoint has {key} '{state[key]}' but this run uses '{getattr(self, key)}'")
        scale = state["adaptive_scale"].to(device=self.device, dtype=torch.float64)
        if not bool((torch.isfinite(scale) & (scale >= 0)).all()):  # load time: a sync is fine
            logger.warning("estimator checkpoint holds a non-finite or negative adaptive scale: it restarts at 1 "
                           "(teacher-weight proposal until the next adaptive refresh)")
            scale = torch.ones_like(scale)
        self.adaptive_scale = scale
        self.rejected_proposals = torch.as_tensor(state.get("rejected_proposals", 0.0), dtype=torch.float64).to(self.device)
        self.t_min, self.t_max = float(state["t_min"]), float(state["t_max"])
        self._rebuild()
