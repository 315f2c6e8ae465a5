"""Worker process of the local backend: ``python -m carv3d.sweep.worker --serve``.

It trains run after run on the devices its environment shows it (``CUDA_VISIBLE_DEVICES`` is set by
the parent). Each line on stdin is one run, as JSON: ``{"job": JOB.json, "result": RESULT.json,
"log": LOG}``. The worker first creates ``RESULT.json.started`` (the parent then knows the run
began), runs the :class:`~carv3d.sweep.jobs.RunJob`, and writes the
:class:`~carv3d.sweep.state.RunResult` as JSON, atomically; a result file that is missing means the
process died. While a run trains, the process's stdout and stderr (its log lines, warnings,
progress, a crash's traceback, faulthandler's dump on a segfault) go to that run's log file, as
they would for a process of its own.

One process for many runs saves each run the interpreter's start, torch's import, CUDA's context
and the kernels' loading: at the default config's size on a GPU that is most of a run.
:func:`~carv3d.sweep.jobs.execute_job` leaves the process as a fresh one would be for the next run.
A run that fails or is interrupted ends the process (a failed run can leave CUDA unusable; Ctrl-C
stops the sweep); the parent starts a fresh one for the next run.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

USAGE = 'usage: python -m carv3d.sweep.worker --serve   (then {"job": ..., "result": ..., "log": ...} lines on stdin)'
# Outcomes after which the process takes the next run; any other ends it.
REUSABLE_AFTER = ("finished", "diverged", "skipped")
STARTED_SUFFIX = ".started"


def _flush_everything() -> None:
    """Python's buffers and the C library's (output that extensions buffer themselves)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a full disk or a closed stream must not keep the descriptors switched
            pass
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not Linux/macOS)
        pass


@contextmanager
def output_to(log_path: Optional[str]) -> Iterator[None]:
    """File descriptors 1 and 2 (and so ``print``, logging, warnings, tqdm, C extensions) appended
    to ``log_path`` for the block, then restored; no change when ``log_path`` is empty."""
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    _flush_everything()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                _flush_everything()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def run_job_file(job_path: str, result_path: str) -> str:
    """Run the job in ``job_path``, write its result to ``result_path``; return its status."""
    from carv3d.io import atomic_write_text
    from carv3d.log import logger, setup_logging
    from carv3d.sweep.jobs import RunJob, execute_job
    from carv3d.sweep.state import RunResult

    setup_logging()
    job = RunJob.from_dict(json.loads(Path(job_path).read_text()))
    logger.info("sweep worker pid %d for %s: CUDA_VISIBLE_DEVICES=%s", os.getpid(), job.name,
                os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
    try:
        result = execute_job(job)
    except KeyboardInterrupt:
        result = RunResult(job.name, "interrupted", "interrupted by Ctrl-C; re-run the sweep to resume")
    atomic_write_text(result_path, json.dumps(result.to_dict()))
    return result.status


def serve(lines: IO[str]) -> int:
    """Run the jobs named on ``lines`` until end of input, or until one does not finish."""
    faulthandler.enable()  # a segfault's stack goes to fd 2: the running run's log
    try:
        for line in lines:
            try:
                request = json.loads(line)
                job, result, log = request["job"], request["result"], request["log"]
            except (ValueError, KeyError, TypeError):
                print(f"carv3d sweep worker: expected a JSON line with job, result and log, got {line!r}",
                      file=sys.stderr)
                return 2
            Path(result + STARTED_SUFFIX).touch()
            with output_to(log):
                try:
                    status = run_job_file(job, result)
                except Exception:  # noqa: BLE001 — into the run's log, where its output went; no result
                    traceback.print_exc()
                    return 1
            if status not in REUSABLE_AFTER:
                return 130 if status == "interrupted" else 0
    except KeyboardInterrupt:  # Ctrl-C while waiting for the next run: nothing to save
        return 130
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the CLI: never download weights at run time
    if args != ["--serve"]:
        print(USAGE, file=sys.stderr)
        return 2
    return serve(sys.stdin)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
