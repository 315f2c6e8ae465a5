"""carv3d.testing.timing against calls of known duration and a call counter.

The durations come from a fake clock that each call advances, so the figures are exact whatever the
machine's load: with the real clock, stalls of 100 ms (a CPU quota's throttling, a busy host) made a
20 ms sleep read 40.2 ms and failed a bound of 40 ms. One test keeps the real clock, with the bound
that holds under any scheduling (a sleep never returns early).
"""

from __future__ import annotations

import time

import pytest
import torch

from carv3d.testing import timing
from carv3d.testing.timing import call_times_ms, median_ms

CPU = torch.device("cpu")


class FakeClock:
    """Stands in for the ``time`` module in carv3d.testing.timing: ``perf_counter`` reads ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", fake)
    return fake


def test_warmup_calls_are_untimed_and_each_timed_call_measures_the_call(clock):
    durations = iter([5.0, 7.0, 0.020, 0.030, 0.040])  # two long warm-up calls, then 20, 30 and 40 ms
    calls = []

    def call():
        calls.append(1)
        clock.now += next(durations)

    times = call_times_ms(call, CPU, repeats=3, warmup=2)
    assert len(calls) == 5
    assert times == pytest.approx([20.0, 30.0, 40.0], abs=1e-6)  # each call alone, no warm-up in them


def test_timing_stops_after_max_seconds_but_times_at_least_one_call(clock):
    def call_30ms():
        clock.now += 0.03

    # 30 ms after the first call (under 50), 60 ms after the second: it stops there
    assert call_times_ms(call_30ms, CPU, repeats=100, warmup=0, max_seconds=0.05) == pytest.approx([30.0, 30.0])
    # a first call longer than max_seconds is still timed
    assert call_times_ms(call_30ms, CPU, repeats=100, warmup=0, max_seconds=0.01) == pytest.approx([30.0])


def test_median_is_the_middle_call(clock):
    durations = iter([0.0, 0.001, 0.04, 0.02])  # warmup, then 1, 40, 20 ms: the median is 20 ms

    def call():
        clock.now += next(durations)

    assert median_ms(call, CPU, repeats=3, warmup=1) == pytest.approx(20.0, abs=1e-6)


def test_on_the_cpu_a_timed_call_is_its_wall_clock():
    times = call_times_ms(lambda: time.sleep(0.02), CPU, repeats=2, warmup=1)
    # sleep never returns early; no upper bound, since a loaded machine may stall any call for long
    assert len(times) == 2 and all(t >= 20.0 for t in times)
