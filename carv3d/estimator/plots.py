"""The proposal plot written at validation time: p, w, q on the grid and the adaptive m₂ estimate.

matplotlib is imported inside the function, so importing the estimator never pulls it in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from carv3d.estimator.adaptive import AdaptiveSecondMoment
from carv3d.estimator.timesteps import TimestepDistribution

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure


def proposal_figure(
    distribution: TimestepDistribution, adaptive: Optional[AdaptiveSecondMoment] = None, title: str = ""
) -> "Figure":
    """A two-panel figure of the timestep tables.

    Top: the nominal p(t), the proposal q(t) and the teacher-weight proposal p·w/Σp·w, as
    probabilities per timestep, with the importance weight p/q on a second axis. Bottom (when the
    proposal is adaptive): sqrt(m₂) per bin, the factor by which q departs from teacher-weight.

    Returns:
        A ``matplotlib.figure.Figure`` (not registered with pyplot; save it with ``savefig``).
    """
    from matplotlib.figure import Figure

    def host(x: torch.Tensor) -> Any:
        return x.detach().to("cpu", torch.float64).numpy()

    grid = host(torch.arange(distribution.num_timesteps, dtype=torch.float64))
    rows = 2 if adaptive is not None else 1
    fig = Figure(figsize=(7.0, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    ax = axes[0]
    ax.plot(grid, host(distribution.p), label="nominal p(t)", color="0.5")
    ax.plot(grid, host(distribution.teacher_weight_proposal), label="teacher-weight p·w/Σp·w", color="tab:green", ls="--")
    ax.plot(grid, host(distribution.q), label=f"proposal q(t) ({distribution.proposal})", color="tab:blue")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("probability")
    ax.set_xlim(0, distribution.num_timesteps - 1)
    twin = ax.twinx()
    ratio = distribution.ratio.clone()
    ratio[distribution.q <= 0] = float("nan")
    twin.plot(grid, host(ratio), color="tab:red", lw=0.8, label="importance weight p/q")
    twin.set_ylabel("p/q", color="tab:red")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="upper right")
    ax.set_title(title or f"timesteps: weighting {distribution.weighting}, t ∈ [{distribution.min_step}, {distribution.max_step}]")
    if adaptive is not None:
        ax2 = axes[1]
        edges = host(adaptive.bin_edges())
        scale = host(adaptive.m2.clamp_min(0).sqrt())
        ax2.stairs(scale, edges, color="tab:purple", label="sqrt(m₂) per bin")
        seen = host(adaptive.seen.to(torch.float64))
        for left, right, s in zip(edges[:-1], edges[1:], seen):
            if not s:
                ax2.axvspan(left, right, color="0.9", lw=0)
        ax2.set_xlim(0, distribution.num_timesteps - 1)
        ax2.set_xlabel("timestep t")
        ax2.set_ylabel("sqrt E[‖ε̂ − ε‖²/D]")
        ax2.set_title(f"adaptive second moment ({adaptive.refreshes} refreshes; grey: bins not yet observed)", fontsize=9)
    return fig
