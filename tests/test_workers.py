"""carv3d.workers (jobs side by side in worker processes) and carv3d.devices' CUDA warm-up."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from carv3d.devices import warm_up_cuda_extensions
from carv3d.workers import run_in_workers


def job_and_threads(job: int) -> tuple[int, int, int]:
    """A worker: its job, its torch thread count and the carv3d log level (module level: picklable)."""
    return job, torch.get_num_threads(), logging.getLogger("carv3d").level


@pytest.fixture
def restore_threads_and_log_level():
    threads, level = torch.get_num_threads(), logging.getLogger("carv3d").level
    yield
    torch.set_num_threads(threads)
    logging.getLogger("carv3d").setLevel(level)


def test_in_process_runs_jobs_in_order_with_the_worker_settings(restore_threads_and_log_level):
    results = []
    run_in_workers([9, 1, 4], 1, 1, results.append, worker=job_and_threads)
    assert results == [(9, 1, logging.WARNING), (1, 1, logging.WARNING), (4, 1, logging.WARNING)]


@pytest.mark.slow  # ~8 s: two spawned interpreters import torch
def test_spawned_workers_return_every_result_with_the_worker_settings():
    results = []
    run_in_workers([0, 1, 2], 2, 1, results.append, worker=job_and_threads)
    # imap_unordered: in order of finishing; the parent's own settings do not matter in a spawned worker
    assert sorted(results) == [(0, 1, logging.WARNING), (1, 1, logging.WARNING), (2, 1, logging.WARNING)]


def test_cuda_warm_up_is_none_without_cuda_and_logs_a_failure(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert warm_up_cuda_extensions() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", None)  # importing it raises ImportError
    logger = logging.getLogger("carv3d")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="carv3d"):
        seconds = warm_up_cuda_extensions()
    assert seconds is not None and seconds >= 0.0
    assert "nerfacc CUDA warm-up failed" in caplog.text


def test_cuda_warm_up_loads_gsplat_too_when_it_is_installed(monkeypatch, caplog):
    """Workers training Gaussians must not each start gsplat's JIT build: the parent loads it first."""
    import carv3d.devices as devices_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", None)
    monkeypatch.setitem(sys.modules, "gsplat.cuda._backend", None)
    logger = logging.getLogger("carv3d")
    monkeypatch.setattr(logger, "propagate", True)
    for installed in (True, False):
        monkeypatch.setattr(devices_module, "package_installed", lambda name: installed)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="carv3d"):
            assert warm_up_cuda_extensions() >= 0.0
        assert "nerfacc CUDA warm-up failed" in caplog.text
        assert ("gsplat CUDA warm-up failed" in caplog.text) == installed
