"""Worker process of the local backend.

``python -m carv3d.sweep.worker --serve`` trains run after run on the devices its environment shows
it (``CUDA_VISIBLE_DEVICES`` is set by the parent). It reads one line per run from stdin,
``JOB.json<TAB>RESULT.json<TAB>LOG``, runs the :class:`~carv3d.sweep.jobs.RunJob`, and writes the
:class:`~carv3d.sweep.state.RunResult` as JSON, atomically; a result file that is missing means the
process died. While a run trains, the process's stdout and stderr (its log lines, warnings,
progress, a crash's traceback) go to that run's log file, as they would for a process of its own.

One process for many runs saves each run the interpreter's start, torch's import, CUDA's context
and the kernels' loading: at the default config's size on a GPU that is most of a run. A run that
fails or is interrupted ends the process (a failed run can leave CUDA unusable; Ctrl-C stops the
sweep); the parent starts a fresh one for the next run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

USAGE = "usage: python -m carv3d.sweep.worker --serve   (then JOB.json<TAB>RESULT.json<TAB>LOG lines on stdin)"
# Outcomes after which the process takes the next run; any other ends it.
REUSABLE_AFTER = ("finished", "diverged", "skipped")


@contextmanager
def output_to(log_path: Optional[str]) -> Iterator[None]:
    """File descriptors 1 and 2 (and so ``print``, logging, warnings, tqdm, C extensions) appended
    to ``log_path`` for the block, then restored; no change when ``log_path`` is empty."""
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
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
    try:
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                print(f"carv3d sweep worker: expected JOB<TAB>RESULT<TAB>LOG, got {line!r}", file=sys.stderr)
                return 2
            with output_to(fields[2]):
                try:
                    status = run_job_file(fields[0], fields[1])
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
