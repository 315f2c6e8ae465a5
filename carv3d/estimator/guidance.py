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
``vsd``     ε̂_s(x_t, t) − ε̂_φ(x_t, t, c)                         ProlificDreamer (Wang et al. 2023)
==========  =================================================  ======================================

(ε̂_c: conditional noise prediction, ε̂_u: unconditional / negative-prompt one, s: CFG scale,
ε̂_φ: a trainable copy of the teacher that models the current renders, c: the render's camera.)
A guidance talks to the teacher through :class:`NoisePredictor`; it may hold trainable parts of
its own (VSD's particle model) and then trains them in :meth:`Guidance.update` and saves them with
``state_dict``.
"""

from __future__ import annotations

import math
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


@runtime_checkable
class ParticlePredictor(NoisePredictor, Protocol):
    """What VSD asks of the teacher side on top of :class:`NoisePredictor` (``carv3d.step.TeacherPredictor``).

    ``guided_and_particle`` returns ``(ε̂_s, ε̂_φ)`` for the same rows, each (N, ...), from as few
    U-Net calls as the teacher side can manage (one mixed-batch call of 3N rows with a LoRA copy);
    ``update_particle`` takes one optimiser step of ε̂_φ on the diffusion loss at the given clean
    rows x, timesteps t and noises ε (camera condition dropped where ``camera_kept`` is False) and
    returns the loss, a () tensor.
    """

    def guided_and_particle(self, x_t: torch.Tensor, t: torch.Tensor,
                            upstream_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def update_particle(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, upstream_index: torch.Tensor,
                        camera_kept: torch.Tensor) -> torch.Tensor: ...


class ParticleModel(Protocol):
    """VSD's trainable noise predictor as the guidance sees it: how many timesteps it was trained
    on and its state (weights and optimiser) for checkpoints. Its calls go through the predictor,
    which knows each row's conditioning (``carv3d.teacher.lora.LoRAParticle``)."""

    num_train_timesteps: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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

    @classmethod
    def from_config(cls, guidance_cfg: Any = None, particle: Optional[ParticleModel] = None) -> "Guidance":
        """The guidance a config section describes; ``particle``: the trainable part, for those that have one."""
        return cls()

    def residual(self, draws: Draws, predictor: NoisePredictor, max_batch: Optional[int] = None) -> torch.Tensor:
        """ρ: (N, ...) for each row of ``draws`` (see the module docstring)."""
        raise NotImplementedError

    def update(self, upstream: torch.Tensor, predictor: NoisePredictor, generator: torch.Generator) -> dict[str, Any]:
        """Train the guidance's own parts on this step's upstream x: (R, ...) (no graph), after the
        residual; returns scalars to log. Draws from ``generator`` after the estimator's own draws.
        Default: nothing to train, no draws."""
        return {}

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


class VariationalScoreDistillation(Guidance):
    r"""VSD (ProlificDreamer, Wang et al. 2023): ρ = ε̂_s(x_t, t, y) − ε̂_φ(x_t, t, y, c).

    ε̂_s is the frozen teacher with classifier-free guidance; ε̂_φ is a particle model — the
    teacher's U-Net with LoRA adapters and a camera embedding — that learns the distribution of the
    current renders with the standard diffusion loss, interleaved with the scene's steps:

    .. math::

        \min_φ\; E_{t' \sim U\{t'_{lo}, …, t'_{hi}\},\, ε',\, c}
              \big\| ε̂_φ(\sqrt{\bar α_{t'}}\, \mathrm{sg}(x) + \sqrt{1 − \bar α_{t'}}\, ε', t', y, c) − ε' \big\|^2

    (target v or x₀ for teachers that predict those). The residual uses ε̂_φ *before* this step's
    update, as the paper's Algorithm 1 does. Against SDS's ε̂_s − ε, the injected noise ε is
    replaced by ε̂_φ's estimate of it given the render distribution, which removes SDS's
    mode-seeking term and lets a normal CFG scale (7.5) work.

    CARV applies unchanged: the K draws per render (t from q, strata, importance weights p/q, ε)
    are shared by ε̂_s and ε̂_φ, which the predictor evaluates in one batched call. The particle's
    own training draws are separate (``samples`` per render, t' uniform over its range as in the
    paper), so its cost is per render, not per draw: :meth:`update` runs in the estimator's
    ``upstream`` time and K does not multiply it.

    Draws of :meth:`update`, from the step's generator after the estimator's: t' =
    ``torch.randint(lo, hi + 1, (R·S,))``, ε' = ``torch.randn((R·S, ...))``, camera kept =
    ``torch.rand((R·S,)) >= camera_dropout`` (rows m = r·S + s, S = ``samples``).

    Args:
        particle: the trainable model (its calls go through the predictor).
        samples: S, particle training draws per render and step (threestudio's lora_n_timestamp_samples).
        t_min, t_max: the particle's training timesteps t' ∈ {⌊t_min·T⌋, …, ⌈t_max·T⌉ − 1}.
        camera_dropout: probability that a training draw sees the null camera (threestudio: 0.1),
            so ε̂_φ also learns the camera-free distribution.
    """

    name = "vsd"

    def __init__(self, particle: ParticleModel, samples: int = 1, t_min: float = 0.0, t_max: float = 1.0,
                 camera_dropout: float = 0.1):
        if particle is None:
            raise ValueError("guidance 'vsd' needs its particle model (carv3d.teacher.lora.build_particle)")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"VSD particle timesteps need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.particle = particle
        self.samples = int(samples)
        num_timesteps = int(particle.num_train_timesteps)
        self.t_low = int(math.floor(t_min * num_timesteps))
        self.t_high = max(self.t_low, min(num_timesteps, int(math.ceil(t_max * num_timesteps))) - 1)
        self.camera_dropout = float(camera_dropout)

    @classmethod
    def from_config(cls, guidance_cfg: Any = None, particle: Optional[ParticleModel] = None) -> "Guidance":
        cfg = guidance_cfg
        if particle is None:
            raise ValueError("guidance 'vsd' needs its particle model: build it with carv3d.teacher.lora.build_particle "
                             "and pass it to build_estimator(..., particle=...)")
        return cls(particle, samples=int(cfg.lora_samples), t_min=float(cfg.lora_t_min), t_max=float(cfg.lora_t_max),
                   camera_dropout=float(cfg.camera_dropout))

    def residual(self, draws: Draws, predictor: NoisePredictor, max_batch: Optional[int] = None) -> torch.Tensor:
        if not isinstance(predictor, ParticlePredictor):
            raise TypeError("guidance 'vsd' needs a predictor with guided_and_particle and update_particle "
                            "(carv3d.step.TeacherPredictor with a particle model)")
        guided, particle = in_chunks(predictor.guided_and_particle, max_batch, draws.x_t, draws.t,
                                     draws.upstream_index)
        if guided.shape != draws.x_t.shape or particle.shape != draws.x_t.shape:
            raise ValueError(f"guided_and_particle returned shapes {tuple(guided.shape)}, {tuple(particle.shape)} "
                             f"for input {tuple(draws.x_t.shape)}")
        return guided - particle

    def update(self, upstream: torch.Tensor, predictor: NoisePredictor, generator: torch.Generator) -> dict[str, Any]:
        """One step of the particle model on the renders x: (R, ...) (see the class docstring)."""
        if not isinstance(predictor, ParticlePredictor):
            raise TypeError("guidance 'vsd' needs a predictor with update_particle (carv3d.step.TeacherPredictor)")
        x = upstream.detach()
        R, S = x.shape[0], self.samples
        rows = R * S
        on = generator.device
        t = torch.randint(self.t_low, self.t_high + 1, (rows,), generator=generator, device=on).to(x.device)
        noise = torch.randn((rows, *x.shape[1:]), generator=generator, device=on, dtype=x.dtype).to(x.device)
        camera_kept = (torch.rand((rows,), generator=generator, device=on) >= self.camera_dropout).to(x.device)
        index = torch.arange(R, device=x.device).repeat_interleave(S)
        x_rows = x if S == 1 else x.repeat_interleave(S, dim=0)
        loss = predictor.update_particle(x_rows, t, noise, index, camera_kept)
        return {"particle_loss": loss}

    def state_dict(self) -> dict[str, Any]:
        return {"particle": self.particle.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "particle" not in state:
            raise ValueError("guidance 'vsd': the checkpoint holds no particle model state (was it an SDS or CSD run?)")
        self.particle.load_state_dict(state["particle"])


GUIDANCES: dict[str, type[Guidance]] = {"sds": ScoreDistillation, "csd": ClassifierScoreDistillation,
                                        "vsd": VariationalScoreDistillation}


def build_guidance(guidance_cfg: Any = None, particle: Optional[ParticleModel] = None) -> Guidance:
    """The guidance a ``guidance`` config section names (``type``; None → SDS); ``particle``: the
    trainable model of a guidance that has one (VSD)."""
    name = "sds" if guidance_cfg is None else str(getattr(guidance_cfg, "type", guidance_cfg))
    if name not in GUIDANCES:
        raise ValueError(f"unknown guidance type {name!r}; expected one of {sorted(GUIDANCES)}")
    return GUIDANCES[name].from_config(guidance_cfg, particle=particle)
