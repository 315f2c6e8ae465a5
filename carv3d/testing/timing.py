"""Timing one operation for benchmarks: what a call costs on the device it runs on.

On CUDA a call is timed with CUDA events recorded around it, so the figure is the time of the
kernels it queued (host launch overhead overlaps them); on a CPU it is the wall clock of the call.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import torch


def call_times_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1,
                  max_seconds: float = math.inf) -> list[float]:
    """Milliseconds of each timed call of ``fn``: ``warmup`` untimed calls, then up to ``repeats``
    timed ones, stopping early once ``max_seconds`` of timing have passed (at least one is timed)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000.0 * (time.perf_counter() - t0))
        if time.perf_counter() - started > max_seconds:
            break
    return times


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median of :func:`call_times_ms`."""
    return statistics.median(call_times_ms(fn, device, repeats, warmup))
