"""``run_sweep``: validate, plan, run on a backend, record, summarise.

::

    load_sweep(file)        every run's config resolved; bad input stops here (file:line)
    plan_runs(spec)         train | resume | restart | skip, from the run directories
    [ray: the address answers]                              ── nothing has run before this line
    for each finished run:  sweep_state.json rewritten, progress bar advanced
    while runs train:       the bar names them with their steps (carv3d.sweep.progress)
    summary.csv / summary.md / summary_<axis>.png          (also after Ctrl-C)
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from carv3d.config import to_yaml
from carv3d.log import logger
from carv3d.run_dir import read_status
from carv3d.sizing import explicit_keys
from carv3d.sweep.checks import MAX_RUNS
from carv3d.sweep.jobs import RunJob
from carv3d.sweep.progress import RunProgress
from carv3d.sweep.spec import SweepError, SweepSpec, load_sweep
from carv3d.sweep.state import PlannedRun, RunResult, abandon, plan_runs, read_state, sweep_lock, write_state

BACKENDS = ("local", "ray")


@dataclass
class SweepOutcome:
    """What a sweep did. ``results`` holds every run that has a result (this time or before)."""

    spec: SweepSpec
    planned: list[PlannedRun]
    results: dict[str, RunResult] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results.values() if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when no run failed; 1 when some did (they are recorded, the sweep went on)."""
        return 1 if self.failed and not self.dry_run else 0

    def report(self) -> str:
        """A few lines for the terminal: the plan (dry run) or the counts and where the table is."""
        if self.dry_run:
            width = max([len(p.run.name) for p in self.planned] + [3])
            lines = [f"sweep {self.spec.name}: {len(self.planned)} runs in {self.spec.directory} (dry run, nothing ran)"]
            lines += [f"  {p.run.name:<{width}}  {p.action:<7}  {p.reason}" for p in self.planned]
            return "\n".join(lines)
        counts: dict[str, int] = {}
        for run in self.spec.runs:
            status = self.results[run.name].status if run.name in self.results else "pending"
            counts[status] = counts.get(status, 0) + 1
        skipped = sum(p.action == "skip" for p in self.planned)
        lines = [f"sweep {self.spec.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                 + f" ({skipped} skipped as already done)"]
        lines += [f"  failed: {r.name}: {r.error.splitlines()[0] if r.error else ''}" for r in self.failed]
        if "md" in self.files:
            lines.append(f"summary: {self.files['md']}")
        return "\n".join(lines)


def _job(spec: SweepSpec, planned: PlannedRun) -> RunJob:
    run = planned.run
    cfg = spec.configs[run.name]
    explicit = explicit_keys(cfg)
    return RunJob(name=run.name, action="resume" if planned.action == "resume" else "train",
                  config_yaml=to_yaml(cfg), run_dir=str(spec.run_dir(run)),
                  resume_overrides=list(planned.resume_overrides),
                  log_path=str(spec.directory / "logs" / f"{run.name}.log"),
                  explicit_keys=sorted(explicit) if explicit is not None else None)


def run_sweep(path: str | Path, backend: str = "local", max_parallel: Optional[int] = None,
              address: Optional[str] = None, dry_run: bool = False,
              gpus: Optional[Sequence[str]] = None, max_runs: Optional[int] = MAX_RUNS) -> SweepOutcome:
    """Run (or continue) the sweep in ``path``; see :mod:`carv3d.sweep` for the file format.

    Args:
        path: the sweep file.
        backend: ``local`` (in this process, or one worker per GPU) or ``ray``.
        max_parallel: most runs at once (local: default one per GPU; ray: default as Ray schedules).
        address: Ray cluster address (ray backend only); None starts or finds a local instance.
        dry_run: validate and plan only; nothing is written.
        gpus: local backend only, the ``CUDA_VISIBLE_DEVICES`` entries to spread runs over
            (default: the visible GPUs).
        max_runs: refuse a sweep with more runs than this, at once (None: no limit); the CLI's
            ``--max-runs``. See :mod:`carv3d.sweep.checks`.

    Raises:
        SweepError / ConfigError: bad input, before any run starts. A failing *run* does not raise:
        it is recorded (``outcome.failed``) and the sweep goes on. Ctrl-C stops the sweep after
        the running runs saved a checkpoint, and the summary is still written.
    """
    if backend not in BACKENDS:
        raise SweepError(f"unknown sweep backend '{backend}'; choose one of: {', '.join(BACKENDS)}.")
    if address and backend != "ray":
        raise SweepError("--address names a Ray cluster; use it with --backend ray.")
    if max_parallel is not None and max_parallel < 1:
        raise SweepError(f"--max-parallel must be at least 1, not {max_parallel}.")
    if max_runs is not None and max_runs < 1:
        raise SweepError(f"--max-runs must be at least 1, not {max_runs}.")
    spec = load_sweep(path, max_runs=max_runs)
    planned = plan_runs(spec)
    if backend == "ray":
        from carv3d.sweep.ray_backend import check_address, import_ray, ray_connection

        import_ray()
        check_address(address)
    outcome = SweepOutcome(spec, planned, dry_run=dry_run)
    if dry_run:
        return outcome
    # Connect before anything is written: a cluster that does not answer leaves no sweep directory.
    with ray_connection(address) if backend == "ray" else contextlib.nullcontext() as ray:
        _run(spec, planned, outcome, backend, ray, max_parallel, gpus)
    return outcome


def _run(spec: SweepSpec, planned: list[PlannedRun], outcome: SweepOutcome, backend: str, ray: Any,
         max_parallel: Optional[int], gpus: Optional[Sequence[str]]) -> None:
    directory = spec.directory
    with sweep_lock(directory):
        shutil.copyfile(spec.file, directory / "sweep.yaml")
        names = {run.name for run in spec.runs}
        results = outcome.results
        results.update({n: r for n, r in read_state(directory).items() if n in names})
        jobs: list[RunJob] = []
        for item in planned:
            if item.action == "skip":
                status = read_status(spec.run_dir(item.run)).get("status", "finished")
                previous = results.get(item.run.name)
                results[item.run.name] = RunResult(item.run.name, status, previous.error if previous else "",
                                                   previous.seconds if previous else 0.0)
                continue
            results.pop(item.run.name, None)  # its last result is stale now; run.json tells until the new one
            if item.action == "restart":
                moved = abandon(spec.run_dir(item.run), directory)
                logger.warning("sweep: %s had no checkpoint (%s); moved to %s and starting it anew",
                               item.run.name, item.reason, moved)
            jobs.append(_job(spec, item))
        write_state(spec, results)
        logger.info("sweep %s: %d runs, %d to run (%s backend), results in %s",
                    spec.name, len(spec.runs), len(jobs), backend, directory)

        bar = tqdm(total=len(spec.runs), initial=len(spec.runs) - len(jobs), desc=f"sweep {spec.name}",
                   unit="run", dynamic_ncols=True)
        # The runs' own bars are off (train.progress=false): the sweep's bar names the training runs
        # and their steps, read from their metrics.jsonl.
        watcher = RunProgress(bar, {job.name: (Path(job.run_dir), int(spec.configs[job.name].train.steps))
                                    for job in jobs},
                              failed=sum(r.status == "failed" for r in results.values()))

        def on_result(result: RunResult) -> None:
            results[result.name] = result
            write_state(spec, results)
            bar.update(1)
            watcher.done(result.name, failed=result.status == "failed")
            if result.status != "finished":
                bar.write(f"[carv3d] sweep run {result.name}: {result.status}"
                          + (f": {result.error.splitlines()[0]}" if result.error else ""))

        try:
            with watcher:
                if backend == "ray":
                    from carv3d.sweep.ray_backend import run_ray

                    run_ray(ray, jobs, on_result, directory, max_parallel=max_parallel)
                else:
                    from carv3d.sweep.local import run_local

                    run_local(jobs, on_result, max_parallel=max_parallel, gpus=gpus)
        finally:
            bar.close()
            write_state(spec, results)
            from carv3d.sweep.summary import write_summary

            outcome.files = write_summary(spec, results)
