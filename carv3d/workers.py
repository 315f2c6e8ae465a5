"""Jobs side by side in worker processes on one machine (benchmarks that share one device).

:func:`run_in_workers` runs ``worker(job)`` for every job, ``parallel`` at a time in *spawned*
processes (CUDA cannot be used in a forked child, and each worker gets a clean interpreter), or in
this process when ``parallel`` is 1. Each worker uses ``threads`` torch CPU threads, so P workers
share the cores, and logs warnings only. Results come back to ``on_result`` in the parent as they
finish (not in job order). ``worker`` must be picklable: a function defined at module level.
Spreading runs over several GPUs is :mod:`carv3d.sweep`'s job.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence


def init_worker(threads: int) -> None:
    """Worker start-up: ``threads`` torch CPU threads (0 keeps torch's default) and a quiet log."""
    import torch

    from carv3d.log import quiet_dependencies

    if threads > 0:
        torch.set_num_threads(threads)
    logging.getLogger("carv3d").setLevel(logging.WARNING)
    quiet_dependencies()


def run_in_workers(jobs: Sequence[Any], parallel: int, threads: int, on_result: Callable[[Any], None],
                   worker: Callable[[Any], Any]) -> None:
    """``on_result(worker(job))`` for each job, ``parallel`` workers at a time (see the module docstring).

    In process (``parallel`` ≤ 1) the jobs run in order, after :func:`init_worker` has set this
    process's threads and log level.
    """
    if parallel <= 1:
        init_worker(threads)
        for job in jobs:
            on_result(worker(job))
        return
    import torch.multiprocessing as mp

    with mp.get_context("spawn").Pool(parallel, initializer=init_worker, initargs=(threads,)) as pool:
        for result in pool.imap_unordered(worker, jobs, chunksize=1):
            on_result(result)
