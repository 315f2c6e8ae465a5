"""One distillation step, the one place it is written (training, `carv3d variance` and the benchmarks).

::

    cameras (R, host) ──► scene.render ──► teacher.encode ──► x: (R, C, h, w)     upstream, carries the graph
    estimator.estimate(x, teacher predictions, guidance)  ──► g: (R, C, h, w), surrogate = Σ⟨x, sg(g)⟩ / R
    loss = surrogate + regularisers ──► loss.backward()   one backward per render

:class:`DistillationStep` owns the scene, camera sampler, teacher, estimator and the step's random
generators; :meth:`DistillationStep.__call__` runs the three lines above and leaves the gradient in
the parameters' ``.grad``. Whoever calls it owns what happens to the gradient (the trainer's
optimiser, the variance report's Welford sums).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from carv3d.cameras import CameraSampler, view_labels
from carv3d.checkpoint import generator_state, restore_generator
from carv3d.config import check_prompt
from carv3d.estimator import EstimateResult, ScoreDistillationEstimator, build_estimator
from carv3d.estimator.timing import StepTimer
from carv3d.scene import Scene, build_scene
from carv3d.teacher import load_teacher
from carv3d.teacher.base import Conditioning, Teacher
from carv3d.teacher.fast import auto_compile_for_run
from carv3d.teacher.lora import build_particle

SECTIONS = ("render", "encode", "teacher", "particle", "backward", "optimizer")  # the step's timed sections


class TeacherPredictor:
    """The teacher's predictions for the estimator's rows (:class:`carv3d.estimator.NoisePredictor`):
    each row takes the conditioning of the render it was noised from.

    With a particle model (VSD, :class:`carv3d.teacher.lora.LoRAParticle`) it is also a
    :class:`carv3d.estimator.ParticlePredictor`; ``particle_cond`` holds each render's plain-prompt
    text and camera pose, what the particle model is conditioned on.
    """

    def __init__(self, teacher: Teacher, cond: Conditioning, guidance_scale: float, timer: StepTimer,
                 particle: Any = None, particle_cond: Optional[Conditioning] = None):
        self.teacher, self.cond, self.guidance_scale, self.timer = teacher, cond, float(guidance_scale), timer
        self.particle, self.particle_cond = particle, particle_cond

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, upstream_index: torch.Tensor) -> torch.Tensor:
        with self.timer("teacher"):
            return self.teacher.predict_noise(x_t, t, self.cond.select(upstream_index), self.guidance_scale)

    def branches(self, x_t: torch.Tensor, t: torch.Tensor,
                 upstream_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.timer("teacher"):
            return self.teacher.predict_noise_branches(x_t, t, self.cond.select(upstream_index))

    def _particle_rows(self, upstream_index: torch.Tensor) -> Conditioning:
        if self.particle is None or self.particle_cond is None:
            raise TypeError("this guidance needs a particle model (guidance.type vsd builds one in "
                            "DistillationStep.from_config)")
        return self.particle_cond.select(upstream_index)

    def guided_and_particle(self, x_t: torch.Tensor, t: torch.Tensor,
                            upstream_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ε̂_s, ε̂_φ) for the rows, from one mixed-batch U-Net call (``guidance.fused_call``)."""
        particle_rows = self._particle_rows(upstream_index)
        with self.timer("teacher"):
            return self.particle.predict(x_t, t, self.cond.select(upstream_index), particle_rows,
                                         self.guidance_scale)

    def update_particle(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, upstream_index: torch.Tensor,
                        camera_kept: torch.Tensor) -> torch.Tensor:
        """One training step of the particle model on the clean rows x; returns its loss."""
        particle_rows = self._particle_rows(upstream_index)
        with self.timer("particle"):
            return self.particle.update(x, t, noise, particle_rows, camera_kept)


@dataclass
class StepOutput:
    """What one step computed (tensors stay on the device: reading them is the caller's host sync).

    Attributes:
        loss: () the surrogate plus the regularisers; its backward has already run.
        estimate: the estimator's result (latent gradient, stats, timesteps).
        render: the scene's RenderOutput of the R cameras.
        regularisers: name → () weighted term.
    """

    loss: torch.Tensor
    estimate: EstimateResult
    render: Any
    regularisers: dict[str, torch.Tensor]

    def metrics(self) -> dict[str, Any]:
        """The step's scalars for the metrics log, as device tensors."""
        n_renders = self.estimate.latent_gradient.shape[0]
        return {
            "sds_gradient_norm": self.estimate.latent_gradient.norm() / n_renders,
            "opacity_mean": self.render.opacity.mean().detach(),
            **{f"loss_{k}": v.detach() for k, v in self.regularisers.items()},
            **self.estimate.stats,
        }


class DistillationStep:
    """Scene + cameras + teacher + estimator: one distillation step per call.

    Args:
        cfg: the resolved config (sections camera, teacher, optim, estimator.upstream_samples).
        scene, teacher, estimator, camera_sampler: the parts (see :meth:`from_config`).
        seed: the host generator (cameras, shading) starts at ``seed``, the device generator (ray
            jitter, t, ε) at ``seed + 1`` — a run is reproducible from (config, seed) on the same
            hardware and backend.
        timer: the step's section timer (render / encode / teacher / backward); CUDA events on GPU.
    """

    def __init__(self, cfg: DictConfig, scene: Scene, teacher: Teacher, estimator: ScoreDistillationEstimator,
                 camera_sampler: CameraSampler, seed: int, timer: Optional[StepTimer] = None):
        self.cfg, self.scene, self.teacher, self.estimator = cfg, scene, teacher, estimator
        self.camera_sampler = camera_sampler
        self.device = scene.device
        self.host_generator = torch.Generator().manual_seed(seed)
        self.device_generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.timer = timer if timer is not None else StepTimer(self.device)
        self.embedding = teacher.embed(cfg.prompt, cfg.teacher.negative_prompt,  # embed checks the prompt
                                       view_dependent=cfg.teacher.view_dependent_prompting)

    @classmethod
    def from_config(cls, cfg: DictConfig, device: torch.device, teacher: Optional[Teacher] = None,
                    scene_state: Optional[dict[str, Any]] = None) -> "DistillationStep":
        """Build every part from the config (the one place they are built). ``teacher``: an already
        loaded teacher for ``cfg.teacher`` (benchmarks and sweeps share one); ``scene_state``: load
        a saved scene instead of the initial one."""
        check_prompt(cfg.prompt)  # before the (slow) teacher load
        if teacher is None:
            teacher = load_teacher(auto_compile_for_run(cfg.teacher, int(cfg.train.steps)), device)
        seed = int(cfg.train.seed)
        scene = build_scene(cfg.scene, cfg.render, device, seed)
        if scene_state is not None:
            scene.load_state_dict(scene_state, strict=False)
        particle = build_particle(cfg.guidance, teacher, seed)  # VSD's LoRA copy; None for SDS and CSD
        estimator = build_estimator(cfg.estimator, teacher.alphas_cumprod, device, cfg.guidance, particle)
        return cls(cfg, scene, teacher, estimator, CameraSampler.from_config(cfg.camera), seed)

    # ------------------------------------------------------------------ the step
    def __call__(self, step: int, n_renders: Optional[int] = None, frozen: bool = False,
                 update_guidance: Optional[bool] = None) -> StepOutput:
        """One step at training step ``step`` with R = ``n_renders`` (default
        ``estimator.upstream_samples``); the gradient accumulates into the parameters' ``.grad``.
        ``frozen``: the scene is held fixed (gradient measurements), so its per-step hook is skipped.
        ``update_guidance``: train the guidance's own parts (VSD's LoRA); default: unless frozen."""
        cfg = self.cfg
        self.scene.train()
        if not frozen:
            self.scene.before_step(step)
        n_renders = int(cfg.estimator.upstream_samples) if n_renders is None else int(n_renders)
        # Labels from the cameras while they are still on the CPU: reading them on the GPU is a sync.
        cameras = self.camera_sampler.sample(n_renders, self.host_generator, "cpu")
        labels = view_labels(cameras, cfg.camera.front_half_angle, cfg.camera.overhead_elevation)
        cameras = cameras.to(self.device, non_blocking=True)
        shading = self.scene.sample_shading(self.host_generator)

        with self.estimator.timer("upstream"):
            with self.timer("render"):
                out = self.scene.render(cameras, generator=self.device_generator, shading=shading,
                                        need_normals=cfg.optim.orientation_weight > 0)
            with self.timer("encode"):
                latents = self.teacher.encode(out.rgb)
        cond = self.teacher.conditioning(self.embedding, labels, cameras.c2w)
        particle = getattr(self.estimator.guidance, "particle", None)
        particle_cond = None
        if particle is not None:  # the particle model sees the plain prompt and the camera (threestudio's VSD)
            particle_cond = self.teacher.conditioning(self.embedding, [None] * n_renders, cameras.c2w)
        predictor = TeacherPredictor(self.teacher, cond, cfg.teacher.guidance_scale, self.timer, particle,
                                     particle_cond)
        result = self.estimator.estimate(latents, predictor, self.device_generator, step,
                                         update_guidance=not frozen if update_guidance is None else update_guidance)
        regularisers = self.regularisers(out)
        loss = result.surrogate + sum(regularisers.values(), torch.zeros((), device=self.device))
        with self.estimator.timer("upstream"), self.timer("backward"):
            loss.backward()
        return StepOutput(loss, result, out, regularisers)

    def regularisers(self, out: Any) -> dict[str, torch.Tensor]:
        """DreamFusion-style terms on the render: mean opacity, opacity entropy, orientation."""
        o = self.cfg.optim
        terms: dict[str, torch.Tensor] = {}
        if o.sparsity_weight > 0:
            terms["sparsity"] = o.sparsity_weight * out.opacity.mean()
        if o.opacity_entropy_weight > 0:
            a = out.opacity.clamp(1e-5, 1 - 1e-5)
            terms["opacity_entropy"] = o.opacity_entropy_weight * (-(a * a.log() + (1 - a) * (1 - a).log())).mean()
        if o.orientation_weight > 0 and out.orientation_loss is not None:
            terms["orientation"] = o.orientation_weight * out.orientation_loss
        return terms

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.scene.parameters() if p.requires_grad]

    def timing_metrics(self, steps: int) -> dict[str, float]:
        """Mean milliseconds per step of each section over ``steps`` steps (syncs with CUDA), then reset."""
        totals = self.timer.totals()
        self.timer.reset()
        return {f"time_{name}_ms": 1000.0 * totals.get(name, 0.0) / max(steps, 1) for name in SECTIONS}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "scene": self.scene.state_dict(),
            "estimator": self.estimator.state_dict(),
            "camera_sampler": self.camera_sampler.state_dict(),
            "host_generator": generator_state(self.host_generator),
            "device_generator": generator_state(self.device_generator),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scene.load_state_dict(scene_state(state))
        self.estimator.load_state_dict(state["estimator"])
        self.camera_sampler.load_state_dict(state["camera_sampler"])
        restore_generator(self.host_generator, state["host_generator"])
        restore_generator(self.device_generator, state["device_generator"])


def scene_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The scene's state in a checkpoint; checkpoints written before scenes were one module held
    ``field`` and ``renderer`` apart."""
    if "scene" in checkpoint:
        return checkpoint["scene"]
    return {**{f"field.{k}": v for k, v in checkpoint["field"].items()},
            **{f"renderer.{k}": v for k, v in checkpoint["renderer"].items()}}


def guidance_state(checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The guidance's own state in a checkpoint (VSD: the LoRA's weights and optimiser), or None when
    it has none (SDS, CSD, checkpoints from before guidances had state)."""
    return (checkpoint.get("estimator") or {}).get("guidance") or None
