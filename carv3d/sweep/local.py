"""The local backend: runs one after another in this process, or one worker process per GPU.

With zero or one visible GPU (and ``--max-parallel`` unset or 1) each run is :func:`execute_job` in
this process, in order. With several GPUs, each run is a worker process
(``python -m carv3d.sweep.worker``) that sees one GPU through ``CUDA_VISIBLE_DEVICES``; a pool of
*slots* (one per GPU by default, ``--max-parallel N`` slots dealt round-robin over the GPUs
otherwise) hands each run the next free GPU. Worker output goes to ``logs/<run>.log``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from carv3d.sweep.jobs import RunJob, execute_job
from carv3d.sweep.spec import SweepError
from carv3d.sweep.state import RunResult

OnResult = Callable[[RunResult], None]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (``["0", "1"]``)."""
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install behaves as no GPU here; training reports it properly
        count = 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()][:count]
    return [str(i) for i in range(count)]


def worker_slots(gpus: Sequence[str], max_parallel: Optional[int] = None) -> list[Optional[str]]:
    """The concurrent slots of a local sweep: each the ``CUDA_VISIBLE_DEVICES`` of one worker.

    ``None`` means "this process's devices, unchanged". One slot runs in-process.

    >>> worker_slots(["0", "1", "2"])
    ['0', '1', '2']
    >>> worker_slots(["0", "1"], max_parallel=3)   # two runs share GPU 0
    ['0', '1', '0']
    >>> worker_slots([])
    [None]
    """
    if max_parallel is not None and max_parallel < 1:
        raise SweepError(f"--max-parallel must be at least 1, not {max_parallel}.")
    if len(gpus) >= 2:
        count = max_parallel or len(gpus)
        return [gpus[i % len(gpus)] for i in range(count)]
    return [None] * (max_parallel or 1)


def run_in_slots(jobs: Sequence[RunJob], slots: Sequence[Optional[str]],
                 run_one: Callable[[RunJob, Optional[str]], RunResult], on_result: OnResult) -> None:
    """Run ``jobs`` with at most one job per slot at a time; report each result as it arrives.

    A thread per slot takes the next free slot from a queue, so a slot (a GPU) is never given two
    jobs at once and a GPU that finishes early takes the next job. ``on_result`` runs in the
    calling thread. On Ctrl-C the jobs not yet started are cancelled and the running ones are
    awaited (worker processes got the same Ctrl-C and save a checkpoint).
    """
    free: "queue.Queue[Optional[str]]" = queue.Queue()
    for slot in slots:
        free.put(slot)

    def task(job: RunJob) -> RunResult:
        slot = free.get()
        try:
            return run_one(job, slot)
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="carv3d-sweep")
    futures: list[Future] = [pool.submit(task, job) for job in jobs]
    reported: set[int] = set()
    try:
        for future in as_completed(futures):
            reported.add(id(future))
            on_result(future.result())
    except KeyboardInterrupt:
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:
            if id(future) not in reported and future.done() and not future.cancelled() and future.exception() is None:
                on_result(future.result())
        raise
    pool.shutdown(wait=True)


def run_in_worker_process(job: RunJob, slot: Optional[str]) -> RunResult:
    """Run one job in ``python -m carv3d.sweep.worker`` with ``CUDA_VISIBLE_DEVICES=slot``."""
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    env.setdefault("HF_HUB_OFFLINE", "1")
    log_path = Path(job.log_path) if job.log_path else Path(os.devnull)
    if job.log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="carv3d-sweep-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        # The worker's stdout/stderr already go to the log file: it must not open it a second time.
        job_file.write_text(json.dumps(replace(job, log_path=None).to_dict()))
        with open(log_path, "a") as log:
            code = subprocess.call([sys.executable, "-m", "carv3d.sweep.worker", str(job_file), str(result_file)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        if result_file.is_file():
            return RunResult.from_dict(json.loads(result_file.read_text()))
    return RunResult(job.name, "failed", f"worker process exited with code {code} before reporting a result; "
                     f"see {log_path}")


def run_local(jobs: Sequence[RunJob], on_result: OnResult, max_parallel: Optional[int] = None,
              gpus: Optional[Sequence[str]] = None) -> None:
    """Run ``jobs`` locally: in-process one after another, or in worker processes over the slots."""
    slots = worker_slots(visible_gpus() if gpus is None else gpus, max_parallel)
    if len(slots) == 1:
        for job in jobs:
            on_result(execute_job(job))
        return
    run_in_slots(jobs, slots, run_in_worker_process, on_result)
