"""The training loop: optimiser, non-finite guard, schedule of logs, validation and checkpoints.

The step itself — cameras, render, encode, estimator, backward — is :class:`carv3d.step.DistillationStep`;
this module only decides what happens around it::

    zero_grad ──► distill(step) ──► guard.step(optimizer, finite) ──► scene.after_step ──► log / validate / save

With ``train.stop_when_converged`` the loop also renders the convergence probes every
``train.converge_check_every`` steps (:mod:`carv3d.convergence`, outside the training clock and the
random streams) and ends early, with the normal end-of-run outputs, once they stopped changing.

Signals: Ctrl-C (SIGINT) and SIGTERM (schedulers, ``docker stop``) both end the loop at the next
step boundary with a checkpoint, so every stopped run can be resumed with ``carv3d train --resume``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from carv3d import outputs
from carv3d.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from carv3d.config import check_prompt, to_yaml
from carv3d.convergence import ConvergenceCheck, ConvergenceDetector
from carv3d.devices import resolve_device
from carv3d.errors import CheckpointError, TrainingDivergedError, UserError
from carv3d.guard import NonFiniteGuard, gradient_norm
from carv3d.io import atomic_write_text
from carv3d.log import logger
from carv3d.sizing import check_memory, size_for_device
from carv3d.run_dir import METRICS_FILE, check_plain_name, create_run_dir, load_run_config, require_run_dir, run_lock, write_status
from carv3d.step import DistillationStep
from carv3d.teacher.base import Teacher


def resolve_sync_free(value: str, device: torch.device) -> bool:
    """``train.sync_free``: auto → on for CUDA (where a host sync stalls the launch queue), off elsewhere.

    On the CPU kernels run synchronously, so there is nothing to gain; ``on`` still works there (the
    tests use it to check the device-side skip against the synchronous one).
    """
    return value == "on" or (value == "auto" and device.type == "cuda")


class Trainer:
    """Score distillation of one prompt into a scene. Construct, then :meth:`run`.

    Args:
        cfg: the resolved config.
        run_dir: where the run writes (None until :func:`train` creates it).
        teacher: an already loaded teacher to use instead of loading ``cfg.teacher`` (benchmarks and
            sweeps that build many trainers over one teacher); it must match ``cfg.teacher``.
    """

    def __init__(self, cfg: DictConfig, run_dir: Optional[Path] = None, teacher: Optional[Teacher] = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.train.device)
        # Sized for the machine before anything is built: on a CPU, keys the user did not set take
        # CPU-sized values (logged; written into the run's config.yaml, so --resume keeps them).
        size_for_device(cfg, self.device)
        check_memory(cfg, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.distill = DistillationStep.from_config(cfg, self.device, teacher)
        self.scene.plan(int(cfg.train.steps))  # resume builds a new Trainer: an extended run re-plans
        self.sync_free = resolve_sync_free(cfg.train.sync_free, self.device)
        self.guard = NonFiniteGuard(self.device, self.sync_free, cfg.train.max_nonfinite_steps)
        # Sync-free steps use fused Adam: its `found_inf` input skips a step on the device.
        self.optimizer = self.build_optimizer()
        self.step = 0
        self.elapsed_seconds = 0.0
        self._timed_steps = 0
        self._last_checkpoint: Optional[Path] = None
        self.convergence = ConvergenceDetector.from_config(cfg, self.device) if cfg.train.stop_when_converged else None
        logger.info("device %s; scene %s (%s); teacher %s; guidance %s; sync-free steps %s", self.device,
                    cfg.scene.type, ", ".join(f"{k} {v}" for k, v in self.scene.backends.items()),
                    cfg.teacher.type, cfg.guidance.type, "on" if self.sync_free else "off")

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam on the scene's parameter groups (sync-free steps use fused Adam: its `found_inf` input
        skips a step on the device)."""
        optim = self.cfg.optim
        return torch.optim.Adam(self.scene.parameter_groups(optim), betas=tuple(optim.betas), eps=optim.eps,
                                **({"fused": True} if self.sync_free else {}))

    # The parts, as the step holds them.
    @property
    def scene(self):
        return self.distill.scene

    @property
    def teacher(self) -> Teacher:
        return self.distill.teacher

    @property
    def estimator(self):
        return self.distill.estimator

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {**self.distill.state_dict(), "optimizer": self.optimizer.state_dict(),
                 **self.guard.state_dict(), "elapsed_seconds": self.elapsed_seconds}
        if self.convergence is not None:
            state["convergence"] = self.convergence.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.distill.load_state_dict(state)
            # Built again on the loaded scene: a scene's parameters may have changed shape during the
            # run (Gaussians' densification), and the optimiser must hold the loaded tensors.
            self.optimizer = self.build_optimizer()
            self.optimizer.load_state_dict(state["optimizer"])
            self.guard.match_optimizer(self.optimizer)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"the checkpoint does not match this run's config ({str(err).splitlines()[0][:200]}).") from None
        self.step = int(state["step"])
        self.guard.load_state_dict(state)
        self.elapsed_seconds = float(state.get("elapsed_seconds", 0.0))
        # A checkpoint of a run without the detector (or before it): its first check starts afresh.
        if self.convergence is not None and "convergence" in state:
            self.convergence.load_state_dict(state["convergence"])

    def check_divergence(self) -> None:
        """Stop with :class:`TrainingDivergedError` after ``train.max_nonfinite_steps`` skips in a row."""
        self.guard.check(self.step, str(self._last_checkpoint) if self._last_checkpoint else None)

    def timing_metrics(self) -> dict[str, float]:
        """Mean milliseconds per step of each section since the last call (syncs with CUDA), then reset."""
        metrics = self.distill.timing_metrics(self._timed_steps)
        self._timed_steps = 0
        return metrics

    def save(self) -> Optional[Path]:
        """Write a checkpoint and record it in run.json — unless a parameter is not finite: a
        checkpoint is only ever a state worth resuming (then the run stops as diverged)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.scene.parameters()):
            raise TrainingDivergedError(
                f"the scene's parameters are not finite at step {self.step}; no checkpoint written. "
                + (f"The last good checkpoint, {self._last_checkpoint}, is intact. " if self._last_checkpoint
                   else "No checkpoint had been written yet. ")
                + "Try a lower learning rate (optim.lr_grid) or estimator.gradient_clip.")
        self._last_checkpoint = save_checkpoint(self.run_dir, self.step, self.state_dict())
        write_status(self.run_dir, status="running", step=self.step, steps=int(self.cfg.train.steps),
                     elapsed_seconds=self.elapsed_seconds, checkpoint=self._last_checkpoint.name,
                     backends={**self.scene.backends, "device": str(self.device)})
        return self._last_checkpoint

    # ------------------------------------------------------------------ one step
    def train_step(self) -> Optional[dict[str, Any]]:
        """One optimisation step; returns its metrics as tensors (no host sync), or None when skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.distill(self.step)
        grad_norm = gradient_norm(self.optimizer)
        finite = torch.isfinite(out.loss) & torch.isfinite(grad_norm)
        self._timed_steps += 1
        stepped = self.guard.step(self.optimizer, finite, self.distill.timer)
        self.step += 1
        if not stepped:
            logger.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step - 1,
                           self.guard.in_a_row())
            self.check_divergence()
            return None
        self.scene.after_step(self.step, self.optimizer)
        return {"step_finite": finite, "parameter_gradient_norm": grad_norm, **out.metrics()}

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

    # ------------------------------------------------------------------ the loop
    def _check_convergence(self, stepped: bool) -> Optional[ConvergenceCheck]:
        """The convergence probes at this step when due (None otherwise); a skipped (non-finite) step
        changed nothing, so it is not checked. Not training time: the clock is not running."""
        if self.convergence is None or not self.convergence.due(self.step) or not stepped:
            return None
        check = self.convergence.check(self.scene, self.step)
        if check.converged:
            rule = self.convergence.rule
            logger.info("converged at step %d of %d: the probe renders changed by less than %g (train.converge_tolerance) "
                        "at %d checks in a row, %d steps apart; stopping here (probes took %.1f s in all; "
                        "train.stop_when_converged=false trains every step)", self.step, int(self.cfg.train.steps),
                        rule.tolerance, check.still, self.convergence.check_every, check.seconds)
        return check

    def _loop(self, writer: outputs.MetricsWriter, bar: tqdm) -> None:
        cfg = self.cfg.train
        if self.convergence is not None and self.convergence.stopped_at is not None:
            logger.info("this run had converged at step %d; continuing to step %d (it stops again after %d still checks "
                        "in a row)", self.convergence.stopped_at, int(cfg.steps), self.convergence.rule.patience)
            self.convergence.restart()
        while self.step < cfg.steps:
            started = time.perf_counter()
            metrics = self.train_step()
            stepped = metrics is not None
            if self.sync_free and self.convergence is not None and self.convergence.due(self.step):
                stepped = self.guard.in_a_row(self.step) == 0  # sync-free steps only know it here (a sync)
            log_step = self.step % cfg.log_every == 0 or self.step == cfg.steps
            checkpoint_step = cfg.checkpoint_every > 0 and self.step % cfg.checkpoint_every == 0
            if self.sync_free and (log_step or checkpoint_step) and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # sync-free steps only queue work; the clock takes the backlog here
            self.elapsed_seconds += time.perf_counter() - started
            bar.update(1)
            if self.sync_free and (log_step or checkpoint_step):
                self.check_divergence()  # sync-free steps read their skip counters only here
            check = self._check_convergence(stepped)
            stop = check is not None and check.converged
            if metrics is not None and (log_step or stop):
                metrics.update(self.timing_metrics())
                metrics.update(check.metrics() if check is not None else {})
                logged = writer.write(self.step, metrics, elapsed_seconds=self.elapsed_seconds)
                bar.set_postfix(sds=f"{logged['sds_gradient_norm']:.3g}", K=logged.get("noise_draws", "-"))
            elif check is not None:  # a check between logged steps gets a row of its own
                writer.write(self.step, check.metrics(), elapsed_seconds=self.elapsed_seconds)
            if cfg.val_every > 0 and self.step % cfg.val_every == 0:
                outputs.attempt("validation sheet", outputs.write_validation, self.scene, self.estimator,
                                self.run_dir, self.step, cfg.val_resolution)
            # No checkpoint inside a run of skipped steps: the last one saved stays the last good one.
            if checkpoint_step and self.guard.in_a_row(self.step) == 0:
                self.save()
            if stop:  # run() writes the final checkpoint and the outputs, as at the last step
                break

    def run(self) -> Path:
        cfg = self.cfg
        assert self.run_dir is not None
        write_status(self.run_dir, status="running", step=self.step, steps=int(cfg.train.steps),
                     elapsed_seconds=self.elapsed_seconds, backends={**self.scene.backends, "device": str(self.device)})
        writer = outputs.MetricsWriter(self.run_dir, tensorboard=cfg.train.tensorboard, start_step=self.step)
        bar = tqdm(total=int(cfg.train.steps), initial=self.step, desc="carv3d train", unit="step",
                   disable=not cfg.train.progress, dynamic_ncols=True)
        interrupted = False
        try:
            with stop_signals_as_keyboard_interrupt():
                self._loop(writer, bar)
        except KeyboardInterrupt:
            interrupted = True
            bar.write("[carv3d] interrupted: saving a checkpoint and writing the outputs before exit "
                      "(Ctrl-C again skips the outputs)")
        except TrainingDivergedError:
            self._write_diverged()
            raise
        except UserError as err:  # a full disk, say: the last checkpoint stands, the run can resume
            self._write_stopped(err)
            raise
        finally:
            bar.close()
            writer.close()
        try:
            with ignore_stop_signals():  # the checkpoint is written whole, whatever arrives meanwhile
                self.save()
        except TrainingDivergedError:
            self._write_diverged()
            raise
        except UserError as err:
            self._write_stopped(err)
            raise
        failed = self._finish()
        convergence = {"convergence": self.convergence.summary()} if self.convergence is not None else {}
        write_status(self.run_dir, status="interrupted" if interrupted else "finished", step=self.step,
                     steps=int(cfg.train.steps), elapsed_seconds=self.elapsed_seconds,
                     nonfinite_steps=self.guard.total(self.step), checkpoint=self._last_checkpoint.name,
                     outputs_failed=failed, **convergence)
        if interrupted:
            raise KeyboardInterrupt
        return self.run_dir

    def _write_diverged(self) -> None:
        write_status(self.run_dir, status="diverged", step=self.step, elapsed_seconds=self.elapsed_seconds,
                     checkpoint=self._last_checkpoint.name if self._last_checkpoint else None)

    def _write_stopped(self, err: Exception) -> None:
        """run.json for a run stopped by a user-side error (it can be resumed once that is fixed)."""
        try:
            write_status(self.run_dir, status="stopped", step=self.step, elapsed_seconds=self.elapsed_seconds,
                         checkpoint=self._last_checkpoint.name if self._last_checkpoint else None,
                         error=str(err).splitlines()[0][:500])
        except (OSError, UserError):  # the disk may still be full: the error itself is what matters
            pass

    def _finish(self) -> list[str]:
        """The end-of-run outputs; a Ctrl-C or SIGTERM here skips the outputs not yet written."""
        try:
            with stop_signals_as_keyboard_interrupt():
                return outputs.finish(self.scene, self.estimator, self.run_dir, self.cfg, self.step)
        except KeyboardInterrupt:
            logger.warning("outputs skipped; make them later with `carv3d export %s` and `carv3d render %s`",
                           self.run_dir, self.run_dir)
            return ["skipped (interrupted)"]


@contextlib.contextmanager
def stop_signals_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (a checkpoint, then a clean, resumable exit) inside the block."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ignore_stop_signals() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg: DictConfig) -> Path:
    """Train a new run from a resolved config; returns the run directory."""
    # Everything that can fail on user input (the run name, teacher weights, prompt vocabulary,
    # backends) fails here, before a run directory exists: a failed start leaves nothing behind.
    check_prompt(cfg.prompt)  # before the machine's sizing lines and the (slow) teacher load
    if cfg.train.run_name:
        check_plain_name(cfg.train.run_name)
    trainer = Trainer(cfg)
    trainer.run_dir = create_run_dir(cfg)
    logger.info("run directory %s", trainer.run_dir)
    with run_lock(trainer.run_dir):
        return trainer.run()


def resume(run_dir: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Path:
    """Continue a run from its config and latest checkpoint (overrides may extend train.steps)."""
    run_dir = require_run_dir(run_dir)
    with run_lock(run_dir):  # a second --resume of the same run is refused; stale temporaries removed
        checkpoint = latest_checkpoint(run_dir)
        cfg = load_run_config(run_dir, overrides)
        state = load_checkpoint(checkpoint)
        trainer = Trainer(cfg, run_dir)
        trainer.load_state_dict(state)
        trainer._last_checkpoint = checkpoint
        logger.info("resuming %s from step %d", run_dir, trainer.step)
        if overrides:
            atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        return trainer.run()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
