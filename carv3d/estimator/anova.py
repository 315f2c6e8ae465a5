"""The two-level split of the estimator's variance: σ_b² between renders, σ_w² within, online.

:class:`AnovaSplit` is a one-way analysis of variance of the K weighted draws of each render, with
a mode for stratified draws (collapsed strata) and masks that keep non-finite draws out. The
two-stage model it feeds, K* and auto-K are in :mod:`carv3d.estimator.accounting`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def _masked_merge(state: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rows: torch.Tensor,
                  keep: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s merge of the kept rows, each with frequency weight ``weight``, into (W, x̄, M₂).

    The batch's W_B = weight·#kept, m_B = mean of the kept rows and M₂_B = weight·Σ_kept ‖x_i − m_B‖²
    merge exactly as in :class:`carv3d.estimator.accounting.Welford`. Tensor ops only: a dropped row (NaN and inf included)
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
