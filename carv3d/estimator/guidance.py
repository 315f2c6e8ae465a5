"""Guidance strategies: the residual whose weighted average over (t, ε) is the distillation gradient.

The estimator draws N = R·K timesteps and noises, forms x_t, and asks a guidance for one residual
per draw; everything else — proposal q, importance weights p/q·w(t), stratification, render reuse,
variance accounting, auto-K — is shared, so CARV applies to every guidance unchanged:

.. math::

    g_r = \\frac{1}{K} \\sum_k \\frac{p(t_{rk})}{q(t_{rk})}\\, w(t_{rk})\\, \\rho(x_{t,rk}, t_{rk}, ε_{rk})

==========  =================================================  ======================================
guidance    residual ρ                                         reference
==========  =================================================  ======================================
``sds``     ε̂_s(x_t, t) − ε,  ε̂_s = ε̂_u + s·(ε̂_c − ε̂_u)       DreamFusion (Poole et al. 2022)
``csd``     ε̂_c(x_t, t) − ε̂_u(x_t, t)                            Classifier Score Distillation (Yu et al. 2023)
==========  =================================================  ======================================

(ε̂_c: conditional noise prediction, ε̂_u: unconditional / negative-prompt one, s: CFG scale.)
A guidance talks to the teacher through :class:`NoisePredictor`; it may hold trainable parts of
its own (a LoRA copy for VSD) and then saves them with ``state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import torch

PredictNoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict_noise(x_t: (N, ...), t: (N,) long, upstream_index: (N,) long) -> eps_hat: (N, ...)``,
the guided noise prediction. ``upstream_index[n]`` is the row r of the upstream sample row n was
noised from (per-render conditioning such as view-dependent prompts). Called under ``no_grad``."""


@runtime_checkable
class NoisePredictor(Protocol):
    """What a guidance may ask of the teacher, row by row (all under ``torch.no_grad()``).

    ``__call__`` is the guided prediction (:data:`PredictNoise`); ``branches`` returns the
    unconditional and conditional predictions ``(ε̂_u, ε̂_c)``, each (N, ...).
    """

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, upstream_index: torch.Tensor) -> torch.Tensor: ...

    def branches(self, x_t: torch.Tensor, t: torch.Tensor,
                 upstream_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class GuidedOnly:
    """A plain :data:`PredictNoise` function as a :class:`NoisePredictor` (library users' teachers)."""

    def __init__(self, predict_noise: PredictNoise):
        self._predict = predict_noise

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, upstream_index: torch.Tensor) -> torch.Tensor:
        return self._predict(x_t, t, upstream_index)

    def branches(self, x_t: torch.Tensor, t: torch.Tensor,
                 upstream_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("this guidance needs the conditional and unconditional predictions separately: pass "
                        "a NoisePredictor with a branches(x_t, t, upstream_index) method, not a plain function")


def as_predictor(predict_noise: Union[NoisePredictor, PredictNoise]) -> NoisePredictor:
    return predict_noise if hasattr(predict_noise, "branches") else GuidedOnly(predict_noise)  # type: ignore[return-value]


@dataclass
class Draws:
    """The N = R·K noised draws of one step (rows n = r·K + k).

    Attributes:
        x: (N, ...) the clean upstream row each draw was noised from (no graph).
        x_t: (N, ...) √ᾱ_t·x + √(1 − ᾱ_t)·ε.
        t: (N,) long timesteps.
        noise: (N, ...) ε.
        upstream_index: (N,) long, r of each row.
    """

    x: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    upstream_index: torch.Tensor


def in_chunks(fn: Callable[..., Any], max_batch: Optional[int], *rows: torch.Tensor) -> Any:
    """``fn(*rows)`` on at most ``max_batch`` rows at a time, outputs concatenated (tuples elementwise)."""
    n = rows[0].shape[0]
    if max_batch is None or n <= max_batch:
        return fn(*rows)
    parts = [fn(*(r[i : i + max_batch] for r in rows)) for i in range(0, n, max_batch)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts))
    return torch.cat(parts)


class Guidance:
    """Base of the guidance strategies: ``residual`` per draw; no state unless a strategy adds some."""

    name = "guidance"

    def residual(self, draws: Draws, predictor: NoisePredictor, max_batch: Optional[int] = None) -> torch.Tensor:
        """ρ: (N, ...) for each row of ``draws`` (see the module docstring)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"guidance '{self.name}' has no state, but the checkpoint holds {sorted(state)}")


class ScoreDistillation(Guidance):
    """SDS: ρ = ε̂_s(x_t, t) − ε, the guided prediction minus the injected noise."""

    name = "sds"

    def residual(self, draws: Draws, predictor: NoisePredictor, max_batch: Optional[int] = None) -> torch.Tensor:
        eps_hat = in_chunks(predictor, max_batch, draws.x_t, draws.t, draws.upstream_index)
        if eps_hat.shape != draws.x_t.shape:
            raise ValueError(f"predict_noise returned shape {tuple(eps_hat.shape)} for input {tuple(draws.x_t.shape)}")
        return eps_hat - draws.noise


class ClassifierScoreDistillation(Guidance):
    """CSD (Yu et al. 2023): ρ = ε̂_c(x_t, t) − ε̂_u(x_t, t), the implicit classifier's score alone.

    ε is not subtracted: the residual is the difference of the two predictions at the same x_t.
    The CFG scale does not enter (it would only rescale ρ, which Adam undoes).
    """

    name = "csd"

    def residual(self, draws: Draws, predictor: NoisePredictor, max_batch: Optional[int] = None) -> torch.Tensor:
        uncond, cond = in_chunks(predictor.branches, max_batch, draws.x_t, draws.t, draws.upstream_index)
        if cond.shape != draws.x_t.shape or uncond.shape != draws.x_t.shape:
            raise ValueError(f"branches returned shapes {tuple(uncond.shape)}, {tuple(cond.shape)} for input "
                             f"{tuple(draws.x_t.shape)}")
        return cond - uncond


GUIDANCES: dict[str, type[Guidance]] = {"sds": ScoreDistillation, "csd": ClassifierScoreDistillation}


def build_guidance(guidance_cfg: Any = None) -> Guidance:
    """The guidance a ``guidance`` config section names (``type``; None → SDS)."""
    name = "sds" if guidance_cfg is None else str(getattr(guidance_cfg, "type", guidance_cfg))
    if name not in GUIDANCES:
        raise ValueError(f"unknown guidance type {name!r}; expected one of {sorted(GUIDANCES)}")
    return GUIDANCES[name]()
