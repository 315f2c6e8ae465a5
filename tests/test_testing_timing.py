"""carv3d.testing.timing against calls of known duration and a call counter."""

from __future__ import annotations

import time

import torch

from carv3d.testing.timing import call_times_ms, median_ms

CPU = torch.device("cpu")


def test_warmup_calls_are_untimed_and_each_timed_call_measures_the_call():
    calls = []

    def sleep_20ms():
        calls.append(1)
        time.sleep(0.02)

    times = call_times_ms(sleep_20ms, CPU, repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3
    # sleep never returns early; 150 ms of slack for a busy machine
    assert all(20.0 <= t < 170.0 for t in times)


def test_timing_stops_after_max_seconds_but_times_at_least_one_call():
    times = call_times_ms(lambda: time.sleep(0.03), CPU, repeats=100, warmup=0, max_seconds=0.05)
    assert 1 <= len(times) <= 3


def test_median_is_the_middle_call():
    durations = iter([0.0, 0.001, 0.04, 0.02])  # warmup, then 1, 40, 20 ms: the median is 20 ms
    assert 20.0 <= median_ms(lambda: time.sleep(next(durations)), CPU, repeats=3, warmup=1) < 40.0
