"""Per-run progress for a sweep's bar: which runs are training and how far each has come.

The runs of a sweep train in worker processes or Ray tasks with their own progress bars off, so
the sweep's one bar would only move when a run ends. :class:`RunProgress` reads, every few
seconds, the last line of each unfinished run's ``metrics.jsonl`` (written every
``train.log_every`` steps) and shows ``name step/steps`` for the runs that are training in the
bar's postfix. It reads only files: it works for every backend whose runs write into the sweep's
folder (local, and Ray with a shared disk); a run on a disk the sweep cannot see shows nothing
until it ends.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Optional

from carv3d.run_dir import METRICS_FILE, read_status

SHOWN = 3  # runs named in the postfix; the rest are counted


def last_logged_step(run_dir: Path) -> Optional[int]:
    """The ``step`` of the last complete line of ``run_dir/metrics.jsonl`` (reads only its tail)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        with path.open("rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 8192))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line being written, or the cut first line of the tail
    return None


class RunProgress:
    """A thread that writes ``name step/steps`` of the training runs into ``bar``'s postfix.

    Args:
        bar: a tqdm bar (``set_postfix_str`` is called from the thread).
        runs: run name → (run directory, its ``train.steps``), the runs still to do.
        interval: seconds between two reads.
        failed: failed runs counted already (shown after the training runs).
    """

    def __init__(self, bar: Any, runs: dict[str, tuple[Path, int]], interval: float = 2.0, failed: int = 0):
        self.bar = bar
        self.pending = dict(runs)
        self.interval = interval
        self.failed = failed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="carv3d-sweep-progress", daemon=True)

    def done(self, name: str, failed: bool = False) -> None:
        """A run reported its result: no longer shown."""
        with self._lock:
            self.pending.pop(name, None)
            self.failed += int(failed)
        self.refresh()

    def describe(self) -> str:
        """``"a_red_cube-sds 120/300, ... (+2 training)"`` for the runs training now."""
        with self._lock:
            pending = list(self.pending.items())
            failed = self.failed
        training = []
        for name, (run_dir, steps) in pending:
            if read_status(run_dir).get("status") != "running":
                continue  # not started yet (or on a disk this process cannot see)
            step = last_logged_step(run_dir)
            training.append(f"{name} {step if step is not None else 0}/{steps}")
        text = ", ".join(training[:SHOWN])
        if len(training) > SHOWN:
            text += f" (+{len(training) - SHOWN} training)"
        if failed:
            text += ("; " if text else "") + f"{failed} failed"
        return text

    def refresh(self) -> None:
        self.bar.set_postfix_str(self.describe(), refresh=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # a progress display must never stop a sweep
                pass

    def __enter__(self) -> "RunProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
