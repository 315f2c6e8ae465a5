"""The training loop: wires cameras, renderer, field, teacher and estimator.

One step (DESIGN.md)::

    cameras (R) ──► render ──► teacher.encode ──► x: (R, C, h, w)   upstream, carries the graph
    estimator.estimate(x, predict_noise)  ──► latent gradient g (R, C, h, w), surrogate
    (surrogate + regularisers).backward()  ──► one backward per render ──► Adam step

The estimator is the only seam between the loop and the score-distillation method: plain SDS and
CARV are two configurations of it; the loop does not know which one runs.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from carv3d.checkpoint import (generator_state, latest_checkpoint, load_checkpoint, restore_generator,
                               save_checkpoint)
from carv3d.errors import CheckpointError, PromptError, TrainingDivergedError
from carv3d.estimator import build_estimator
from carv3d.estimator.timing import StepTimer
from carv3d.log import logger
from carv3d.devices import resolve_device
from carv3d.parts import build_field, build_renderer
from carv3d.cameras import CameraSampler, view_labels
from carv3d.run_dir import create_run_dir, load_run_config, require_run_dir, write_status
from carv3d.teacher import DiffusersTeacher, load_teacher
from carv3d import outputs


SECTIONS = ("render", "encode", "teacher", "backward", "optimizer")  # the step's timed sections


def resolve_sync_free(value: str, device: torch.device) -> bool:
    """``train.sync_free``: auto → on for CUDA (where a host sync stalls the launch queue), off elsewhere.

    On the CPU kernels run synchronously, so there is nothing to gain; ``on`` still works there (the
    tests use it to check the device-side skip against the synchronous one).
    """
    value = str(value)
    if value not in ("auto", "on", "off"):
        raise ValueError(f"train.sync_free is '{value}'; expected auto, on or off")
    return value == "on" or (value == "auto" and device.type == "cuda")


class Trainer:
    """Score distillation of one prompt into a NeRF. Construct, then :meth:`run`.

    Args:
        cfg: the resolved config.
        run_dir: where the run writes (None until :func:`train` creates it).
        teacher: an already loaded teacher to use instead of loading ``cfg.teacher`` (benchmarks and
            sweeps that build many trainers over one teacher); it must match ``cfg.teacher``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Optional[Path] = None, teacher: Optional[DiffusersTeacher] = None):
        if not cfg.prompt or not str(cfg.prompt).strip():
            raise PromptError('the prompt is empty; pass one with --prompt "a red cube" or prompt=... in a config.')
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        seed = int(cfg.train.seed)
        # Host draws (cameras, shading choice) and device draws (ray jitter, t, ε) have their own
        # generators, so a run is reproducible from (config, seed) on the same hardware and backend.
        self.host_generator = torch.Generator().manual_seed(seed)
        self.device_generator = torch.Generator(device=self.device).manual_seed(seed + 1)

        self.teacher = teacher if teacher is not None else load_teacher(cfg.teacher, self.device)
        self.embedding = self.teacher.embed(
            cfg.prompt, cfg.teacher.negative_prompt, view_dependent=cfg.teacher.view_dependent_prompting
        )
        self.field = build_field(cfg, self.device, seed)
        self.renderer = build_renderer(cfg, self.device, seed)
        self.camera_sampler = CameraSampler.from_config(cfg.camera)
        self.estimator = build_estimator(cfg.estimator, self.teacher.alphas_cumprod, self.device)
        self.sync_free = resolve_sync_free(cfg.train.sync_free, self.device)
        # Sync-free steps use fused Adam: its `found_inf` input skips a step on the device (as
        # GradScaler does), so deciding to skip a non-finite step needs no host round trip.
        self.optimizer = torch.optim.Adam(
            self.field.parameter_groups(cfg.optim.lr_grid, cfg.optim.lr_mlp)
            + [{"params": list(self.renderer.parameters()), "lr": cfg.optim.lr_background, "name": "background"}],
            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **({"fused": True} if self.sync_free else {}),
        )
        self.step = 0
        self._nonfinite_in_a_row = 0
        self._nonfinite_total = 0
        # Sync-free: the same counters as device tensors, folded into the ints above when read.
        self._pending_in_a_row: Optional[torch.Tensor] = None
        self._pending_total: Optional[torch.Tensor] = None
        self._pending_longest: Optional[torch.Tensor] = None  # longest run of skips in the window
        self._nonfinite_longest_unchecked = 0
        self.elapsed_seconds = 0.0
        # Render / encode / backward / optimizer times: CUDA events on GPU, read on log steps only.
        self.timer = StepTimer(self.device)
        self._timed_steps = 0
        logger.info("device %s; hash grid backend %s; sampler %s; teacher %s; sync-free steps %s",
                    self.device, self.field.encoding_backend, self.renderer.sampler, cfg.teacher.pretrained,
                    "on" if self.sync_free else "off")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "field": self.field.state_dict(),
            "renderer": self.renderer.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "estimator": self.estimator.state_dict(),
            "camera_sampler": self.camera_sampler.state_dict(),
            "host_generator": generator_state(self.host_generator),
            "device_generator": generator_state(self.device_generator),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,  # a final save can fall inside a run of skips
            "elapsed_seconds": self.elapsed_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.field.load_state_dict(state["field"])
            self.renderer.load_state_dict(state["renderer"])
            self.optimizer.load_state_dict(state["optimizer"])
            self._match_optimizer_to_step_mode()
            self.estimator.load_state_dict(state["estimator"])
            self.camera_sampler.load_state_dict(state["camera_sampler"])
            restore_generator(self.host_generator, state["host_generator"])
            restore_generator(self.device_generator, state["device_generator"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint does not match this run's config ({str(err).splitlines()[0][:200]}).") from None
        self.step = int(state["step"])
        self._pending_in_a_row = self._pending_total = self._pending_longest = None
        self._nonfinite_total = int(state.get("nonfinite_total", 0))
        self._nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self._nonfinite_longest_unchecked = 0
        self.elapsed_seconds = float(state.get("elapsed_seconds", 0.0))

    def _match_optimizer_to_step_mode(self) -> None:
        """Make a loaded optimizer state fit this run's step mode.

        ``Optimizer.load_state_dict`` restores the saved groups' ``fused``/``foreach`` flags, so a
        checkpoint written without sync-free steps would resume with non-fused Adam, which refuses
        ``found_inf``. The flags follow this run, and Adam's step counts move to where that
        implementation keeps them (fused: float32 on the parameter's device; otherwise the CPU).
        """
        for group in self.optimizer.param_groups:
            group["fused"] = True if self.sync_free else None
            group["foreach"] = None
            for param in group["params"]:
                state = self.optimizer.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    device = param.device if self.sync_free else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ non-finite steps
    def _fold_pending(self) -> None:
        """Read the device-side skip counters (one host sync) into the host ones."""
        if self._pending_total is not None:
            assert self._pending_in_a_row is not None and self._pending_longest is not None
            in_a_row, total, longest = torch.stack(
                [self._pending_in_a_row, self._pending_total, self._pending_longest]).tolist()
            self._nonfinite_in_a_row = int(in_a_row)  # started from the host count, so it is the whole run
            self._nonfinite_longest_unchecked = max(self._nonfinite_longest_unchecked, int(longest))
            if int(total) > 0:
                logger.warning("steps up to %d: %d non-finite step(s) skipped since the last check (%d in a row now)",
                               self.step, int(total), int(in_a_row))
            self._nonfinite_total += int(total)
            self._pending_in_a_row = self._pending_total = self._pending_longest = None

    @property
    def nonfinite_in_a_row(self) -> int:
        """Skipped (non-finite) steps in a row up to now (reading it syncs in sync-free mode)."""
        self._fold_pending()
        return self._nonfinite_in_a_row

    @property
    def nonfinite_total(self) -> int:
        """All skipped steps of the run (reading it syncs in sync-free mode)."""
        self._fold_pending()
        return self._nonfinite_total

    def check_divergence(self) -> None:
        """Stop with :class:`TrainingDivergedError` after ``train.max_nonfinite_steps`` skips in a row.

        In sync-free mode the counters are read only here, so a run of skips that ended before this
        check counts too (the device keeps the longest run of the window), as the synchronous path,
        which checks every step, would have stopped inside it.
        """
        in_a_row = max(self.nonfinite_in_a_row, self._nonfinite_longest_unchecked)
        self._nonfinite_longest_unchecked = 0
        if in_a_row >= self.cfg.train.max_nonfinite_steps:
            where = self.run_dir / "checkpoints" if self.run_dir is not None else "the run directory"
            raise TrainingDivergedError(
                f"{in_a_row} non-finite steps in a row at step {self.step}; training stopped. "
                f"The last good checkpoint in {where} is intact. Try a lower learning rate "
                "(optim.lr_grid), a lower teacher.guidance_scale or estimator.gradient_clip."
            )

    def timing_metrics(self) -> dict[str, float]:
        """Mean milliseconds per step of each section since the last call (syncs with CUDA), then reset."""
        steps = max(self._timed_steps, 1)
        totals = self.timer.totals()
        self.timer.reset()
        self._timed_steps = 0
        return {f"time_{name}_ms": 1000.0 * totals.get(name, 0.0) / steps for name in SECTIONS}

    def save(self) -> Path:
        return save_checkpoint(self.run_dir, self.step, self.state_dict())

    # ------------------------------------------------------------------ one step
    def _predict_noise_for(self, labels: list[str]):
        cond = self.teacher.conditioning(self.embedding, labels)
        guidance = float(self.cfg.teacher.guidance_scale)

        def predict_noise(x_t: torch.Tensor, t: torch.Tensor, upstream_index: torch.Tensor) -> torch.Tensor:
            with self.timer("teacher"):
                return self.teacher.predict_noise(x_t, t, cond.select(upstream_index), guidance)

        return predict_noise

    def _regularisers(self, out) -> dict[str, torch.Tensor]:
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

    def train_step(self) -> Optional[dict[str, Any]]:
        """One optimisation step; returns its metrics as tensors (no host sync), or None when skipped."""
        cfg = self.cfg
        self.field.train()
        self.renderer.train()
        self.renderer.update_occupancy(self.field, self.step)
        n_renders = int(cfg.estimator.upstream_samples)
        # Labels from the cameras while they are still on the CPU: reading them on the GPU is a sync.
        cameras = self.camera_sampler.sample(n_renders, self.host_generator, "cpu")
        labels = view_labels(cameras, cfg.camera.front_half_angle, cfg.camera.overhead_elevation)
        cameras = cameras.to(self.device, non_blocking=True)
        shading = self.renderer.sample_shading(self.host_generator)

        with self.estimator.timer("upstream"):
            with self.timer("render"):
                out = self.renderer(self.field, cameras, generator=self.device_generator, shading=shading,
                                    need_normals=cfg.optim.orientation_weight > 0)
            with self.timer("encode"):
                latents = self.teacher.encode(out.rgb)
        result = self.estimator.estimate(latents, self._predict_noise_for(labels), self.device_generator, self.step)
        regularisers = self._regularisers(out)
        loss = result.surrogate + sum(regularisers.values(), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        with self.estimator.timer("upstream"), self.timer("backward"):
            loss.backward()

        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros((), device=self.device)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self._timed_steps += 1
        if self.sync_free:
            self._sync_free_update(finite)
        elif not bool(finite):  # the one host sync of a (synchronous) step
            self.optimizer.zero_grad(set_to_none=True)
            self._nonfinite_in_a_row += 1
            self._nonfinite_total += 1
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step, self._nonfinite_in_a_row)
            self.check_divergence()
            self.step += 1
            return None
        else:
            self._nonfinite_in_a_row = 0
            with self.timer("optimizer"):
                self.optimizer.step()
        self.step += 1
        metrics: dict[str, Any] = {
            "step_finite": finite,
            "sds_gradient_norm": result.latent_gradient.norm() / n_renders,
            "parameter_gradient_norm": grad_norm,
            "opacity_mean": out.opacity.mean().detach(),
            **{f"loss_{k}": v.detach() for k, v in regularisers.items()},
            **result.stats,
        }
        return metrics

    def train_until(self, seconds: float) -> int:
        """Take steps until the training clock :attr:`elapsed_seconds` reaches ``seconds``; returns how many.

        The clock counts only time spent inside steps, synchronised on CUDA so that queued kernels are
        paid by the step that launched them. Whatever a caller does between two calls (evaluating the
        live scene, saving) is therefore not training time: benchmarks that compare methods at equal
        wall clock train in slices with this. No logging, validation or checkpoints (that is :meth:`run`).
        """
        taken = 0
        while self.elapsed_seconds < seconds:
            started = time.perf_counter()
            self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.elapsed_seconds += time.perf_counter() - started
            taken += 1
            if self.sync_free:  # the clock already synchronised: reading the skip counters is free
                self.check_divergence()
        return taken

    def _sync_free_update(self, finite: torch.Tensor) -> None:
        """Optimizer step and skip bookkeeping without reading ``finite`` on the host.

        Fused Adam reads ``found_inf`` on the device: 1 leaves parameters, moments and step counts
        untouched, which is exactly the synchronous path's skip. The skip counters are device tensors
        (in a row: reset by a finite step; total) folded into the host counters when read.
        """
        skipped = (~finite).to(torch.float32)
        self.optimizer.found_inf = skipped  # type: ignore[attr-defined]
        try:
            with self.timer("optimizer"):
                self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]
        if self._pending_total is None:  # a new window: the in-a-row count continues the host's
            self._pending_in_a_row = torch.full((), float(self._nonfinite_in_a_row), device=self.device)
            self._pending_total = torch.zeros((), device=self.device)
            self._pending_longest = torch.zeros((), device=self.device)
        assert self._pending_in_a_row is not None and self._pending_longest is not None
        self._pending_in_a_row = (self._pending_in_a_row + 1.0) * skipped
        self._pending_total = self._pending_total + skipped
        self._pending_longest = torch.maximum(self._pending_longest, self._pending_in_a_row)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Path:
        cfg = self.cfg
        writer = outputs.MetricsWriter(self.run_dir, tensorboard=cfg.train.tensorboard)
        write_status(self.run_dir, status="running", step=self.step, steps=int(cfg.train.steps),
                     backends={"hash_grid": self.field.encoding_backend, "sampler": self.renderer.sampler,
                               "device": str(self.device)})
        interrupted = False
        previous_sigint = signal.getsignal(signal.SIGINT)
        bar = tqdm(total=int(cfg.train.steps), initial=self.step, desc="carv3d train", unit="step",
                   disable=not cfg.train.progress, dynamic_ncols=True)
        try:
            while self.step < cfg.train.steps:
                started = time.perf_counter()
                metrics = self.train_step()
                log_step = self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps
                check_step = log_step or (cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0)
                if self.sync_free and check_step and self.device.type == "cuda":
                    # Sync-free steps only queue work; the clock takes the device's backlog in here.
                    torch.cuda.synchronize(self.device)
                self.elapsed_seconds += time.perf_counter() - started
                bar.update(1)
                if self.sync_free and check_step:
                    self.check_divergence()  # sync-free steps read their skip counters only here
                if metrics is not None and log_step:
                    metrics.update(self.timing_metrics())
                    logged = writer.write(self.step, metrics, elapsed_seconds=self.elapsed_seconds)
                    bar.set_postfix(sds=f"{logged['sds_gradient_norm']:.3g}", K=logged.get("noise_draws", "-"))
                if cfg.train.val_every > 0 and self.step % cfg.train.val_every == 0:
                    outputs.write_validation(self)
                # No checkpoint inside a run of skipped steps: the last one saved stays the last good one.
                if cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0 \
                        and self.nonfinite_in_a_row == 0:
                    self.save()
        except KeyboardInterrupt:
            interrupted = True
            bar.write("[carv3d] interrupted: saving a checkpoint and exporting before exit")
        except TrainingDivergedError:
            write_status(self.run_dir, status="diverged", step=self.step)
            raise
        finally:
            bar.close()
            writer.close()
        # Ignore a second Ctrl-C while the final checkpoint and exports are written.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.save()
            outputs.finish(self, interrupted=interrupted)
            write_status(self.run_dir, status="interrupted" if interrupted else "finished", step=self.step,
                         elapsed_seconds=self.elapsed_seconds, nonfinite_steps=self.nonfinite_total)
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
        if interrupted:
            raise KeyboardInterrupt
        return self.run_dir


def train(cfg: DictConfig) -> Path:
    """Train a new run from a resolved config; returns the run directory."""
    # Everything that can fail on user input (teacher weights, prompt vocabulary, backends) fails
    # here, before a run directory exists: a failed start leaves nothing behind.
    trainer = Trainer(cfg)
    trainer.run_dir = create_run_dir(cfg)
    logger.info("run directory %s", trainer.run_dir)
    return trainer.run()


def resume(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """Continue a run from its config and latest checkpoint (overrides may extend train.steps)."""
    run_dir = require_run_dir(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    cfg = load_run_config(run_dir, overrides)
    state = load_checkpoint(checkpoint)
    trainer = Trainer(cfg, run_dir)
    trainer.load_state_dict(state)
    logger.info("resuming %s from step %d", run_dir, trainer.step)
    if overrides:
        from carv3d.config import to_yaml
        from carv3d.io import atomic_write_text
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return trainer.run()


def metrics_to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Turn tensors into floats (the host sync happens here, only on logging steps)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) if not (isinstance(value, float) and math.isnan(value)) else float("nan")
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
