"""The Ray backend: each run a Ray task with one GPU (one CPU on a cluster without GPUs).

Ray does the scheduling; carv3d only submits tasks and collects results::

    ray.init(address)  ──►  one task per run: execute_job(job) on a worker with 1 GPU (or 1 CPU)
                       ◄──  RunResult (+ the run directory as .tar.gz when the worker cannot see
                            the sweep directory) ──► written into <sweep dir>/runs/<run>

``address=None`` connects to a Ray instance already running on this machine or lets Ray start a
local one; ``HOST:PORT`` is a cluster's GCS (``ray start --head`` prints it) and ``ray://HOST:10001``
a Ray Client server. An address is first probed with a plain TCP connect (5 s) because
``ray.init`` waits for minutes on an address that does not answer.

Shared disk or not: the driver writes a random token into the sweep directory; a task that finds
the same token at the same path writes the run in place (one machine, NFS). Otherwise it trains in
a temporary folder and returns the run directory, which the driver unpacks into the sweep
directory; a run to resume travels to the task the same way. Workers need carv3d installed
(the same version) and the teacher weights at the path the config names.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from carv3d.io import atomic_write_text
from carv3d.log import logger
from carv3d.sweep.jobs import RunJob, execute_job, pack_dir, unpack_dir
from carv3d.sweep.local import OnResult
from carv3d.sweep.spec import SweepError
from carv3d.sweep.state import RunResult

TOKEN_FILE = ".carv3d-sweep-token"
CONNECT_TIMEOUT_S = 5.0


def import_ray():
    """``ray``, or a clear error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise SweepError("the Ray backend needs Ray: pip install 'carv3d[ray]' (or run with --backend local).") from None
    return ray


def check_address(address: Optional[str], timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast when a Ray address does not answer: a TCP connect to ``HOST:PORT`` within ``timeout``.

    ``None`` and ``"auto"`` are not probed (Ray finds or starts the local instance itself).
    """
    if address in (None, "", "auto"):
        return
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise SweepError(f"Ray address '{address}' is not HOST:PORT; use the address `ray start --head` prints "
                         "(e.g. 10.0.0.5:6379) or a Ray Client address (ray://10.0.0.5:10001).")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, socket.timeout) else (err.strerror or str(err))
        raise SweepError(f"Ray address '{address}' does not answer ({reason} within {timeout:g} s). Start the cluster "
                         "with `ray start --head` on that machine, check the host and port (GCS 6379, Ray Client "
                         "ray://HOST:10001), or omit --address to start a local Ray instance.") from None


@contextlib.contextmanager
def ray_connection(address: Optional[str]) -> Iterator[Any]:
    """Connect with ``ray.init`` (after :func:`check_address`), yield ``ray``, disconnect at the end.

    A local instance that Ray started for this sweep stops with the disconnect; a cluster stays up.
    When this process is connected already, that connection is used and left open.
    """
    ray = import_ray()
    if ray.is_initialized():  # the caller connected already (a notebook, a Ray job): use and keep it
        yield ray
        return
    check_address(address)
    try:
        ray.init(address=address or None, log_to_driver=False)
    except ConnectionError as err:
        raise SweepError(f"could not connect to Ray at '{address}': {str(err).splitlines()[0]} Start a cluster with "
                         "`ray start --head`, or omit --address to let Ray start a local instance.") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_task(job_data: dict[str, Any], token: str, archive_refs: list[Any]) -> dict[str, Any]:
    """Body of one Ray task: run the job in place (shared disk) or in a temporary folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from carv3d.log import setup_logging

    setup_logging()
    job = RunJob.from_dict(job_data)
    token_file = Path(job.run_dir).parent.parent / TOKEN_FILE
    try:
        shared = token_file.read_text().strip() == token
    except OSError:
        shared = False
    if shared:
        return {"result": execute_job(job).to_dict()}
    with tempfile.TemporaryDirectory(prefix="carv3d-sweep-") as tmp:
        runs = Path(tmp) / "runs"
        if archive_refs:  # a run to resume: its directory travels from the driver
            import ray

            unpack_dir(ray.get(archive_refs[0]), runs / job.name)
        job.log_path = str(Path(tmp) / "run.log")
        result = execute_job(job, output_dir=str(runs))
        payload: dict[str, Any] = {"result": result.to_dict(), "log": Path(job.log_path).read_text()
                                   if Path(job.log_path).is_file() else ""}
        if (runs / job.name).is_dir():
            payload["archive"] = pack_dir(runs / job.name)
        return payload


def collect(payload: dict[str, Any], job: RunJob) -> RunResult:
    """Write what a task returned into the sweep directory: the run directory and the log."""
    if "archive" in payload:
        unpack_dir(payload["archive"], Path(job.run_dir))
    if payload.get("log") and job.log_path:
        Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(job.log_path, "a") as log:
            log.write(payload["log"])
    return RunResult.from_dict(payload["result"])


def run_ray(ray: Any, jobs: Sequence[RunJob], on_result: OnResult, sweep_dir: Path,
            max_parallel: Optional[int] = None) -> None:
    """Run ``jobs`` as Ray tasks on the connected ``ray``, at most ``max_parallel`` in flight
    (default: all submitted, Ray queues them by resources)."""
    token = secrets.token_hex(16)
    atomic_write_text(sweep_dir / TOKEN_FILE, token + "\n")
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(num_gpus=1 if gpus > 0 else 0, num_cpus=1, max_retries=0)(_ray_task)
        logger.info("Ray: %d node(s), %g GPU(s): one %s per run", len(nodes), gpus, "GPU" if gpus else "CPU")
        pending = list(jobs)
        in_flight: dict[Any, RunJob] = {}
        limit = max_parallel or len(pending) or 1
        try:
            while pending or in_flight:
                while pending and len(in_flight) < limit:
                    job = pending.pop(0)
                    # A run to resume travels to the task in case it lands on a machine without the sweep's disk.
                    archive = [ray.put(pack_dir(Path(job.run_dir)))] if job.action == "resume" and len(nodes) > 1 else []
                    in_flight[task.remote(job.to_dict(), token, archive)] = job
                done, _ = ray.wait(list(in_flight), num_returns=1)
                job = in_flight.pop(done[0])
                try:
                    result = collect(ray.get(done[0]), job)
                except Exception as err:  # the task itself died: a worker crash, carv3d missing there
                    lines = str(err).strip().splitlines()
                    result = RunResult(job.name, "failed", f"Ray task failed: {type(err).__name__}: {lines[-1] if lines else ''}")
                on_result(result)
        except KeyboardInterrupt:
            for ref in in_flight:
                ray.cancel(ref)  # the task gets KeyboardInterrupt: train saves a checkpoint
            raise
    finally:
        (sweep_dir / TOKEN_FILE).unlink(missing_ok=True)
