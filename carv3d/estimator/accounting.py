"""Compute-aware accounting: streaming variances, the two-level (ANOVA) split, K*, auto-K, ECM.

The two-stage model. A step averages R upstream samples (renders), each with K draws (t, ε). Let
f_rk be the weighted residual of draw k of render r. With the between-render variance
σ_b² = tr Cov(E[f | render]) and the within-render variance σ_w² = E tr Cov(f | render),

.. math::

    Var(\\hat g_{R,K}) = \\frac{1}{R}\\Big(σ_b² + \\frac{σ_w²}{K}\\Big),
    \\qquad cost = R\\,(α + K)   \\text{ (in teacher-draw units, α = upstream cost / one draw)}.

Var·cost = (σ_b² + σ_w²/K)(α + K) does not depend on R; d/dK = σ_b² − α·σ_w²/K² = 0 gives

.. math::

    K^* = \\sqrt{α\\, σ_w² / σ_b²}.

Both σ² come from the K draws of each render by a one-way analysis of variance (:class:`AnovaSplit`,
in :mod:`carv3d.estimator.anova`).
With K = 1 there is a single draw per render, so the spread *within* a render is not observable and
only the sum σ_b² + σ_w² is: auto-K therefore never goes below K = 2.

The latent-space caveat. In training the rows are latent gradients (the weighted residual of each
draw), not parameter gradients: σ² here are latent-space proxies for the parameter-space variances
that `carv3d variance` measures. :class:`AnovaSplit` takes any vectors, so that command can feed it
parameter gradients.

Stratified draws. The K draws of a render are then not i.i.d. (one per stratum), and the one-way
split reads σ_b² low — by the whole spread of the t-profile across strata over K − 1, negative at
small K — so auto-K settles above its optimum. :class:`AnovaSplit` with ``stratified=True`` estimates
the within term from collapsed strata after removing each stratum's mean (its docstring has the
formulas and the bias that is left). Measured exactly on a closed-form problem
(``python scripts/stratified_accounting.py``: ε̂ = 0.9·x_t, x = m + s·z, D = 64, teacher-weight q,
true σ_b² = 0.752): one-way σ̂_b² = −0.287 / 0.296 / 0.543 at K = 2 / 4 / 8, collapsed 0.544 /
0.719 / 0.747; auto-K's fixed point was the exact optimum K in all 12 cases tried (2 proposals ×
2 problems × α = 20, 60, 150), against up to 1.5× the optimum (K = 17 for 11; 0 to +3.0 %
variance × cost) with the one-way split. Here σ_w² is the within-render variance *as the stratified
average sees it*, K·Var(ḡ_r | x_r), so (σ_b² + σ_w²/K)/R is the variance of the step at this K.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Union

import torch

from carv3d.estimator.anova import AnovaSplit, collapsed_contrast_matrix, collapsed_strata  # noqa: F401  (re-exported)
from carv3d.estimator.anova import _masked_merge
from carv3d.estimator.timing import StepTimer  # noqa: F401  (re-exported: the cost side of the accounting)

logger = logging.getLogger("carv3d")

Number = Union[float, torch.Tensor]


class Welford:
    """Streaming mean and trace of the covariance of vectors (Welford; Chan et al.'s batch merge).

    After rows x_1..x_n (each with frequency weight c_i, W = Σc_i) it holds

    .. math::

        \\bar x = \\frac{1}{W}\\sum_i c_i x_i, \\qquad M_2 = \\sum_i c_i ‖x_i − \\bar x‖²,

    and ``variance`` = M₂/(W − 1), the unbiased trace of the covariance for unit weights. A batch
    (mean m_B, M₂_B, weight W_B) merges exactly: δ = m_B − x̄, x̄ += δ·W_B/W, M₂ += M₂_B + ‖δ‖²·W_A·W_B/W.

    A row with a non-finite value is left out (and counted in ``dropped``): one inf would otherwise
    make the mean and M₂ non-finite for good. Which rows are kept is decided on the device, so W
    (``count``) and ``dropped`` are () float64 tensors and updates never synchronise with the host.
    """

    def __init__(self) -> None:
        self._state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (W, x̄, M₂)
        self.dropped: Union[float, torch.Tensor] = 0.0

    @property
    def count(self) -> Union[float, torch.Tensor]:
        """W, the total weight of the kept rows: () float64 (0.0 before any row)."""
        return 0.0 if self._state is None else self._state[0]

    @property
    def mean(self) -> Optional[torch.Tensor]:
        """x̄: (D,) float64, None before any row."""
        return None if self._state is None else self._state[1]

    @property
    def m2(self) -> Optional[torch.Tensor]:
        """M₂: () float64, None before any row."""
        return None if self._state is None else self._state[2]

    def update(self, x: torch.Tensor, weight: float = 1.0) -> None:
        """Add rows x: (B, D) (or one row (D,)), each with frequency weight ``weight``."""
        x = x.detach().to(torch.float64)
        x = x.reshape(1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1)
        if float(weight) * x.shape[0] <= 0:
            return
        keep = torch.isfinite(x).all(1)
        self._state = _masked_merge(self._state, x, keep, float(weight))
        self.dropped = self.dropped + (~keep).sum().to(torch.float64)

    @property
    def variance(self) -> torch.Tensor:
        """tr Cov = M₂/(W − 1) (NaN with W ≤ 1): () float64."""
        if self._state is None:
            return torch.tensor(float("nan"), dtype=torch.float64)
        count, _, m2 = self._state
        return torch.where(count > 1, m2 / (count - 1), torch.full_like(m2, float("nan")))

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def optimal_noise_draws(alpha: float, sigma_w2: float, sigma_b2: float) -> float:
    """K* = sqrt(α·σ_w²/σ_b²), the minimiser of (σ_b² + σ_w²/K)(α + K) over real K > 0.

    Returns inf when σ_b² ≤ 0 (reuse is free: as many draws as allowed) and 0 when σ_w² ≤ 0 or α ≤ 0.
    """
    if sigma_b2 <= 0:
        return math.inf
    if sigma_w2 <= 0 or alpha <= 0:
        return 0.0
    return math.sqrt(alpha * sigma_w2 / sigma_b2)


def variance_cost_product(k: float, alpha: float, sigma_w2: float, sigma_b2: float) -> float:
    """(σ_b² + σ_w²/K)·(α + K): R·Var × cost/R, the quantity K* minimises."""
    return (sigma_b2 + sigma_w2 / k) * (alpha + k)


def best_integer_noise_draws(alpha: float, sigma_w2: float, sigma_b2: float, min_draws: int, max_draws: int) -> int:
    """The integer K in [min_draws, max_draws] with the smallest (σ_b² + σ_w²/K)(α + K).

    The product is convex in K > 0, so the best integer is ⌊K*⌋ or ⌈K*⌉ (clamped to the bounds).
    """
    k_star = optimal_noise_draws(alpha, sigma_w2, sigma_b2)
    if math.isinf(k_star):
        return max_draws
    candidates = {min(max(c, min_draws), max_draws) for c in (math.floor(k_star), math.ceil(k_star))}
    candidates = {c for c in candidates if c >= 1} or {min_draws}
    return min(sorted(candidates), key=lambda k: variance_cost_product(k, alpha, sigma_w2, sigma_b2))


class AutoNoiseDraws:
    """Chooses K online from the measured cost ratio α and the ANOVA split (``noise_draws: auto``).

    Every ``every`` steps (and never more often) :meth:`update` takes the window's σ_b², σ_w² and α,
    smooths each exponentially, s ← β·s + (1 − β)·new (β = ``smoothing``; the first value is taken as
    is; NaN inputs are skipped), and sets K to :func:`best_integer_noise_draws` of the smoothed values
    within [min_draws, max_draws], moving at most a factor ``max_change_factor`` per window (a
    window whose σ_b² reads as zero — K* = ∞ — then doubles K instead of jumping to the bound).
    With ``adapt=False`` it only tracks the values and K* for logging.
    A change of K is logged on the ``carv3d`` logger.

    K = 1 cannot be measured (no within-render spread), so with ``adapt`` the lower bound is at least 2.
    """

    def __init__(
        self,
        noise_draws: int,
        min_draws: int = 2,
        max_draws: int = 16,
        every: int = 50,
        smoothing: float = 0.9,
        adapt: bool = True,
        max_change_factor: float = 2.0,
    ) -> None:
        if adapt and min_draws < 2:
            logger.info("auto noise draws: lower bound raised from %d to 2 (K = 1 cannot separate σ_w² from σ_b²)", min_draws)
            min_draws = 2
        if not 1 <= min_draws <= max_draws:
            raise ValueError(f"need 1 <= min_noise_draws <= max_noise_draws; got {min_draws}, {max_draws}")
        if every < 1 or not 0.0 <= smoothing < 1.0:
            raise ValueError(f"need every >= 1 and 0 <= smoothing < 1; got {every}, {smoothing}")
        self.adapt = adapt
        self.max_change_factor = float(max_change_factor)
        self.min_draws, self.max_draws = int(min_draws), int(max_draws)
        self.noise_draws = min(max(int(noise_draws), self.min_draws), self.max_draws) if adapt else int(noise_draws)
        self.every = int(every)
        self.smoothing = float(smoothing)
        self.sigma_b2 = math.nan
        self.sigma_w2 = math.nan
        self.alpha = math.nan
        self.optimal = math.nan  # K* of the smoothed values (real)
        self.last_update_step: Optional[int] = None
        self.changes = 0

    def due(self, step: int) -> bool:
        """True when at least ``every`` steps have passed since the window started."""
        if self.last_update_step is None:
            self.last_update_step = step
            return False
        return step - self.last_update_step >= self.every

    def _smooth(self, old: float, new: float) -> float:
        if not math.isfinite(new):
            return old
        if not math.isfinite(old):
            return new
        return self.smoothing * old + (1.0 - self.smoothing) * new

    def update(self, step: int, sigma_b2: float, sigma_w2: float, alpha: float) -> int:
        """Fold in one window's measurements; returns the K to use from now on."""
        self.last_update_step = step
        self.sigma_b2 = self._smooth(self.sigma_b2, float(sigma_b2))
        self.sigma_w2 = self._smooth(self.sigma_w2, float(sigma_w2))
        self.alpha = self._smooth(self.alpha, float(alpha))
        if not all(math.isfinite(v) for v in (self.sigma_b2, self.sigma_w2, self.alpha)):
            return self.noise_draws
        sb2 = max(self.sigma_b2, 0.0)
        self.optimal = optimal_noise_draws(self.alpha, self.sigma_w2, sb2)
        if self.adapt:
            new = best_integer_noise_draws(self.alpha, self.sigma_w2, sb2, self.min_draws, self.max_draws)
            lowest = max(self.min_draws, math.ceil(self.noise_draws / self.max_change_factor))
            highest = min(self.max_draws, math.floor(self.noise_draws * self.max_change_factor))
            new = min(max(new, lowest), highest)
            if new != self.noise_draws:
                logger.info(
                    "step %d: noise draws K %d -> %d (K* = %.2f from alpha = %.3g, sigma_w2 = %.3g, sigma_b2 = %.3g)",
                    step, self.noise_draws, new, self.optimal, self.alpha, self.sigma_w2, sb2,
                )
                self.noise_draws = new
                self.changes += 1
        return self.noise_draws

    def state_dict(self) -> dict[str, Any]:
        keys = ("noise_draws", "sigma_b2", "sigma_w2", "alpha", "optimal", "last_update_step", "changes")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            ValueError: this controller has a fixed K (``adapt=False``) and the state holds another K.
                Loading it would silently switch the run's K (issue 21); resume with the K the state
                was saved with, or start a new run to change it.
        """
        if not self.adapt and int(state["noise_draws"]) != self.noise_draws:
            raise ValueError(f"estimator checkpoint was saved with K = {int(state['noise_draws'])} noise draws, but this "
                             f"estimator fixes K = {self.noise_draws} (estimator.noise_draws): resume with "
                             f"noise_draws={int(state['noise_draws'])}, or start a new run to change K")
        keys = ("noise_draws", "sigma_b2", "sigma_w2", "alpha", "optimal", "last_update_step", "changes")
        for key in keys:
            if key in state:
                setattr(self, key, state[key])
        if self.adapt:
            self.noise_draws = min(max(int(self.noise_draws), self.min_draws), self.max_draws)


def ecm(var_baseline: Number, cost_baseline: Number, var_method: Number, cost_method: Number) -> Number:
    """Effective compute multiplier: how much less compute the method needs for the baseline's variance.

    ECM = (Var_b·cost_b)/(Var_m·cost_m). Variance of an average falls as 1/compute, so matching the
    baseline's variance costs the method Var_m·cost_m/Var_b per baseline step's worth; ECM > 1 means
    the method is cheaper. The paper's baseline is uniform t with R = 2, K = 1.
    """
    return (var_baseline * cost_baseline) / (var_method * cost_method)


def relative_efficiency(var_uniform: Number, var_method: Number) -> Number:
    """RE = Var_uniform/Var_method at the same (R, K): the variance gain of the timestep proposal alone."""
    return var_uniform / var_method
