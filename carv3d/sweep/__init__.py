"""Sweeps: many runs from one file — prompts × seeds × estimator settings — locally or on Ray.

::

    spec.py          the sweep file → validated runs (each with a stable name and a resolved config)
    yaml_lines.py    the sweep file's YAML with the line of every key, for FILE:LINE errors
    checks.py        whole-sweep checks: the number of runs (--max-runs), prompts vs a closed vocabulary
    errors.py        SweepError
    state.py         the sweep directory: what each run needs (train/resume/skip), sweep_state.json, lock
    jobs.py          one run as plain data, executed the same way by every backend
    local.py         in-process one after another, or one worker process per GPU (worker.py)
    ray_backend.py   one Ray task per run (optional extra: pip install 'carv3d[ray]')
    summary.py       summary.csv, summary.md, a plot per numeric axis
    runner.py        run_sweep(): validate → plan → run → record → summarise

Usage::

    from carv3d.sweep import run_sweep
    outcome = run_sweep("configs/sweeps/presets_seeds.yaml", backend="local")
    print(outcome.files["md"])
"""

from carv3d.sweep.runner import SweepOutcome, run_sweep
from carv3d.sweep.spec import RunSpec, SweepError, SweepSpec, load_sweep, run_name

__all__ = ["RunSpec", "SweepError", "SweepOutcome", "SweepSpec", "load_sweep", "run_name", "run_sweep"]
