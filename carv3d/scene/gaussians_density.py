"""Adaptive density control of Gaussian splats: clone, split, prune and opacity reset, with the
optimiser's state following every change of the parameter count.

The rules are 3DGS's (Kerbl et al. 2023, ``GaussianModel.densify_and_prune`` and ``train.py``); the
default values are DreamGaussian's (Tang et al. 2023, ``configs/text.yaml``: densify every 50 steps
up to step 3000 at gradient 0.01, extent 4, prune below opacity 0.01, reset opacities every 700
steps). Keys: ``scene.density.*`` (:class:`carv3d.config.GaussianDensityConfig`).

**Statistics** (every training step in ``[start, stop]``). For Gaussian i seen by camera b (its
projected radius > 0), with ``g_bi`` the gradient of the loss with respect to its projected mean in
pixels, the view-space gradient in NDC units of a per-image loss is

    ĝ_bi = ‖(g_bi,x · W/2 · B, g_bi,y · H/2 · B)‖        (× B: the step's loss is a mean over B renders)

and ``grad_accum_i += ĝ_bi``, ``count_i += 1``. The mean ``ḡ_i = grad_accum_i / count_i`` drives growth.

**Densify and prune** (every ``every`` steps in the window), with ``s_i`` the largest scale,
``E = extent`` and threshold τ:

- clone  ``ḡ_i ≥ τ`` and ``s_i ≤ percent_dense · E``: an identical copy is appended;
- split  ``ḡ_i ≥ τ`` and ``s_i > percent_dense · E`` (originals only): N new Gaussians at
  ``μ_i + R_i (s_i ⊙ z)``, ``z ~ N(0, I)``, with scales ``s_i / (0.8 N)``, replace it;
- prune  ``o_i < prune_opacity``, or ``s_i > prune_scale · E``.

New Gaussians start with zero Adam moments; the kept ones keep theirs, row for row. The statistics
restart from zero. 3DGS's screen-size prune is left out: in both reference implementations its
statistic is zeroed by the densification just before it is read, so it never fires.

**Opacity reset** (every ``opacity_reset_every`` steps in the window, none in a run's last
``opacity_reset_margin`` steps — :meth:`GaussianScene.reset_too_late`): ``o_i ← min(o_i, v)`` and the
opacity's Adam moments are zeroed.

Growth stops at ``max_gaussians``: when the candidates would pass it, those with the largest ḡ are
taken first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from carv3d.scene.gaussians_model import Gaussians, quaternion_to_rotation


@dataclass
class DensityReport:
    """What one densify-and-prune did."""

    cloned: int = 0
    split: int = 0
    pruned: int = 0
    count: int = 0


def record_gradients(grad_accum: torch.Tensor, count: torch.Tensor, means2d_grad: torch.Tensor,
                     radii: torch.Tensor, width: int, height: int) -> None:
    """Add one render's view-space gradients (module docstring) into the statistics, in place.

    Args:
        grad_accum, count: (N,) running sums.
        means2d_grad: (B, N, 2) ∂loss/∂(projected means), pixels.
        radii: (B, N, 2) projected radii; a Gaussian counts where both are > 0.
    """
    n_cameras = means2d_grad.shape[0]
    visible = (radii > 0).all(dim=-1)
    norms = torch.hypot(means2d_grad[..., 0] * (0.5 * width * n_cameras), means2d_grad[..., 1] * (0.5 * height * n_cameras))
    norms = torch.nan_to_num(norms, nan=0.0, posinf=0.0) * visible  # Python scalars: no copy to the device
    grad_accum += norms.sum(dim=0).to(grad_accum.dtype)
    count += visible.sum(dim=0).to(count.dtype)


def learning_rate_schedule(step: int, lr_init: float, lr_final: float, decay_steps: int) -> float:
    """Log-linear decay from ``lr_init`` to ``lr_final`` over ``decay_steps`` (3DGS's ``get_expon_lr_func``
    without delay): ``exp((1 − u) ln lr_init + u ln lr_final)``, ``u = min(step / decay_steps, 1)``."""
    if lr_init == lr_final or lr_init <= 0.0 or lr_final <= 0.0:
        return lr_init
    u = min(max(step / decay_steps, 0.0), 1.0)
    return math.exp((1.0 - u) * math.log(lr_init) + u * math.log(lr_final))


def edit_gaussians(gaussians: Gaussians, optimizer: Optional[torch.optim.Optimizer], keep: torch.Tensor,
                   appended: Optional[dict[str, torch.Tensor]] = None) -> None:
    """New parameters ``cat([p[keep], appended])`` for every parameter, and the same for each of the
    optimiser's per-row state tensors (Adam's moments), with zeros for the appended rows; the step
    counts stay. ``keep``: (M,) row indices in their new order."""
    old = gaussians.tensors()
    n_new = 0 if appended is None else next(iter(appended.values())).shape[0]
    values = {}
    for name, param in old.items():
        kept = param.detach()[keep]
        values[name] = kept if appended is None else torch.cat([kept, appended[name].to(kept.dtype)])
    new = gaussians.assign(values)
    if optimizer is not None:
        _move_optimizer_rows(optimizer, {id(p): new[name] for name, p in old.items()}, keep, n_new)


def _move_optimizer_rows(optimizer: torch.optim.Optimizer, replacement: dict[int, torch.nn.Parameter],
                         keep: torch.Tensor, n_new: int) -> None:
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            new = replacement.get(id(param))
            if new is None:
                continue
            group["params"][i] = new
            state = optimizer.state.pop(param, None)
            if not state:
                continue
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == param.shape[0]:
                    kept = value[keep.to(value.device)]
                    state[key] = torch.cat([kept, kept.new_zeros((n_new, *kept.shape[1:]))])
            optimizer.state[new] = state


def _growth_budget(grads: torch.Tensor, candidates: torch.Tensor, cost: torch.Tensor, budget: int) -> torch.Tensor:
    """The candidates kept when each costs ``cost`` new Gaussians and at most ``budget`` may be added:
    the largest gradients first."""
    if int((cost * candidates).sum()) <= budget:
        return candidates
    order = torch.argsort(torch.where(candidates, grads, torch.full_like(grads, -1.0)), descending=True, stable=True)
    spent = torch.cumsum((cost * candidates)[order], dim=0)
    allowed = torch.zeros_like(candidates)
    allowed[order] = spent <= budget
    return candidates & allowed


@torch.no_grad()
def densify_and_prune(gaussians: Gaussians, optimizer: Optional[torch.optim.Optimizer], grad_accum: torch.Tensor,
                      count: torch.Tensor, cfg: Any, generator: torch.Generator) -> DensityReport:
    """Clone, split and prune once (module docstring). ``cfg``: ``scene.density``; ``generator``: the
    split offsets' source (a CPU generator, so a run reproduces on any device)."""
    grads = torch.nan_to_num(grad_accum / count.clamp_min(1.0), nan=0.0)
    size = gaussians.scales().max(dim=-1).values
    dense_limit = float(cfg.percent_dense) * float(cfg.extent)
    high = grads >= float(cfg.grad_threshold)
    n_split = int(cfg.split_into)
    clone = high & (size <= dense_limit)
    split = high & (size > dense_limit)
    cost = torch.where(clone, 1, n_split - 1)
    allowed = _growth_budget(grads, clone | split, cost, max(0, int(cfg.max_gaussians) - len(gaussians)))
    clone, split = clone & allowed, split & allowed
    report = DensityReport(cloned=int(clone.sum()), split=int(split.sum()))

    n = len(gaussians)
    if report.cloned:  # clone: append copies
        edit_gaussians(gaussians, optimizer, torch.arange(n, device=grads.device),
                       {name: p.detach()[clone] for name, p in gaussians.tensors().items()})
        split = torch.cat([split, torch.zeros(report.cloned, dtype=torch.bool, device=split.device)])
    if report.split:  # split: N samples from each selected Gaussian replace it
        params = gaussians.tensors()
        scales = params["log_scales"][split].exp()
        rotation = quaternion_to_rotation(params["quats"][split])
        z = torch.randn((n_split, scales.shape[0], 3), generator=generator).to(scales.device, scales.dtype)
        offsets = torch.einsum("nij,knj->kni", rotation, scales * z)  # (N_split, M, 3)
        appended = {name: p.detach()[split].repeat(n_split, *([1] * (p.dim() - 1))) for name, p in params.items()}
        appended["means"] = (params["means"][split] + offsets).reshape(-1, 3)
        appended["log_scales"] = (scales / (0.8 * n_split)).log().repeat(n_split, 1)
        edit_gaussians(gaussians, optimizer, (~split).nonzero().squeeze(-1), appended)

    prune = gaussians.opacities() < float(cfg.prune_opacity)
    if float(cfg.prune_scale) > 0:
        prune |= gaussians.scales().max(dim=-1).values > float(cfg.prune_scale) * float(cfg.extent)
    if bool(prune.all()):  # never prune every Gaussian: an empty scene has no gradient to recover from
        prune[torch.argmax(gaussians.opacities())] = False
    report.pruned = int(prune.sum())
    if report.pruned:
        edit_gaussians(gaussians, optimizer, (~prune).nonzero().squeeze(-1))
    report.count = len(gaussians)
    return report


@torch.no_grad()
def reset_opacity(gaussians: Gaussians, optimizer: Optional[torch.optim.Optimizer], value: float) -> None:
    """``o_i ← min(o_i, value)``; the opacity logits' Adam moments are zeroed (3DGS's ``reset_opacity``)."""
    gaussians.opacity_logits.clamp_(max=math.log(value / (1.0 - value)))
    if optimizer is None:
        return
    state = optimizer.state.get(gaussians.opacity_logits, {})
    for key, tensor in state.items():
        if key != "step" and torch.is_tensor(tensor) and tensor.dim() > 0:
            tensor.zero_()
