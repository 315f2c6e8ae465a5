"""Wall-clock timers for the cost side of the accounting, without a host sync per step.

On CUDA a section is a pair of CUDA events recorded on the current stream; the elapsed times are
read (one synchronisation) only when someone asks for the totals — every ``auto_every`` steps for
auto-K, or at log time. Elsewhere a section is ``time.perf_counter`` around the work, with the
device synchronised at both ends (a no-op on the CPU, where kernels run synchronously) so the clock
measures the work and not its launch.

Example::

    timer = StepTimer(device)
    with timer("upstream"):
        x = encode(render(...))
    with timer("teacher"):
        eps_hat = unet(x_t, t)
    timer.seconds("upstream"), timer.seconds("teacher")   # totals since the last reset

Steady totals. A run's first call of a shape compiles or records a CUDA graph (tens of seconds at
Stable Diffusion scale), and a JIT build can stall one step; such a step says nothing about what a
step costs. With :meth:`StepTimer.next_step` marking step boundaries, :meth:`StepTimer.steady`
sums only the steps whose total time is at most ``OUTLIER_FACTOR`` × the median step's, so the
cost ratio that chooses K is not dragged by one cold step (a 45-s compile among fifty 50-ms
teacher calls would otherwise make the teacher look 19× dearer: 47.5 s against 2.5 s).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

MAX_PENDING = 4096  # resolve old CUDA events beyond this many, so an unread timer stays small
OUTLIER_FACTOR = 5.0  # a step over this many times the median step is cold (compiling, capturing, building)
MIN_STEPS_FOR_OUTLIERS = 3  # fewer steps have no median to compare with: all count


class StepTimer:
    """Named wall-clock sections and counters, accumulated until :meth:`reset`.

    Args:
        device: the device the timed work runs on; CUDA uses events.
        clock: a seconds clock for tests or custom timing; given, it is used on every device
            (after synchronising the device).
    """

    def __init__(self, device: Any = None, clock: Optional[Callable[[], float]] = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.use_events = self.device.type == "cuda" and clock is None
        self.clock = clock or time.perf_counter
        self._open: dict[str, Any] = {}
        self._pending: list[tuple[str, Any, Any, int]] = []  # (name, start, end, step group)
        # seconds and counts per step group (next_step; one group until it is called); the totals are
        # their sums. A restored window is one aggregate group, kept whole and left out of the median.
        self._group_seconds: list[dict[str, float]] = [{}]
        self._group_counts: list[dict[str, float]] = [{}]
        self._group_aggregate: list[bool] = [False]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def start(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"timer section '{name}' is already running")
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._open[name] = event
        else:
            self._synchronize()
            self._open[name] = self.clock()

    def stop(self, name: str) -> None:
        started = self._open.pop(name)
        if self.use_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._pending.append((name, started, event, len(self._group_seconds) - 1))
            if len(self._pending) > MAX_PENDING:
                self._resolve(len(self._pending) // 2)
        else:
            self._synchronize()
            self.record(name, self.clock() - started)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """``with timer("upstream"): ...`` times the block into section ``name``."""
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def record(self, name: str, seconds: float, group: Optional[int] = None) -> None:
        """Add a duration measured elsewhere (to the current step, or to step group ``group``)."""
        into = self._group_seconds[-1 if group is None else group]
        into[name] = into.get(name, 0.0) + float(seconds)

    def add_count(self, name: str, n: float = 1.0) -> None:
        """Count things (renders, teacher draws) alongside the times."""
        into = self._group_counts[-1]
        into[name] = into.get(name, 0.0) + float(n)

    def next_step(self) -> None:
        """Start the next step's group (for :meth:`steady`; an empty group counts for nothing)."""
        self._group_seconds.append({})
        self._group_counts.append({})
        self._group_aggregate.append(False)

    def _resolve(self, n: Optional[int] = None) -> None:
        n = len(self._pending) if n is None else n
        for name, start, end, group in self._pending[:n]:
            end.synchronize()
            self.record(name, start.elapsed_time(end) / 1000.0, group)
        del self._pending[:n]

    def steady(self) -> dict[str, Any]:
        """Seconds and counts since the last reset over the steady steps only (synchronises with CUDA).

        A step (a group between :meth:`next_step` calls) is left out when its total seconds exceed
        ``OUTLIER_FACTOR`` × the median step's and there are at least ``MIN_STEPS_FOR_OUTLIERS`` steps.
        Returns ``{"seconds": {...}, "counts": {...}, "steps": kept, "left_out": n, "left_out_seconds": s}``.
        """
        self._resolve()
        totals = [sum(g.values()) for g in self._group_seconds]
        measured = [t for t, agg, g, c in zip(totals, self._group_aggregate, self._group_seconds,
                                              self._group_counts) if not agg and (g or c)]
        limit = float("inf")
        if len(measured) >= MIN_STEPS_FOR_OUTLIERS:
            median = statistics.median(measured)
            if median > 0:
                limit = OUTLIER_FACTOR * median
        keep = [aggregate or total <= limit for total, aggregate in zip(totals, self._group_aggregate)]
        return {
            "seconds": _summed([g for g, k in zip(self._group_seconds, keep) if k]),
            "counts": _summed([c for c, k in zip(self._group_counts, keep) if k]),
            "steps": sum(k and not agg and bool(g or c) for k, agg, g, c in
                         zip(keep, self._group_aggregate, self._group_seconds, self._group_counts)),
            "left_out": keep.count(False),
            "left_out_seconds": sum(t for t, k in zip(totals, keep) if not k),
        }

    def seconds(self, name: str) -> float:
        """Total seconds of section ``name`` since the last reset (synchronises with CUDA)."""
        return self.totals().get(name, 0.0)

    def count(self, name: str) -> float:
        return sum(group.get(name, 0.0) for group in self._group_counts)

    def totals(self) -> dict[str, float]:
        """All section totals in seconds (synchronises with CUDA)."""
        self._resolve()
        return _summed(self._group_seconds)

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Totals and counts since the last reset (resolves CUDA events: one sync; call between steps).

        Sections still open are not included. Restored seconds are the ones measured before the save:
        wall-clock measurements, so a resumed window's α is never bit-identical to an uninterrupted
        run's (neither are two uninterrupted runs'); restoring them keeps seconds and counts of
        the window consistent, which α = (upstream s/render)/(teacher s/draw) needs. The window's
        steady part (:meth:`steady`) is what is saved: a restored window is one aggregate step, so a
        cold step before the save stays left out after it.
        """
        steady = self.steady()
        return {"seconds": steady["seconds"], "counts": steady["counts"]}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.reset()
        self._group_seconds = [{k: float(v) for k, v in state.get("seconds", {}).items()}]
        self._group_counts = [{k: float(v) for k, v in state.get("counts", {}).items()}]
        self._group_aggregate = [True]
        self.next_step()

    def reset(self) -> None:
        """Forget totals and counts (open sections keep running)."""
        self._pending.clear()
        self._group_seconds, self._group_counts, self._group_aggregate = [{}], [{}], [False]


def _summed(groups: list[dict[str, float]]) -> dict[str, float]:
    """Per-name sums over step groups."""
    out: dict[str, float] = {}
    for group in groups:
        for name, value in group.items():
            out[name] = out.get(name, 0.0) + value
    return out
