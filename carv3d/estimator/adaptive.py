"""The adaptive timestep proposal: an online second moment per timestep bin, and a defensive mixture.

Why a second moment. One draw of the estimator is f = (p/q)(t)·w(t)·r with r = ε̂ − ε. Its mean
does not depend on q; its second moment does:

.. math::

    E_q‖f‖² = \\sum_t q(t) \\frac{p(t)^2}{q(t)^2} w(t)^2 E[‖r‖² | t]
            = \\sum_t \\frac{p(t)^2 w(t)^2 m_2(t)}{q(t)},  \\qquad m_2(t) = E[‖r‖² | t],

and by Cauchy–Schwarz this is smallest for q*(t) ∝ p(t)·w(t)·sqrt(m₂(t)) — the oracle proposal of the
paper written with w pulled out of the root (w is known exactly at every t; only m₂ is estimated).
The teacher-weight proposal q ∝ p·w is the special case m₂ = constant.

:class:`AdaptiveSecondMoment` estimates m₂ on B equal-width bins of the whole grid {0, …, T−1}
(bins do not move when a schedule changes t_max) from the residuals the estimator already computes.
Each draw contributes m = ‖r‖²/D (the mean square per element; the scale cancels in q) with the
importance weight ρ = p/q, so the pending bin estimate Σρ·m / Σρ is a self-normalised estimate of
E_p[m | t ∈ bin] even though t was drawn from q. At a refresh the pending estimate is blended into the
running one, m₂ ← β·m₂ + (1 − β)·new (β = ``decay``; the first observation of a bin is taken as is),
bins never observed take the mean of the observed ones, and the pending sums restart.

Why a defensive mixture. m₂ is a noisy estimate; where it is too small, q would be too small and
p/q large. Mixing with the teacher-weight proposal,

.. math::

    q = (1 − λ)\\, q_{adaptive} + λ\\, q_{tw}  \\;\\ge\\; λ\\, q_{tw}
    \\quad\\Rightarrow\\quad \\frac{p}{q} \\le \\frac{1}{λ}\\,\\frac{p}{q_{tw}} = \\frac{Z}{λ\\, w(t)},
    \\qquad Z = \\sum_t p(t) w(t),

bounds every importance weight by 1/λ times the teacher-weight one, whatever m₂ is, so the weighted
integrand obeys ‖(p/q)·w·r‖ ≤ (Z/λ)·‖r‖: a fixed constant times the residual (Hesterberg's
defensive importance sampling). The price is small: q ≥ (1 − λ)·q_adaptive, so by the formula above
the second moment E_q‖f‖² is at most 1/(1 − λ) times that of q_adaptive alone.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("carv3d")


def defensive_mixture(q_adaptive: torch.Tensor, q_teacher: torch.Tensor, defensive: float) -> torch.Tensor:
    """q = (1 − λ)·q_adaptive + λ·q_teacher, with λ = ``defensive`` ∈ (0, 1].

    Guarantees p/q ≤ (1/λ)·p/q_teacher pointwise (see the module docstring).

    Args:
        q_adaptive: (T,) a distribution.
        q_teacher: (T,) the teacher-weight proposal p·w/Σp·w.
        defensive: λ.

    Returns:
        q: (T,), sums to 1 when both inputs do.
    """
    if not 0.0 < defensive <= 1.0:
        raise ValueError(f"the defensive mixture weight must be in (0, 1]; got {defensive}")
    return (1.0 - defensive) * q_adaptive + defensive * q_teacher


class AdaptiveSecondMoment:
    """Online per-bin estimate of m₂(b) = E_p[‖ε̂ − ε‖²/D | t ∈ bin b] on the teacher's grid.

    Bin of a timestep: b(t) = ⌊t·B/T⌋ (B = ``bins`` equal-width bins of {0, …, T−1}).

    Args:
        num_timesteps: T.
        bins: B.
        decay: β of the blend m₂ ← β·m₂ + (1 − β)·new at each refresh.
        device: where the accumulators live.

    Accumulation is tensor-only (``scatter_add``): it never synchronises with the host. Draws with
    a non-finite residual or weight are left out (masked) and counted in ``dropped``, so m₂ — and
    every proposal built from it — stays finite and ≥ 0 whatever the teacher returns.
    """

    def __init__(self, num_timesteps: int, bins: int = 20, decay: float = 0.5, device: Any = None) -> None:
        if not 1 <= bins <= num_timesteps:
            raise ValueError(f"adaptive bins must be in [1, {num_timesteps}]; got {bins}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay}")
        self.num_timesteps = int(num_timesteps)
        self.bins = int(bins)
        self.decay = float(decay)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        zeros = lambda: torch.zeros(self.bins, dtype=torch.float64, device=self.device)  # noqa: E731
        self.m2 = torch.ones(self.bins, dtype=torch.float64, device=self.device)  # ones: q_adaptive = q_tw
        self.seen = torch.zeros(self.bins, dtype=torch.bool, device=self.device)
        self.pending_sum, self.pending_weight, self.pending_count = zeros(), zeros(), zeros()
        self.dropped = torch.zeros((), dtype=torch.float64, device=self.device)  # non-finite draws left out, ever
        self.refreshes = 0

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        """b(t) = ⌊t·B/T⌋: (...,) long."""
        return torch.div(t * self.bins, self.num_timesteps, rounding_mode="floor")

    def accumulate(self, t: torch.Tensor, importance_weight: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
        """Add draws to the pending bin sums; draws with a non-finite ρ or m (or ρ < 0) are left out.

        One +inf residual (an fp16 U-Net overflow) would otherwise make its bin's m₂ infinite for good:
        q would turn NaN on that bin and every later draw would come from a broken table. Leaving a
        draw out of an average of *past* draws does not bias any later gradient (the later gradient
        is unbiased for every valid q); it only makes m₂ a slightly different estimate. Tensor ops
        only (a mask), so this never synchronises with the host.

        Args:
            t: (N,) long, the drawn timesteps.
            importance_weight: (N,) p(t)/q(t) of each draw.
            mean_square: (N,) ‖ε̂ − ε‖²/D of each draw.

        Returns:
            () float64 tensor: how many draws were left out (also added to ``dropped``).
        """
        b = self.bin_of(t.to(self.device)).reshape(-1)
        rho = importance_weight.to(device=self.device, dtype=torch.float64).reshape(-1)
        m = mean_square.detach().to(device=self.device, dtype=torch.float64).reshape(-1)
        contribution = rho * m
        keep = torch.isfinite(rho) & (rho >= 0) & torch.isfinite(m) & torch.isfinite(contribution)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.pending_sum.scatter_add_(0, b, torch.where(keep, contribution, zero))
        self.pending_weight.scatter_add_(0, b, torch.where(keep, rho, zero))
        self.pending_count.scatter_add_(0, b, keep.to(torch.float64))
        dropped = (~keep).sum().to(torch.float64)
        self.dropped = self.dropped + dropped
        return dropped

    def refresh(self) -> None:
        """Blend the pending bin estimates into m₂, fill never-seen bins, restart the pending sums.

        A bin whose pending estimate is not finite (finite draws whose sum overflowed float64) is
        treated as a bin without data: m₂ stays finite and ≥ 0 whatever was accumulated.
        """
        new = self.pending_sum / self.pending_weight.clamp_min(torch.finfo(torch.float64).tiny)
        has_data = (self.pending_weight > 0) & torch.isfinite(new)
        blended = torch.where(self.seen, self.decay * self.m2 + (1.0 - self.decay) * new, new)
        self.m2 = torch.where(has_data, blended, self.m2)
        self.seen = self.seen | has_data
        n_seen = self.seen.sum()
        mean_seen = torch.where(self.seen, self.m2, torch.zeros_like(self.m2)).sum() / n_seen.clamp_min(1)
        self.m2 = torch.where(self.seen | (n_seen == 0), self.m2, mean_seen)
        self.pending_sum.zero_()
        self.pending_weight.zero_()
        self.pending_count.zero_()
        self.refreshes += 1

    def scale_per_timestep(self) -> torch.Tensor:
        """s(t) = sqrt(m₂(b(t))): (T,) float64, the factor of the adaptive proposal q ∝ p·w·s."""
        t = torch.arange(self.num_timesteps, device=self.device)
        return self.m2.clamp_min(0.0).sqrt()[self.bin_of(t)]

    def bin_edges(self) -> torch.Tensor:
        """First timestep of each bin and T at the end: (B + 1,) long (for plots)."""
        b = torch.arange(self.bins + 1, device=self.device)
        return -torch.div(-b * self.num_timesteps, self.bins, rounding_mode="floor")  # ceil(b·T/B)

    def state_dict(self) -> dict[str, Any]:
        return {
            "bins": self.bins,
            "decay": self.decay,
            "m2": self.m2.cpu(),
            "seen": self.seen.cpu(),
            "pending_sum": self.pending_sum.cpu(),
            "pending_weight": self.pending_weight.cpu(),
            "pending_count": self.pending_count.cpu(),
            "dropped": self.dropped.cpu(),
            "refreshes": self.refreshes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        A checkpoint written before non-finite draws were left out may hold an infinite or NaN m₂ or
        pending sum: those bins are reset to "never seen" (m₂ = 1) with a warning, so a resumed run
        does not inherit a broken proposal.
        """
        if int(state["bins"]) != self.bins:
            raise ValueError(f"estimator checkpoint has {state['bins']} adaptive bins but this run uses {self.bins}")
        for key in ("m2", "seen", "pending_sum", "pending_weight", "pending_count"):
            setattr(self, key, state[key].to(self.device))
        bad = ~torch.isfinite(self.m2) | (self.m2 < 0)
        bad_pending = ~(torch.isfinite(self.pending_sum) & torch.isfinite(self.pending_weight))
        if bool(bad.any() | bad_pending.any()):  # load time: one host sync is fine here
            logger.warning("adaptive proposal checkpoint holds non-finite second moments in %d bin(s): those bins "
                           "restart as never seen", int((bad | bad_pending).sum()))
            self.m2 = torch.where(bad, torch.ones_like(self.m2), self.m2)
            self.seen = self.seen & ~bad
            for key in ("pending_sum", "pending_weight", "pending_count"):
                setattr(self, key, torch.where(bad_pending, torch.zeros_like(self.m2), getattr(self, key)))
        self.dropped = torch.as_tensor(state.get("dropped", 0.0), dtype=torch.float64).to(self.device)
        self.refreshes = int(state["refreshes"])
