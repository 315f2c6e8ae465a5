"""The local backend: runs one after another in this process, or worker processes over GPU slots.

With zero or one visible GPU (and ``--max-parallel`` unset or 1) each run is :func:`execute_job` in
this process, in order. With several GPUs, each *slot* (one per GPU by default, ``--max-parallel N``
slots dealt round-robin over the GPUs otherwise) has a worker process
(``python -m carv3d.sweep.worker --serve``) that sees its GPU through ``CUDA_VISIBLE_DEVICES`` and
trains the runs it is handed one after another, as the one-GPU sweep does in-process: a run does not
pay for a new interpreter, torch's import and CUDA's start. A free slot takes the next run. A run
that fails or is interrupted ends its worker and the slot starts a fresh one. Each run's output
goes to ``logs/<run>.log``.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from carv3d.sweep.jobs import RunJob, execute_job
from carv3d.sweep.spec import SweepError
from carv3d.sweep.state import RunResult
from carv3d.sweep.worker import REUSABLE_AFTER, STARTED_SUFFIX

OnResult = Callable[[RunResult], None]
Slot = TypeVar("Slot")


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


def run_in_slots(jobs: Sequence[RunJob], slots: Sequence[Slot], run_one: Callable[[RunJob, Slot], RunResult],
                 on_result: OnResult, on_abort: Optional[Callable[[], None]] = None) -> None:
    """Run ``jobs`` with at most one job per slot at a time; report each result as it arrives.

    A slot is whatever ``run_one`` runs a job with: a GPU's name, or the worker process serving it.
    A thread per slot takes the next free slot from a queue, so a slot (a GPU) is never given two
    jobs at once and a GPU that finishes early takes the next job. ``on_result`` runs in the
    calling thread. On Ctrl-C the jobs not yet started are cancelled and the running ones are
    awaited (worker processes got the same Ctrl-C and save a checkpoint). On any other error here
    (``on_result`` failing, say) the same, after ``on_abort`` (which asks the running jobs to stop).
    """
    free: "queue.Queue[Slot]" = queue.Queue()
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
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # no job starts from here on
        if on_abort is not None:
            on_abort()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


class WorkerProcess:
    """One slot's long-lived worker process (``python -m carv3d.sweep.worker --serve``).

    :meth:`run` hands it a job (a JSON line on its stdin naming the job file, the result file and
    the run's log) and waits for the result file, starting the process first if there is none or
    the last one ended. A process that ends without a result is a failed run, or an interrupted one
    when Ctrl-C ended it. One that ends before it began the run (it died between runs) is replaced
    and given the run once more. Between runs the process's own output (a crash at start-up, say)
    goes to ``<logs>/<name>.log``.
    """

    COMMAND = (sys.executable, "-m", "carv3d.sweep.worker", "--serve")
    POLL_SECONDS = 0.1
    INTERRUPTED_CODES = (130, -signal.SIGINT)

    def __init__(self, slot: Optional[str], name: str = "worker", threads: Optional[int] = None,
                 command: Sequence[str] = COMMAND):
        self.slot = slot
        self.name = name
        self.threads = threads  # CPU threads per worker: the machine's cores shared between the slots
        self.command = list(command)
        self.process: Optional[subprocess.Popen] = None
        self.started = 0  # processes started so far (tests count them)

    def _start(self, log_folder: Optional[Path]) -> subprocess.Popen:
        env = dict(os.environ)
        if self.slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.slot
        if self.threads is not None and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(self.threads)
        env.setdefault("HF_HUB_OFFLINE", "1")
        self.started += 1
        if log_folder is not None:
            log_folder.mkdir(parents=True, exist_ok=True)
            with open(log_folder / f"{self.name}.log", "ab") as own_log:  # the child keeps its own copy
                return subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=own_log, stderr=own_log,
                                        env=env, text=True)
        return subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, text=True)

    def run(self, job: RunJob) -> RunResult:
        log_path = Path(job.log_path) if job.log_path else Path(os.devnull)
        log_folder = log_path.parent if job.log_path else None
        with tempfile.TemporaryDirectory(prefix="carv3d-sweep-job-") as tmp:
            job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
            began = Path(str(result_file) + STARTED_SUFFIX)
            # The worker points its stdout/stderr at the log file: the job must not open it a second time.
            job_file.write_text(json.dumps(replace(job, log_path=None).to_dict()))
            request = json.dumps({"job": str(job_file), "result": str(result_file), "log": str(log_path)})
            for attempt in range(2):
                if self.process is None or self.process.poll() is not None:
                    self.process = self._start(log_folder)
                code = self._hand_over(self.process, request, result_file)
                if result_file.is_file():
                    result = RunResult.from_dict(json.loads(result_file.read_text()))
                    break
                self.process = None
                if code in self.INTERRUPTED_CODES:
                    result = RunResult(job.name, "interrupted", "interrupted by Ctrl-C; re-run the sweep to resume")
                    break
                if began.exists() or attempt == 1:
                    where = log_path if began.exists() else (log_folder or Path(".")) / f"{self.name}.log"
                    result = RunResult(job.name, "failed", f"worker process exited with code {code} before "
                                       f"reporting a result; see {where}")
                    break
                # it died before taking the run (between runs): a fresh process gets it once more
        if result.status not in REUSABLE_AFTER:  # the worker ends itself after such a run
            self.close()
        return result

    def _hand_over(self, process: subprocess.Popen, request: str, result_file: Path) -> Optional[int]:
        """Send the request; wait for the result file or the process's end; return its exit code."""
        try:
            assert process.stdin is not None
            process.stdin.write(request + "\n")
            process.stdin.flush()
        except OSError:  # it ended before the line reached it
            pass
        while True:
            code = process.poll()
            if result_file.is_file() or code is not None:  # written atomically: complete once it exists
                return code
            time.sleep(self.POLL_SECONDS)

    def interrupt(self) -> None:
        """Ctrl-C for this worker alone: its run saves a checkpoint and stops."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def close(self, timeout: float = 30.0) -> None:
        """End the worker: close its stdin (it exits at the end of input), kill it if it does not."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()
        except OSError:
            pass
        try:
            process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_local(jobs: Sequence[RunJob], on_result: OnResult, max_parallel: Optional[int] = None,
              gpus: Optional[Sequence[str]] = None) -> None:
    """Run ``jobs`` locally: in-process one after another, or in worker processes over the slots."""
    slots = worker_slots(visible_gpus() if gpus is None else gpus, max_parallel)
    if len(slots) == 1:
        for job in jobs:
            on_result(execute_job(job))
        return
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    workers = [WorkerProcess(slot, name=f"worker-{i}", threads=threads) for i, slot in enumerate(slots)]

    def stop_workers() -> None:  # an error in the sweep itself (a full disk): the runs save and stop
        for worker in workers:
            worker.interrupt()

    try:
        run_in_slots(jobs, workers, lambda job, worker: worker.run(job), on_result, on_abort=stop_workers)
    finally:
        deadline = time.monotonic() + 30.0
        for worker in workers:
            worker.close(timeout=deadline - time.monotonic())
