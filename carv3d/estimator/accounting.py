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

Both σ² come from the K draws of each render by a one-way analysis of variance (:class:`AnovaSplit`).
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

    Accumulators are float64 tensors on the rows' device; ``count`` is a Python float (the weights are
    known on the host), so updates never synchronise with the host.
    """

    def __init__(self) -> None:
        self.count = 0.0
        self.mean: Optional[torch.Tensor] = None  # (D,) float64
        self.m2: Optional[torch.Tensor] = None  # () float64

    def update(self, x: torch.Tensor, weight: float = 1.0) -> None:
        """Add rows x: (B, D) (or one row (D,)), each with frequency weight ``weight``."""
        x = x.detach().to(torch.float64)
        x = x.reshape(1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1)
        w_b = float(weight) * x.shape[0]
        if w_b <= 0:
            return
        mean_b = x.mean(0)
        m2_b = float(weight) * (x - mean_b).pow(2).sum()
        if self.mean is None:
            self.count, self.mean, self.m2 = w_b, mean_b, m2_b
            return
        assert self.m2 is not None
        total = self.count + w_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (w_b / total)
        self.m2 = self.m2 + m2_b + delta.pow(2).sum() * (self.count * w_b / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """tr Cov = M₂/(W − 1) (NaN with W ≤ 1): () float64."""
        if self.m2 is None or self.count <= 1:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.m2 / (self.count - 1)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def _masked_merge(state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rows: torch.Tensor,
                  keep: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of the kept rows, each with frequency weight ``weight``, into (W, x̄, M₂).

    The batch's W_B = weight·#kept, m_B = mean of the kept rows and M₂_B = weight·Σ_kept ‖x_i − m_B‖²
    merge exactly as in :class:`Welford`. Tensor ops only: a dropped row (NaN and inf included)
    contributes nothing, a batch with no kept row leaves the state unchanged, and W is a tensor, so
    nothing is read on the host. For all rows kept the arithmetic is :class:`Welford`'s, operation
    for operation (the first merge into zeros reproduces its first assignment exactly).

    Args:
        state: (W: (), x̄: (D,), M₂: ()) float64, or None for empty.
        rows: (G, D) float64.
        keep: (G,) bool.
        weight: the frequency weight of every kept row.
    """
    if state is None:
        zero = torch.zeros((), dtype=torch.float64, device=rows.device)
        state = (zero, torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device), zero)
    count, mean, m2 = state
    mask = keep[:, None]
    kept = keep.sum().to(torch.float64)
    w_b = kept * weight
    mean_b = torch.where(mask, rows, 0.0).sum(0) / kept.clamp_min(1.0)  # = rows.mean(0) when all are kept
    m2_b = weight * torch.where(mask, (rows - mean_b).pow(2), 0.0).sum()
    total = count + w_b
    safe_total = total.clamp_min(torch.finfo(torch.float64).tiny)  # 0 only when nothing was ever kept
    delta = mean_b - mean
    return total, mean + delta * (w_b / safe_total), m2 + m2_b + delta.pow(2).sum() * (count * w_b / safe_total)


def collapsed_strata(K: int) -> list[list[int]]:
    """Adjacent strata collapsed in pairs, the last three together when K is odd: K = 5 → [[0, 1], [2, 3, 4]]."""
    groups = [[k, k + 1] for k in range(0, K - 1, 2)]
    if K % 2 and groups:
        groups[-1].append(K - 1)
    return groups


def collapsed_contrast_matrix(K: int, device: Any = None) -> torch.Tensor:
    """C: (K, K) float64 with z = C·y the scaled within-collapsed-group deviations of one render.

    For collapsed group g of n_g strata, z_k = sqrt(n_g/(n_g − 1))·(y_k − ȳ_g) for k in g, so
    ‖z‖² = Σ_g n_g·SS_g/(n_g − 1) with SS_g = Σ_{k∈g} ‖y_k − ȳ_g‖². Built with device ops (no
    host-to-device copy, which would synchronise on CUDA).
    """
    if K < 2:
        raise ValueError(f"collapsed strata need K >= 2; got {K}")
    k = torch.arange(K, device=device)
    group = torch.div(k, 2, rounding_mode="floor").clamp(max=K // 2 - 1)  # the last three share a group when K is odd
    same = (group[:, None] == group[None, :]).to(torch.float64)  # (K, K)
    size = same.sum(1, keepdim=True)  # n_g of each row's group
    return (size / (size - 1)).sqrt() * (torch.eye(K, dtype=torch.float64, device=device) - same / size)


class AnovaSplit:
    """Online one-way ANOVA of vectors in groups: σ_b² (between groups) and σ_w² (within), as traces.

    Groups are renders, members are the K draws of a render. For G groups of sizes n_i (N = Σ n_i),
    group means ȳ_i and the grand mean ȳ (weighted by n_i):

    .. math::

        SS_W = \\sum_i \\sum_j ‖y_{ij} − \\bar y_i‖², \\qquad MS_W = SS_W / (N − G),
        \\qquad E[MS_W] = σ_w²,

        SS_B = \\sum_i n_i ‖\\bar y_i − \\bar y‖², \\qquad MS_B = SS_B / (G − 1),
        \\qquad E[MS_B] = σ_w² + n_0 σ_b², \\quad n_0 = \\frac{N − \\sum_i n_i² / N}{G − 1},

    so σ̂_w² = MS_W and σ̂_b² = (MS_B − MS_W)/n₀ are unbiased (n₀ = K when all groups have K members).
    σ̂_b² can come out negative by chance; it is reported as is (consumers clamp).

    **Stratified draws** (``stratified=True``: member k of every group is the draw of stratum k of
    K equal-probability strata). Let m_k(x), v_k(x) be the mean and variance of a draw of stratum k
    of render x, v̄ = E_x (1/K) Σ_k v_k. The draws of a render are independent but not identically
    distributed, so

    .. math::

        E[MS_B] = K σ_b² + v̄  \\text{ (exact)}, \\qquad
        E[MS_W] = v̄ + \\frac{K}{K − 1} B, \\quad B = E_x \\frac1K \\sum_k ‖m_k(x) − \\bar m(x)‖²,

    and the one-way σ̂_b² reads low by B/(K − 1): B is the whole spread of the t-profile across the
    strata, shared by every render. The right within term is v̄ = K·Var(ḡ_r | x_r), the variance of one
    draw *as the stratified average sees it* (Var(ĝ) = (σ_b² + v̄/K)/R). One draw per stratum cannot
    estimate it without bias; this class uses collapsed strata (pairs of adjacent strata, a triple
    when K is odd; Cochran 1977 §5A.12) after removing each stratum's mean over the window's groups:

    .. math::

        \\hat v = \\frac{1}{K (G − 1)} \\sum_r ‖z_r − \\bar z‖², \\qquad
        z_{r,k} = \\sqrt{\\tfrac{n_g}{n_g − 1}}\\,(y_{rk} − \\bar y_{r,g(k)}),

        E[\\hat v] = v̄ + \\frac1K \\sum_g \\frac{n_g}{n_g − 1} \\sum_{k ∈ g} Var_x\\big(m_k(x) − \\bar m_g(x)\\big),

    so σ̂_w² = v̂ and σ̂_b² = (MS_B − v̂)/K. What is left of the bias is how differently *renders'*
    profiles change between two adjacent strata (for a pair, Var_x(m_a − m_b)/K²): the shared
    t-profile cancels in the centring, and adjacent strata differ little. Measured on a closed-form
    problem (scripts/stratified_accounting.py, teacher-weight q), σ_b² at K = 8 went from −28 % to
    −0.6 % of the true value and auto-K settled on the exact optimum instead of up to 1.5× it; where
    renders share no mean and the profile is not monotone the two can be close (uniform q, K = 4:
    −5.3 % one-way, −7.8 % collapsed; K = 8: −2.8 %, −0.9 %). At K = 2 the collapsed pair is the
    whole render and only the centring helps. Caveat: centring per stratum assumes the strata
    mean the same t-ranges over the window; a proposal refresh or a t_max change inside a window
    adds the drift of adjacent-stratum differences to v̂ (small; it errs towards larger K). In this
    mode K must stay fixed between resets, and G ≥ 2 groups are needed for σ̂_w².

    **Non-finite draws.** A group with any non-finite value is left out of every sum (masks, no host
    sync) and counted in ``dropped_groups``: one inf would otherwise make the window's σ² inf or NaN.

    Accumulators are float64 tensors on the rows' device; counts are tensors too (a dropped group is
    decided on the device), so updates and the σ² properties never synchronise with the host.
    """

    def __init__(self, stratified: bool = False) -> None:
        self.stratified = bool(stratified)
        self.reset()

    def reset(self) -> None:
        self.draws_per_group: Optional[int] = None  # K, fixed in stratified mode
        self._device: Optional[torch.device] = None
        self._counts: Optional[dict[str, torch.Tensor]] = None  # groups, samples, sizes_squared, dropped_groups
        self.ss_within: Optional[torch.Tensor] = None  # one-way SS_W: () float64
        self._means: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # group means, weight n_i
        self._contrasts: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # z_r (stratified)
        self._contrast_matrix: Optional[torch.Tensor] = None

    def update(self, samples: torch.Tensor) -> torch.Tensor:
        """Add G groups of K members each: samples: (G, K, ...) (flattened to (G, K, D)).

        Returns:
            () float64 tensor: the number of groups left out for a non-finite value.
        """
        y = samples.detach().to(torch.float64)
        G, K = int(y.shape[0]), int(y.shape[1])
        y = y.reshape(G, K, -1)
        if self.stratified and self.draws_per_group not in (None, K):
            raise ValueError(f"stratified ANOVA: K changed from {self.draws_per_group} to {K} within a window; "
                             "reset() when K changes")
        self.draws_per_group = K
        self._device = y.device
        keep = torch.isfinite(y).reshape(G, -1).all(1)  # (G,)
        kept = keep.sum().to(torch.float64)
        means = y.mean(1)  # (G, D)
        if self._counts is None:
            self._counts = {k: torch.zeros((), dtype=torch.float64, device=y.device)
                            for k in ("groups", "samples", "sizes_squared", "dropped_groups")}
        counts = self._counts
        counts["groups"] = counts["groups"] + kept
        counts["samples"] = counts["samples"] + kept * K
        counts["sizes_squared"] = counts["sizes_squared"] + kept * (K * K)
        counts["dropped_groups"] = counts["dropped_groups"] + (G - kept)
        ss = torch.where(keep[:, None, None], (y - means[:, None]).pow(2), 0.0).sum()
        self.ss_within = ss if self.ss_within is None else self.ss_within + ss
        self._means = _masked_merge(self._means, means, keep, float(K))
        if self.stratified and K >= 2:
            if self._contrast_matrix is None or self._contrast_matrix.shape[0] != K:  # once per K and window
                self._contrast_matrix = collapsed_contrast_matrix(K, y.device)
            z = torch.einsum("kj,gjd->gkd", self._contrast_matrix, y)
            self._contrasts = _masked_merge(self._contrasts, z.reshape(G, -1), keep, 1.0)
        return G - kept

    # ------------------------------------------------------------------ counts (tensors)
    def _count(self, name: str) -> torch.Tensor:
        if self._counts is None:
            return torch.zeros((), dtype=torch.float64)
        return self._counts[name]

    @property
    def n_groups(self) -> torch.Tensor:
        """G, the groups kept so far: () float64."""
        return self._count("groups")

    @property
    def n_samples(self) -> torch.Tensor:
        """N = Σ n_i over the kept groups: () float64."""
        return self._count("samples")

    @property
    def dropped_groups(self) -> torch.Tensor:
        """Groups left out for a non-finite value: () float64."""
        return self._count("dropped_groups")

    def _nan(self) -> torch.Tensor:
        return torch.full((), float("nan"), dtype=torch.float64, device=self._device)  # a fill, not a host-to-device copy

    # ------------------------------------------------------------------ the split
    @property
    def mean_square_within(self) -> torch.Tensor:
        """The within term: MS_W = SS_W/(N − G), or v̂ in stratified mode (see the class docstring).

        NaN without enough data (a group of ≥ 2 members; stratified: 2 groups of K ≥ 2): () float64.
        """
        if self._counts is None or self.ss_within is None:
            return self._nan()
        groups = self._counts["groups"]
        if self.stratified:
            K = int(self.draws_per_group or 0)
            if self._contrasts is None or K < 2:
                return self._nan()
            return torch.where(groups >= 2, self._contrasts[2] / (K * (groups - 1)), self._nan())
        df = self._counts["samples"] - groups
        return torch.where(df >= 1, self.ss_within / df, self._nan())

    @property
    def mean_square_between(self) -> torch.Tensor:
        """MS_B = SS_B/(G − 1) (NaN with fewer than 2 groups): () float64."""
        if self._counts is None or self._means is None:
            return self._nan()
        groups = self._counts["groups"]
        return torch.where(groups >= 2, self._means[2] / (groups - 1), self._nan())

    @property
    def sigma_w2(self) -> torch.Tensor:
        """σ̂_w² = the within term: () float64."""
        return self.mean_square_within

    @property
    def sigma_b2(self) -> torch.Tensor:
        """σ̂_b² = (MS_B − σ̂_w²)/n₀: () float64 (may be negative)."""
        if self._counts is None:
            return self._nan()
        c = self._counts
        n0 = (c["samples"] - c["sizes_squared"] / c["samples"]) / (c["groups"] - 1)
        return torch.where(c["groups"] >= 2, (self.mean_square_between - self.mean_square_within) / n0, self._nan())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Every running sum (CPU tensors): a window restored from it continues bit for bit."""
        cpu = lambda t: None if t is None else tuple(v.cpu() for v in t)  # noqa: E731
        return {
            "stratified": self.stratified,
            "draws_per_group": self.draws_per_group,
            "counts": None if self._counts is None else {k: v.cpu() for k, v in self._counts.items()},
            "ss_within": None if self.ss_within is None else self.ss_within.cpu(),
            "means": cpu(self._means),
            "contrasts": cpu(self._contrasts),
        }

    def load_state_dict(self, state: dict[str, Any], device: Any = None) -> None:
        if bool(state["stratified"]) != self.stratified:
            raise ValueError("estimator checkpoint and this run disagree on stratified draws (ANOVA window)")
        self.reset()
        device = torch.device(device) if device is not None else torch.device("cpu")
        move = lambda t: None if t is None else tuple(v.to(device) for v in t)  # noqa: E731
        self.draws_per_group = state["draws_per_group"]
        if state["counts"] is not None:
            self._device = device
            self._counts = {k: v.to(device) for k, v in state["counts"].items()}
        self.ss_within = None if state["ss_within"] is None else state["ss_within"].to(device)
        self._means, self._contrasts = move(state["means"]), move(state["contrasts"])


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
