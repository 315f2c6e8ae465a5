"""The Ray backend: a real local Ray instance (CPU) runs a two-run sweep of the tiny teacher, and the
errors a user meets before anything runs (Ray missing, an address that does not answer)."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
import socket
import sys
import tempfile
import time
from typing import Iterator

import pytest

from carv3d.cli import main
from carv3d.sweep import SweepError, run_sweep
from test_sweep import tiny_sweep_overrides, write_sweep


@pytest.fixture
def no_ray_to_find(monkeypatch) -> Iterator[None]:
    """``ray.init()`` without an address first connects to RAY_ADDRESS, then to the cluster that a
    ``ray start`` on this machine recorded in ``<temp dir>/ray/ray_current_cluster``; only without
    either does it start a local instance. Neither may leak in from the machine or the shell: a
    temp dir of the test's own (short: Ray's socket paths must stay under 107 bytes, which pytest's
    tmp_path is not) and no RAY_ADDRESS."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = tempfile.mkdtemp(prefix="carv3d-ray-")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    yield
    shutil.rmtree(folder, ignore_errors=True)


def test_ray_sweep_on_a_local_instance_runs_both_runs_into_the_sweep_directory(tiny_sd_path, tmp_path, no_ray_to_find):
    pytest.importorskip("ray")
    overrides = tiny_sweep_overrides(tiny_sd_path, steps=2)
    path = write_sweep(tmp_path, json.dumps({"name": "on-ray", "overrides": overrides, "grid": {"train.seed": [0, 1]},
                                             "output_dir": str(tmp_path / "sweeps")}))
    outcome = run_sweep(path, backend="ray")  # no address: Ray starts a local instance, one CPU per task
    spec = outcome.spec
    assert outcome.exit_code == 0, outcome.report()
    assert {r.status for r in outcome.results.values()} == {"finished"} and len(outcome.results) == 2
    for run in spec.runs:
        run_dir = spec.run_dir(run)
        status = json.loads((run_dir / "run.json").read_text())
        assert (status["status"], status["step"]) == ("finished", 2)
        assert (run_dir / "checkpoints" / "LATEST").is_file() and (run_dir / "turntable.mp4").is_file()
        assert "sweep run" in (spec.directory / "logs" / f"{run.name}.log").read_text()
    rows = list(csv.DictReader((spec.directory / "summary.csv").open()))
    assert sorted(int(r["train.seed"]) for r in rows) == [0, 1]
    assert all(r["status"] == "finished" and float(r["sds_gradient_norm"]) > 0 for r in rows)
    # Different seeds, different runs: the two tasks did not share one run directory.
    metrics = [(spec.run_dir(r) / "metrics.jsonl").read_text().splitlines()[-1] for r in spec.runs]
    assert metrics[0] != metrics[1]
    assert not (spec.directory / ".carv3d-sweep-token").exists()


@contextlib.contextmanager
def _a_port_nothing_listens_on() -> Iterator[int]:
    """A loopback port held by a socket that is bound but never listens: a connect there is refused.
    Held, not closed: a closed port is free for any process to bind and listen on before the check
    connects (and a connect from an ephemeral port can even reach itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_ray_address_that_does_not_answer_fails_fast_before_anything_runs(tmp_path, capsys):
    pytest.importorskip("ray")
    path = write_sweep(tmp_path, json.dumps({"overrides": {"prompt": "a red cube"}, "grid": {"train.seed": [0]},
                                             "output_dir": str(tmp_path / "sweeps")}))
    with _a_port_nothing_listens_on() as port:
        address = f"127.0.0.1:{port}"
        started = time.monotonic()
        code = main(["sweep", str(path), "--backend", "ray", "--address", address])
        seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"Ray address '{address}' does not answer" in err and "ray start --head" in err
    assert seconds < 10  # refused at once; ray.init would wait for minutes
    assert not (tmp_path / "sweeps").exists()
    assert main(["sweep", str(path), "--backend", "ray", "--address", "headnode"]) == 2
    assert "is not HOST:PORT" in capsys.readouterr().err


def test_the_ray_backend_without_ray_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    path = write_sweep(tmp_path, json.dumps({"overrides": {"prompt": "a red cube"}, "grid": {"train.seed": [0]},
                                             "output_dir": str(tmp_path / "sweeps")}))
    with pytest.raises(SweepError, match=r"pip install 'carv3d\[ray\]'"):
        run_sweep(path, backend="ray")
    assert not (tmp_path / "sweeps").exists()
