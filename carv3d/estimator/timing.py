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
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

MAX_PENDING = 4096  # resolve old CUDA events beyond this many, so an unread timer stays small


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
        self._pending: list[tuple[str, Any, Any]] = []
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, float] = {}

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
            self._pending.append((name, started, event))
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

    def record(self, name: str, seconds: float) -> None:
        """Add a duration measured elsewhere."""
        self._seconds[name] = self._seconds.get(name, 0.0) + float(seconds)

    def add_count(self, name: str, n: float = 1.0) -> None:
        """Count things (renders, teacher draws) alongside the times."""
        self._counts[name] = self._counts.get(name, 0.0) + float(n)

    def _resolve(self, n: Optional[int] = None) -> None:
        n = len(self._pending) if n is None else n
        for name, start, end in self._pending[:n]:
            end.synchronize()
            self.record(name, start.elapsed_time(end) / 1000.0)
        del self._pending[:n]

    def seconds(self, name: str) -> float:
        """Total seconds of section ``name`` since the last reset (synchronises with CUDA)."""
        self._resolve()
        return self._seconds.get(name, 0.0)

    def count(self, name: str) -> float:
        return self._counts.get(name, 0.0)

    def totals(self) -> dict[str, float]:
        """All section totals in seconds (synchronises with CUDA)."""
        self._resolve()
        return dict(self._seconds)

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Totals and counts since the last reset (resolves CUDA events: one sync; call between steps).

        Sections still open are not included. Restored seconds are the ones measured before the save:
        wall-clock measurements, so a resumed window's α is never bit-identical to an uninterrupted
        run's (neither are two uninterrupted runs'); restoring them keeps seconds and counts of
        the window consistent, which α = (upstream s/render)/(teacher s/draw) needs.
        """
        self._resolve()
        return {"seconds": dict(self._seconds), "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.reset()
        self._seconds = {k: float(v) for k, v in state.get("seconds", {}).items()}
        self._counts = {k: float(v) for k, v in state.get("counts", {}).items()}

    def reset(self) -> None:
        """Forget totals and counts (open sections keep running)."""
        self._pending.clear()
        self._seconds.clear()
        self._counts.clear()
