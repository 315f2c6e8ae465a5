"""Skipping non-finite steps, with or without host syncs (in the spirit of ``torch.amp.GradScaler``).

A step whose loss or gradient is not finite is skipped: parameters, Adam's moments and step counts
stay as they were. After ``max_in_a_row`` skips in a row the run stops (:class:`TrainingDivergedError`).

- **synchronous** (CPU default): ``finite`` is read on the host every step (one sync), and the
  optimiser steps or not.
- **sync-free** (CUDA default): fused Adam reads ``found_inf`` on the device — 1 leaves everything
  untouched, exactly the synchronous skip — and the skip counters are device tensors folded into
  the host counters only when read (log and checkpoint steps). A run of skips that ended between
  two reads still counts: the device keeps the longest run of the window.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch

from carv3d.errors import TrainingDivergedError
from carv3d.log import logger


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """‖∇θ‖₂ over every parameter of the optimiser that has a gradient (a device tensor, no sync)."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        device = optimizer.param_groups[0]["params"][0].device
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


class NonFiniteGuard:
    """Counts and skips non-finite steps (see the module docstring).

    Args:
        device: where the device-side counters live.
        sync_free: the device-side skip (needs an optimiser built with ``fused=True``).
        max_in_a_row: stop after this many skips in a row.
    """

    def __init__(self, device: torch.device, sync_free: bool, max_in_a_row: int):
        self.device, self.sync_free, self.max_in_a_row = device, bool(sync_free), int(max_in_a_row)
        self._in_a_row = 0
        self._total = 0
        self._longest_unchecked = 0
        # Sync-free: the same counters as device tensors, folded into the ints above when read.
        self._pending: Optional[dict[str, torch.Tensor]] = None

    # ------------------------------------------------------------------ the step
    def step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor,
             timer: Optional[Callable[[str], Any]] = None) -> bool:
        """Step ``optimizer`` unless ``finite`` is False. Returns False when the synchronous path
        skipped (the sync-free path does not know on the host and returns True)."""
        if self.sync_free:
            self._sync_free_step(optimizer, finite, timer)
            return True
        if not bool(finite):  # the one host sync of a synchronous step
            optimizer.zero_grad(set_to_none=True)
            self._in_a_row += 1
            self._total += 1
            return False
        self._in_a_row = 0
        with _timed(timer, "optimizer"):
            optimizer.step()
        return True

    def _sync_free_step(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor,
                        timer: Optional[Callable[[str], Any]]) -> None:
        skipped = (~finite).to(torch.float32)
        optimizer.found_inf = skipped  # type: ignore[attr-defined]
        try:
            with _timed(timer, "optimizer"):
                optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
        if self._pending is None:  # a new window: the in-a-row count continues the host's
            self._pending = {"in_a_row": torch.full((), float(self._in_a_row), device=self.device),
                             "total": torch.zeros((), device=self.device),
                             "longest": torch.zeros((), device=self.device)}
        p = self._pending
        p["in_a_row"] = (p["in_a_row"] + 1.0) * skipped
        p["total"] = p["total"] + skipped
        p["longest"] = torch.maximum(p["longest"], p["in_a_row"])

    # ------------------------------------------------------------------ counters
    def _fold(self, step: int) -> None:
        """Read the device-side counters (one host sync) into the host ones."""
        if self._pending is None:
            return
        in_a_row, total, longest = torch.stack(
            [self._pending["in_a_row"], self._pending["total"], self._pending["longest"]]).tolist()
        self._pending = None
        self._in_a_row = int(in_a_row)  # started from the host count, so it is the whole run's
        self._longest_unchecked = max(self._longest_unchecked, int(longest))
        if int(total) > 0:
            logger.warning("steps up to %d: %d non-finite step(s) skipped since the last check (%d in a row now)",
                           step, int(total), int(in_a_row))
        self._total += int(total)

    def in_a_row(self, step: int = -1) -> int:
        """Skipped steps in a row up to now (reading it syncs in sync-free mode)."""
        self._fold(step)
        return self._in_a_row

    def total(self, step: int = -1) -> int:
        """All skipped steps of the run (reading it syncs in sync-free mode)."""
        self._fold(step)
        return self._total

    def check(self, step: int, last_checkpoint: Optional[str]) -> None:
        """Raise :class:`TrainingDivergedError` after ``max_in_a_row`` skips in a row.

        ``last_checkpoint``: where the last good checkpoint is, for the message (None: there is none).
        """
        in_a_row = max(self.in_a_row(step), self._longest_unchecked)
        self._longest_unchecked = 0
        if in_a_row < self.max_in_a_row:
            return
        kept = (f"The last good checkpoint, {last_checkpoint}, is intact." if last_checkpoint
                else "No checkpoint had been written yet.")
        raise TrainingDivergedError(
            f"{in_a_row} non-finite steps in a row at step {step}; training stopped. {kept} Try a lower "
            "learning rate (optim.lr_grid), a lower teacher.guidance_scale or estimator.gradient_clip.")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_total": self.total(), "nonfinite_in_a_row": self.in_a_row()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        self._total = int(state.get("nonfinite_total", 0))
        self._in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self._longest_unchecked = 0

    def match_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make a loaded optimiser state fit this guard's step mode.

        ``Optimizer.load_state_dict`` restores the saved groups' ``fused``/``foreach`` flags, so a
        checkpoint written without sync-free steps would resume with non-fused Adam, which refuses
        ``found_inf``. The flags follow this run, and Adam's step counts move to where that
        implementation keeps them (fused: float32 on the parameter's device; otherwise the CPU).
        """
        for group in optimizer.param_groups:
            group["fused"] = True if self.sync_free else None
            group["foreach"] = None
            for param in group["params"]:
                state = optimizer.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    device = param.device if self.sync_free else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)


def _timed(timer: Optional[Callable[[str], Any]], name: str) -> Any:
    return timer(name) if timer is not None else nullcontext()
