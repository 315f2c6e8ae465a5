"""Sweeps: the file format and its errors, planning re-runs, the local scheduler, the results table,
and one end-to-end sweep of the tiny teacher (train → failure recorded → resume → skip)."""

from __future__ import annotations

import csv
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest
import torch

from carv3d.cli import main
from carv3d.config import to_yaml
from carv3d.checkpoint import latest_checkpoint
from carv3d.sweep import SweepError, load_sweep, run_name, run_sweep
from carv3d.sweep.jobs import RunJob, pack_dir, unpack_dir
from carv3d.sweep.local import WorkerProcess, run_in_slots, run_local, worker_slots
from carv3d.sweep.state import RunResult, plan_runs, sweep_lock, write_state
from carv3d.sweep.summary import collect_rows, write_summary

ROOT = Path(__file__).resolve().parents[1]


def write_sweep(directory: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def tiny_sweep_overrides(teacher_path: Path, steps: int = 2) -> dict:
    """The tiny Stable Diffusion teacher at its smallest: a run of 2 steps takes a few seconds on a CPU."""
    return {
        "teacher.pretrained": str(teacher_path),
        "prompt": "a red cube",
        "scene.grid.n_levels": 2, "scene.grid.log2_hashmap_size": 10, "scene.grid.base_resolution": 8,
        "scene.mlp_width": 16,
        "render.width": 16, "render.height": 16, "render.samples_per_ray": 8,
        "estimator.preset": "sds",
        "export.at_end": False,
        "train.steps": steps, "train.val_every": 0, "train.checkpoint_every": 1, "train.log_every": 1,
        "train.turntable_frames": 2, "train.val_resolution": 16, "train.tensorboard": False,
    }


# ---------------------------------------------------------------------------------------- the file format
def test_grid_times_zip_gives_every_combination_with_resolved_configs(tmp_path, monkeypatch, tiny_sd_path):
    monkeypatch.chdir(tmp_path)  # output_dir is relative to the working directory
    # An open-vocabulary teacher (any prompt; sweeps check a closed vocabulary up front).
    path = write_sweep(tmp_path, f"""
name: demo
overrides: {{prompt: "a red cube, front view", train.steps: 7, teacher.pretrained: {tiny_sd_path}}}
grid:
  estimator.preset: [sds, carv]
  train.seed: [0, 1, 2]
zip:
  teacher.guidance_scale: [5.0, 10.0]
  render.width: [16, 32]
output_dir: out
""")
    spec = load_sweep(path)
    assert len(spec.runs) == 2 * 3 * 2
    combos = {(r.axes["estimator.preset"], r.axes["train.seed"], r.axes["teacher.guidance_scale"], r.axes["render.width"])
              for r in spec.runs}
    assert combos == {(p, s, g, w) for p in ("sds", "carv") for s in (0, 1, 2) for g, w in ((5.0, 16), (10.0, 32))}
    assert spec.directory == (tmp_path / "out" / "demo").resolve()
    run = next(r for r in spec.runs if r.axes == {"estimator.preset": "carv", "train.seed": 2,
                                                  "teacher.guidance_scale": 10.0, "render.width": 32})
    cfg = spec.configs[run.name]
    # Every layer lands: common overrides, axis values, the preset's own settings, the sweep's own keys.
    assert cfg.prompt == "a red cube, front view" and cfg.train.steps == 7
    assert (cfg.estimator.preset, cfg.train.seed, cfg.teacher.guidance_scale, cfg.render.width) == ("carv", 2, 10.0, 32)
    assert cfg.estimator.noise_draws == "auto" and cfg.estimator.proposal == "adaptive"  # from the carv preset
    assert cfg.train.output_dir == str(spec.runs_dir) and cfg.train.run_name == run.name
    assert cfg.train.progress is False


def test_run_names_are_stable_readable_and_distinct(tmp_path):
    assert run_name({"prompt": "a red cube", "train.seed": 0}) == run_name({"prompt": "a red cube", "train.seed": 0})
    name = run_name({"prompt": "a red cube", "train.seed": 0})
    assert name.startswith("a_red_cube-seed_0-") and len(name.rsplit("-", 1)[1]) == 8
    # Same slug, different values: the hash keeps them apart.
    assert run_name({"prompt": "a red cube"}) != run_name({"prompt": "a red cube!"})
    assert run_name({"train.seed": 1}) != run_name({"train.seed": "1"})
    # Adding a value to an axis does not rename the runs that were there.
    small = load_sweep(write_sweep(tmp_path, "overrides: {prompt: x}\ngrid: {train.seed: [0, 1]}\n"), validate=False)
    large = load_sweep(write_sweep(tmp_path, "overrides: {prompt: x}\ngrid: {train.seed: [0, 1, 2]}\n"), validate=False)
    assert {r.name for r in small.runs} < {r.name for r in large.runs}


def test_axis_values_may_set_several_keys_and_strings_survive_as_written(tmp_path, tiny_sd_path):
    # An open-vocabulary teacher: the embedded one does not know "it's" (checked up front).
    spec = load_sweep(write_sweep(tmp_path, f"overrides: {{teacher.pretrained: {tiny_sd_path}}}\n" + """
grid:
  estimator:
    - {preset: sds}
    - {preset: carv, noise_draws: 4}
  prompt: ["a red cube, front view", "it's: a 'cube'"]
"""))
    configs = {(json.dumps(r.axes["estimator"], sort_keys=True), r.axes["prompt"]): spec.configs[r.name] for r in spec.runs}
    cfg = configs[('{"noise_draws": 4, "preset": "carv"}', "it's: a 'cube'")]
    assert cfg.prompt == "it's: a 'cube'"
    assert cfg.estimator.preset == "carv" and cfg.estimator.noise_draws == 4 and cfg.estimator.proposal == "adaptive"
    sds = configs[('{"preset": "sds"}', "a red cube, front view")]
    assert sds.estimator.noise_draws == 1 and sds.prompt == "a red cube, front view"


def test_base_is_relative_to_the_sweep_file_and_overrides_win(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text("prompt: a blue cone\nrender:\n  width: 24\n  height: 20\n")
    (tmp_path / "configs" / "sweeps").mkdir()
    path = write_sweep(tmp_path / "configs" / "sweeps", "base: ../base.yaml\noverrides:\n  render:\n    width: 40\n"
                       "grid: {train.seed: [3]}\n")
    spec = load_sweep(path)
    cfg = spec.configs[spec.runs[0].name]
    assert (cfg.prompt, cfg.render.width, cfg.render.height, cfg.train.seed) == ("a blue cone", 40, 20, 3)


def test_the_example_sweeps_in_configs_are_valid():
    for path in sorted((ROOT / "configs" / "sweeps").glob("*.yaml")):
        spec = load_sweep(path)
        assert spec.runs and all(spec.configs[r.name].prompt for r in spec.runs), path
    assert len(load_sweep(ROOT / "configs" / "sweeps" / "presets_seeds.yaml", validate=False).runs) == 18


BAD_SWEEPS = [
    # (file text, fragments the one-line error must hold)
    ("grid:\n  train.seed: [0, 1\n  prompt: [a]\n", [":3:", "not valid YAML", "started at line 2"]),
    ("prompt: a red cube\ngrid: {train.seed: [0]}\n", [":1:", "unknown sweep section 'prompt'"]),
    ("grd:\n  train.seed: [0]\n", [":1:", "unknown sweep section 'grd'", "Did you mean 'grid'"]),
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed: [0]\n  estimator.noise_draw: [1, 2]\n",
     [":4:", "unknown config key 'estimator.noise_draw'", "estimator.noise_draws"]),
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed:\n    - 0\n    - abc\n", [":5:", "wrong type", "train.seed", "int"]),
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed: []\n", [":3:", "axis 'train.seed' is empty"]),
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed: 3\n", [":3:", "must be a list"]),
    ("overrides: {prompt: a red cube}\nzip:\n  train.seed: [0, 1]\n  render.width: [8, 16, 32]\n",
     [":2:", "same length", "train.seed: 2", "render.width: 3"]),
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed: [0, 1, 0]\n", [":3:", "lists 0 twice"]),
    ("overrides: {prompt: a red cube}\nzip:\n  train.seed: [0, 1, 0]\n  train.steps: [5, 6, 5]\n",
     [":3:", "zip row 3", "repeats row 1"]),
    ("overrides:\n  prompt: a red cube\n  train:\n    output_dir: elsewhere\n", [":4:", "'train.output_dir' is set by the sweep"]),
    ("overrides: {prompt: a red cube, train.seed: 1}\ngrid:\n  train.seed: [0, 1]\n", [":3:", "'train.seed' is set twice", ":1"]),
    ("base: missing.yaml\ngrid: {train.seed: [0]}\n", [":1:", "missing.yaml", "relative to the sweep file"]),
    ("grid: {train.seed: [0, 1]}\n", ["empty prompt"]),
    ("overrides: {prompt: a red cube}\ngrid: {estimator.t_max: [0.9, 0.01]}\n", ["t_min and t_max", "t_max_0_01"]),
    ("", ["sweep file is empty"]),
    ("- a\n- b\n", ["mapping with sections"]),
    ("name: ../escape\ngrid: {train.seed: [0]}\n", [":1:", "plain directory name"]),
    # PyYAML kept the second `grid:` alone: the sweep ran 2 runs where the file asked for 2 x 2.
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed: [0, 1]\ngrid:\n  train.steps: [1, 2]\n",
     [":4:", "'grid' is set twice", "first on line 2"]),
    ("overrides: {prompt: a red cube}\ngrid:\n  train.seed: [0]\n  train.seed: [1]\n", [":4:", "'grid.train.seed' is set twice"]),
    # A key over a `<<` merge is YAML's override, not a repeat; its own line is the one named.
    ("overrides: {prompt: a red cube}\ngrid:\n  <<: {train.seed: [0, 1]}\n  train.seed: [0, 1, 0]\n", [":4:", "lists 0 twice"]),
    ("base: base.yaml\ngrid: {train.seed: [0]}\n", ["base.yaml:3:1:", "not valid YAML", "spaces, not tabs"]),
]


@pytest.mark.parametrize("text, fragments", BAD_SWEEPS, ids=[f"bad{i}" for i in range(len(BAD_SWEEPS))])
def test_bad_sweep_files_fail_before_any_run_naming_the_line(tmp_path, capsys, text, fragments):
    (tmp_path / "base.yaml").write_text("prompt: a red cube\ntrain:\n\tsteps: 5\n")  # a tab: not YAML
    path = write_sweep(tmp_path, text)
    code = main(["sweep", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (tmp_path / "runs").exists()  # nothing was written, nothing ran


@pytest.mark.parametrize("where", ["sweep", "base"])
def test_a_sweep_or_base_file_that_is_not_utf8_is_one_line_error(tmp_path, capsys, where):
    """A file saved as UTF-16 (or any non-UTF-8 bytes) ended `carv3d sweep` with a UnicodeDecodeError traceback."""
    (tmp_path / "base.yaml").write_bytes("prompt: a red cube\n".encode("utf-16"))
    path = write_sweep(tmp_path, "base: base.yaml\ngrid: {train.seed: [0]}\n")
    if where == "sweep":
        path.write_bytes(path.read_text().encode("utf-16"))
    code = main(["sweep", str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert "not UTF-8 text" in err and f"{where}.yaml" in err


def test_cli_options_are_checked(tmp_path, capsys):
    path = write_sweep(tmp_path, "overrides: {prompt: a red cube}\ngrid: {train.seed: [0]}\n")
    assert main(["sweep", str(path), "--address", "127.0.0.1:6379"]) == 2
    assert "use it with --backend ray" in capsys.readouterr().err
    assert main(["sweep", str(path), "--max-parallel", "0"]) == 2
    assert "--max-parallel must be at least 1" in capsys.readouterr().err


def test_dry_run_lists_the_plan_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_sweep(tmp_path, "name: plan\noverrides: {prompt: a red cube}\ngrid: {train.seed: [0, 1]}\n")
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and out.count("train    new") == 2 and "seed_0-" in out and "seed_1-" in out
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- planning re-runs
def _fake_run_dir(spec, run, status=None, step=0, checkpoint=True, config=None):
    run_dir = spec.run_dir(run)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(to_yaml(config if config is not None else spec.configs[run.name]))
    if status is not None:
        (run_dir / "run.json").write_text(json.dumps({"status": status, "step": step}))
    if checkpoint:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "LATEST").write_text("step_0000001.pt\n")
    return run_dir


def test_plan_skips_finished_resumes_unfinished_restarts_without_checkpoint(tmp_path):
    path = write_sweep(tmp_path, f"overrides: {{prompt: a red cube, train.steps: 5}}\ngrid: {{train.seed: [0, 1, 2, 3, 4, 5]}}\n"
                       f"output_dir: {tmp_path / 'out'}\n")
    spec = load_sweep(path)
    r = spec.runs
    _fake_run_dir(spec, r[0], "finished", 5)
    _fake_run_dir(spec, r[1], "finished", 3)          # the sweep file raised train.steps since
    _fake_run_dir(spec, r[2], "interrupted", 2)
    _fake_run_dir(spec, r[3], "running", 0, checkpoint=False)  # crashed before its first checkpoint
    _fake_run_dir(spec, r[4], "diverged", 4)
    plan = {p.run.name: p for p in plan_runs(spec)}
    assert [plan[x.name].action for x in r] == ["skip", "resume", "resume", "restart", "skip", "train"]
    assert plan[r[1].name].resume_overrides == ("train.steps=5",)
    assert "diverged" in plan[r[4].name].reason


def test_plan_refuses_run_dirs_made_with_another_config(tmp_path):
    path = write_sweep(tmp_path, f"overrides: {{prompt: a red cube}}\ngrid: {{train.seed: [0, 1]}}\noutput_dir: {tmp_path / 'out'}\n")
    spec = load_sweep(path)
    other = spec.configs[spec.runs[0].name].copy()
    other.render.width = 99
    _fake_run_dir(spec, spec.runs[0], "finished", 1000, config=other)
    with pytest.raises(SweepError, match=r"render.width: 99 → 64"):
        plan_runs(spec)


def test_sweep_lock_refuses_a_second_sweep_and_takes_over_a_stale_lock(tmp_path):
    with sweep_lock(tmp_path):
        with pytest.raises(SweepError, match="another sweep"):
            with sweep_lock(tmp_path):
                pass
    assert not (tmp_path / "sweep.lock").exists()
    import socket

    (tmp_path / "sweep.lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname()}))
    with sweep_lock(tmp_path):  # that pid does not exist: the lock is stale
        assert json.loads((tmp_path / "sweep.lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------- the local scheduler
def test_worker_slots_one_per_gpu_or_round_robin():
    assert worker_slots(["0", "1", "2", "3"]) == ["0", "1", "2", "3"]
    assert worker_slots(["4", "7"], max_parallel=3) == ["4", "7", "4"]
    assert worker_slots(["0", "1", "2"], max_parallel=1) == ["0"]
    assert worker_slots(["0"]) == [None] and worker_slots([]) == [None]
    assert worker_slots([], max_parallel=2) == [None, None]


def test_runs_spread_over_fake_gpus_never_two_on_one_gpu():
    gpus = ["0", "1", "2", "3"]
    jobs = [RunJob(name=f"r{i}", action="train", config_yaml="", run_dir="") for i in range(10)]
    lock = threading.Lock()
    busy: set[str] = set()
    used: list[str] = []
    overlaps: list[str] = []

    def fake_run(job, slot):
        with lock:
            if slot in busy:
                overlaps.append(slot)
            busy.add(slot)
            used.append(slot)
        time.sleep(0.02 + 0.01 * (int(job.name[1:]) % 3))
        with lock:
            busy.discard(slot)
        return RunResult(job.name, "finished", "", 0.0)

    results: list[RunResult] = []
    run_in_slots(jobs, worker_slots(gpus), fake_run, results.append)
    assert sorted(r.name for r in results) == sorted(j.name for j in jobs)  # each job exactly once
    assert not overlaps
    assert set(used) == set(gpus)


def test_one_device_runs_in_process_in_order(monkeypatch):
    import carv3d.sweep.local as local

    order: list[str] = []
    monkeypatch.setattr(local, "execute_job", lambda job: order.append(job.name) or RunResult(job.name, "finished"))
    jobs = [RunJob(name=n, action="train", config_yaml="", run_dir="") for n in "abc"]
    results: list[RunResult] = []
    run_local(jobs, results.append, gpus=["0"])
    assert order == ["a", "b", "c"] and [r.name for r in results] == order


def test_a_worker_process_that_dies_is_a_failed_run(tmp_path, monkeypatch):
    job = RunJob(name="dies", action="train", config_yaml="", run_dir=str(tmp_path / "x"),
                 log_path=str(tmp_path / "logs" / "dies.log"))
    # A job file the worker cannot read: it exits with a traceback before writing a result.
    monkeypatch.setattr(RunJob, "to_dict", lambda self: {"not": "a job"})
    worker = WorkerProcess(slot="3")
    result = worker.run(job)
    assert result.status == "failed" and "exited with code 1" in result.error and "dies.log" in result.error
    assert "TypeError" in (tmp_path / "logs" / "dies.log").read_text()
    assert worker.process is None  # the next run starts a fresh process


# A stand-in for `python -m carv3d.sweep.worker --serve` that speaks its protocol: each result's
# error field carries the serving process's pid and CUDA_VISIBLE_DEVICES; a job named fail-* fails
# (and, as the real worker, ends the process), crash-* kills the process during its run, last-*
# finishes and then kills the process (between runs), sigint-* dies by Ctrl-C during its run.
FAKE_WORKER = """
import json, os, signal, sys
for line in sys.stdin:
    request = json.loads(line)
    name = json.loads(open(request["job"]).read())["name"]
    open(request["result"] + ".started", "w").close()
    if name.startswith("crash"):
        os._exit(3)
    if name.startswith("sigint"):
        signal.raise_signal(signal.SIGINT)
    status = "failed" if name.startswith("fail") else "finished"
    with open(request["log"], "a") as log:
        log.write(f"{name} in {os.getpid()}\\n")
    error = f"{os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES')} {os.environ.get('OMP_NUM_THREADS')}"
    with open(request["result"] + ".tmp", "w") as out:
        json.dump({"name": name, "status": status, "error": error}, out)
    os.replace(request["result"] + ".tmp", request["result"])
    if name.startswith("last"):
        print("dying between runs", flush=True)
        os._exit(139)
    if status != "finished":
        sys.exit(0)
"""


def _fake_worker(tmp_path: Path, slot: Optional[str], name: str = "worker-0") -> WorkerProcess:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return WorkerProcess(slot, name=name, threads=3, command=[sys.executable, str(script)])


def _job(tmp_path: Path, name: str) -> RunJob:
    return RunJob(name=name, action="train", config_yaml="", run_dir=str(tmp_path / name),
                  log_path=str(tmp_path / "logs" / f"{name}.log"))


def test_one_worker_process_serves_run_after_run_and_is_replaced_after_a_failure_or_a_crash(tmp_path):
    worker = _fake_worker(tmp_path, slot="5")
    try:
        first = [worker.run(_job(tmp_path, n)) for n in ("a", "b", "c")]
        assert [r.status for r in first] == ["finished"] * 3
        pids = {r.error.split()[0] for r in first}
        assert len(pids) == 1 and worker.started == 1  # one process for the three runs
        assert {r.error.split()[1] for r in first} == {"5"}  # it sees only its GPU
        assert {r.error.split()[2] for r in first} == {os.environ.get("OMP_NUM_THREADS", "3")}  # its share of cores
        assert (tmp_path / "logs" / "b.log").read_text().strip() == f"b in {pids.pop()}"

        failed = worker.run(_job(tmp_path, "fail-d"))
        assert failed.status == "failed" and worker.process is None
        after_failure = worker.run(_job(tmp_path, "e"))
        assert after_failure.status == "finished" and worker.started == 2
        assert after_failure.error.split()[0] != first[0].error.split()[0]

        crashed = worker.run(_job(tmp_path, "crash-f"))
        assert crashed.status == "failed" and "exited with code 3" in crashed.error and "crash-f.log" in crashed.error
        assert worker.run(_job(tmp_path, "g")).status == "finished" and worker.started == 3
    finally:
        worker.close()
    assert worker.process is None


def test_a_worker_that_dies_between_runs_costs_no_run_and_ctrl_c_is_an_interrupted_run(tmp_path):
    worker = _fake_worker(tmp_path, slot=None)
    try:
        assert worker.run(_job(tmp_path, "last-a")).status == "finished"
        time.sleep(0.3)  # it is gone before the next run is handed over (or, racing, just after)
        after = worker.run(_job(tmp_path, "b"))
        assert after.status == "finished" and worker.started == 2  # handed to a fresh process, not failed
        assert "dying between runs" in (tmp_path / "logs" / "worker-0.log").read_text()  # its own output kept

        interrupted = worker.run(_job(tmp_path, "sigint-c"))
        assert interrupted.status == "interrupted" and worker.process is None
        assert worker.run(_job(tmp_path, "d")).status == "finished" and worker.started == 3
    finally:
        worker.close()


def test_an_error_in_the_sweep_itself_stops_the_running_jobs_and_starts_no_more():
    jobs = [RunJob(name=f"r{i}", action="train", config_yaml="", run_dir="") for i in range(12)]
    started: list[str] = []
    stop = threading.Event()
    aborted: list[bool] = []

    def slow_run(job, slot):
        started.append(job.name)
        if job.name != "r0":  # r0's result is the one that fails to save; the others run until asked to stop
            stop.wait(5.0)  # a run that ends early when asked to (on_abort), as a worker does on SIGINT
        return RunResult(job.name, "interrupted" if stop.is_set() else "finished")

    def full_disk(result):
        raise OSError(28, "No space left on device")

    def abort():
        aborted.append(True)
        stop.set()

    t0 = time.monotonic()
    with pytest.raises(OSError, match="No space"):
        run_in_slots(jobs, ["0", "1"], slow_run, full_disk, on_abort=abort)
    # r0 and r1 start; r0's slot may take r2 before r0's result is saved; nothing starts after that.
    assert aborted and started[:2] in (["r0", "r1"], ["r1", "r0"]) and len(started) <= 3
    assert time.monotonic() - t0 < 5  # the running jobs were asked to stop, not waited out


def test_worker_processes_over_slots_take_each_run_once_and_stay_up(tmp_path):
    workers = [_fake_worker(tmp_path, slot) for slot in ("0", "1")]
    jobs = [_job(tmp_path, f"r{i}") for i in range(8)]
    results: list[RunResult] = []
    try:
        run_in_slots(jobs, workers, lambda job, worker: worker.run(job), results.append)
    finally:
        for worker in workers:
            worker.close()
    assert sorted(r.name for r in results) == sorted(j.name for j in jobs)
    served = {(r.error.split()[0], r.error.split()[1]) for r in results}
    assert {gpu for _, gpu in served} <= {"0", "1"} and len({pid for pid, _ in served}) <= 2
    assert sum(w.started for w in workers) <= 2  # no process per run


def test_the_worker_sends_each_runs_output_to_its_log_and_stops_after_a_failed_run(tmp_path, monkeypatch):
    import io

    import carv3d.sweep.jobs as jobs_module
    from carv3d.sweep.worker import serve

    ran: list[str] = []

    def fake_execute(job):
        ran.append(job.name)
        # fd 1 and 2, where a worker's print, logging, tqdm and C extensions write (pytest swaps sys.stdout)
        os.write(1, f"stdout of {job.name}\n".encode())
        os.write(2, f"fd 2 of {job.name}\n".encode())
        return RunResult(job.name, "failed" if job.name == "bad" else "finished")

    monkeypatch.setattr(jobs_module, "execute_job", fake_execute)
    lines = []
    for name in ("one", "bad", "never"):
        (tmp_path / f"{name}.json").write_text(json.dumps(_job(tmp_path, name).to_dict()))
        lines.append(json.dumps({"job": f"{tmp_path / name}.json", "result": f"{tmp_path / name}.result",
                                 "log": f"{tmp_path / name}.log"}) + "\n")
    assert serve(io.StringIO("".join(lines))) == 0
    assert ran == ["one", "bad"]  # a failed run ends the process: "never" waits for a fresh one
    one = (tmp_path / "one.log").read_text()
    assert "stdout of one" in one and "fd 2 of one" in one and "bad" not in one
    assert "fd 2 of bad" in (tmp_path / "bad.log").read_text()
    assert json.loads((tmp_path / "bad.result").read_text())["status"] == "failed"
    assert not (tmp_path / "never.result").exists()
    assert (tmp_path / "one.result.started").exists() and not (tmp_path / "never.result.started").exists()
    assert serve(io.StringIO("not a job line\n")) == 2


# ---------------------------------------------------------------------------------------- moving run directories
def test_pack_and_unpack_replace_a_run_directory(tmp_path):
    src = tmp_path / "src"
    (src / "checkpoints").mkdir(parents=True)
    (src / "run.json").write_text('{"status": "finished"}')
    (src / "checkpoints" / "step_0000002.pt").write_bytes(b"\x00\x01" * 1000)
    dest = tmp_path / "sweep" / "runs" / "r"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    unpack_dir(pack_dir(src), dest)
    assert (dest / "run.json").read_text() == '{"status": "finished"}'
    assert (dest / "checkpoints" / "step_0000002.pt").read_bytes() == b"\x00\x01" * 1000
    assert not (dest / "stale.txt").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["r"]  # no staging leftovers


# ---------------------------------------------------------------------------------------- the results table
def test_summary_collects_status_metrics_evaluation_and_variance(tmp_path):
    path = write_sweep(tmp_path, f"name: sum\noverrides: {{prompt: a red cube}}\ngrid:\n  estimator.preset: [sds, carv]\n"
                       f"  train.seed: [0, 1]\noutput_dir: {tmp_path / 'out'}\n")
    spec = load_sweep(path)
    by_axes = {(r.axes["estimator.preset"], r.axes["train.seed"]): r for r in spec.runs}
    ok = spec.run_dir(by_axes[("carv", 1)])
    ok.mkdir(parents=True)
    (ok / "run.json").write_text(json.dumps({"status": "finished", "step": 300, "elapsed_seconds": 12.5}))
    (ok / "metrics.jsonl").write_text('{"step": 290, "sds_gradient_norm": 9.0}\n'
                                      '{"step": 300, "sds_gradient_norm": 1.25, "opacity_mean": 0.5, "elapsed_seconds": 12.5}\n'
                                      '{"step": 31')  # a line cut short by a crash
    (ok / "evaluation.json").write_text(json.dumps({"clip_score": 0.31, "metrics": {"silhouette_iou": 0.8}, "name": "x"}))
    (ok / "variance.json").write_text(json.dumps({"rows": [
        {"method": "carv", "upstream_samples": 1, "noise_draws": 4, "variance": 0.5, "relative_efficiency": 3.0}]}))
    other = spec.run_dir(by_axes[("sds", 1)])
    other.mkdir(parents=True)
    (other / "run.json").write_text(json.dumps({"status": "finished", "step": 300, "elapsed_seconds": 10.0}))
    (other / "metrics.jsonl").write_text('{"step": 300, "sds_gradient_norm": 2.5, "opacity_mean": 0.25}\n')
    failed = by_axes[("sds", 0)]
    results = {failed.name: RunResult(failed.name, "failed", "teacher weights 'x' not found | try again", 0.1)}
    write_state(spec, results)

    files = write_summary(spec, results)
    rows = {(r["estimator.preset"], r["train.seed"]): r for r in csv.DictReader(files["csv"].open())}
    assert len(rows) == 4
    row = rows[("carv", "1")]
    assert row["status"] == "finished" and row["step"] == "300" and float(row["wall_clock_s"]) == 12.5
    assert float(row["sds_gradient_norm"]) == 1.25 and float(row["opacity_mean"]) == 0.5
    assert float(row["eval_clip_score"]) == 0.31 and float(row["eval_metrics_silhouette_iou"]) == 0.8
    assert float(row["var_carv_R1K4"]) == 0.5 and float(row["re_carv_R1K4"]) == 3.0
    assert rows[("sds", "0")]["status"] == "failed" and "not found" in rows[("sds", "0")]["error"]
    assert rows[("carv", "0")]["status"] == "pending" and rows[("carv", "0")]["sds_gradient_norm"] == ""

    md = files["md"].read_text()
    assert "| run | estimator.preset | train.seed | status |" in md
    assert "1.25" in md and "## Errors" in md and "not found | try again" in md
    # train.seed is numeric: one plot against it; estimator.preset is not.
    assert [k for k in files if k.startswith("plot:")] == ["plot:train.seed"]
    assert files["plot:train.seed"].stat().st_size > 5000
    state = json.loads((spec.directory / "sweep_state.json").read_text())
    assert state["runs"][failed.name]["status"] == "failed"
    assert collect_rows(spec, {})[0]["status"] in ("pending", "finished")


# ---------------------------------------------------------------------------------------- end to end
def test_local_sweep_records_failures_resumes_and_skips(tiny_sd_path, tmp_path, capsys):
    """One run trains, one fails (missing teacher) without stopping the sweep; raising train.steps
    resumes the finished run from its checkpoint; a third invocation skips it."""
    overrides = tiny_sweep_overrides(tiny_sd_path, steps=2)
    overrides.pop("teacher.pretrained")

    def sweep_text(steps: int) -> str:
        return json.dumps({"name": "e2e", "overrides": {**overrides, "train.steps": steps},
                           "zip": {"teacher.pretrained": [str(tiny_sd_path), str(tmp_path / "no_such_teacher")],
                                   "train.seed": [0, 1]},
                           "output_dir": str(tmp_path / "sweeps")})

    path = write_sweep(tmp_path, sweep_text(2))
    first = run_sweep(path)
    spec = first.spec
    good, bad = spec.runs
    assert good.axes["teacher.pretrained"] == str(tiny_sd_path)
    assert first.exit_code == 1 and [r.name for r in first.failed] == [bad.name]
    assert "no_such_teacher" in first.results[bad.name].error
    assert not spec.run_dir(bad).exists()  # it failed to start: nothing half-made
    status = json.loads((spec.run_dir(good) / "run.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 2)
    assert "sweep run" in (spec.directory / "logs" / f"{good.name}.log").read_text()
    state = json.loads((spec.directory / "sweep_state.json").read_text())
    assert {n: r["status"] for n, r in state["runs"].items()} == {good.name: "finished", bad.name: "failed"}
    rows = {r["run"]: r for r in csv.DictReader((spec.directory / "summary.csv").open())}
    assert rows[good.name]["status"] == "finished" and rows[good.name]["step"] == "2"
    assert float(rows[good.name]["wall_clock_s"]) > 0 and float(rows[good.name]["sds_gradient_norm"]) > 0
    assert rows[bad.name]["status"] == "failed" and "no_such_teacher" in rows[bad.name]["error"]
    assert (spec.directory / "sweep.yaml").read_text() == path.read_text()
    assert not (spec.directory / "sweep.lock").exists()

    # Raise train.steps: the finished run continues from its checkpoint at step 2.
    write_sweep(tmp_path, sweep_text(3))
    second = run_sweep(path)
    assert {p.run.name: p.action for p in second.planned} == {good.name: "resume", bad.name: "train"}
    assert json.loads((spec.run_dir(good) / "run.json").read_text())["step"] == 3
    steps = [json.loads(line)["step"] for line in (spec.run_dir(good) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # one run, continued; not trained again from step 0

    # Nothing changed: the finished run is skipped and untouched; the CLI reports the failure.
    stamp = (spec.run_dir(good) / "run.json").stat().st_mtime_ns
    code = main(["sweep", str(path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "1 failed, 1 finished (1 skipped as already done)" in out
    assert f"failed: {bad.name}: " in out and str(spec.directory / "summary.md") in out
    assert (spec.run_dir(good) / "run.json").stat().st_mtime_ns == stamp


def test_a_ray_task_without_the_sweep_disk_ships_the_run_back(tiny_sd_path, tmp_path):
    """The Ray task body, run here without Ray: a worker that does not see the sweep directory
    trains in a temporary folder and returns the run directory, which ``collect`` unpacks."""
    from carv3d.sweep.ray_backend import _ray_task, collect
    from carv3d.sweep.runner import _job

    overrides = tiny_sweep_overrides(tiny_sd_path, steps=1)
    path = write_sweep(tmp_path, json.dumps({"name": "ship", "overrides": overrides, "grid": {"train.seed": [5]},
                                             "output_dir": str(tmp_path / "sweeps")}))
    spec = load_sweep(path)
    job = _job(spec, plan_runs(spec)[0])
    payload = _ray_task(job.to_dict(), token="not the driver's token", archive_refs=[])
    assert not Path(job.run_dir).exists()  # the task did not write into the sweep directory
    result = collect(payload, job)
    assert result.status == "finished"
    status = json.loads((Path(job.run_dir) / "run.json").read_text())
    assert (status["status"], status["step"]) == ("finished", 1)
    assert (Path(job.run_dir) / "checkpoints" / "LATEST").is_file()
    assert "sweep run" in Path(job.log_path).read_text()


@pytest.mark.slow
def test_several_gpus_get_one_worker_process_each(tiny_sd_path, tmp_path):
    """Two (pretend) GPUs, four runs: one worker process per GPU, which sees only its GPU and trains
    its runs one after another. On a machine without CUDA the workers train on the CPU, which is
    enough to check the processes and their devices."""
    overrides = tiny_sweep_overrides(tiny_sd_path, steps=1)
    path = write_sweep(tmp_path, json.dumps({"name": "gpus", "overrides": overrides,
                                             "grid": {"train.seed": [0, 1, 2, 3]}, "output_dir": str(tmp_path / "sweeps")}))
    outcome = run_sweep(path, gpus=["0", "1"])
    assert outcome.exit_code == 0, outcome.report()
    workers = set()
    for run in outcome.spec.runs:
        assert json.loads((outcome.spec.run_dir(run) / "run.json").read_text())["status"] == "finished"
        log = (outcome.spec.directory / "logs" / f"{run.name}.log").read_text()
        pid = log.split("sweep worker pid ")[1].split()[0]
        workers.add((pid, log.split("CUDA_VISIBLE_DEVICES=")[1].split()[0]))
    assert {gpu for _, gpu in workers} == {"0", "1"} and len(workers) == 2  # two processes for four runs


# ---------------------------------------------------------------------------------------- sized for the machine
def test_a_sweep_run_is_sized_for_the_cpu_like_carv3d_train(tmp_path):
    """The worker rebuilds the run's config from YAML (every key in one layer); the job carries the
    keys the sweep set, so the worker sizes the others for a CPU exactly as `carv3d train` does, and
    re-planning accepts the sized run directory as the same run."""
    from carv3d.config import load_config
    from carv3d.sizing import CPU_SETTINGS, size_for_device
    from carv3d.sweep.jobs import config_from_yaml
    from carv3d.sweep.runner import _job

    path = write_sweep(tmp_path, f"overrides: {{prompt: a red cube, render.width: 48}}\ngrid: {{train.seed: [0, 1]}}\n"
                       f"output_dir: {tmp_path / 'out'}\n")
    spec = load_sweep(path)
    run = spec.runs[1]
    job = _job(spec, plan_runs(spec)[1])
    assert {"prompt", "render.width", "train.seed", "train.progress"} <= set(job.explicit_keys)
    assert "render.samples_per_ray" not in job.explicit_keys

    worker_cfg = config_from_yaml(job.config_yaml, explicit=job.explicit_keys)
    changes = size_for_device(worker_cfg, "cpu")
    # The reference: the same layers through load_config, as `carv3d train` would resolve them.
    train_cfg = load_config(overrides=[*run.overrides, "train.progress=false"])
    assert changes == size_for_device(train_cfg, "cpu") and "render.width" not in changes
    assert worker_cfg.render.samples_per_ray == CPU_SETTINGS["render.samples_per_ray"] != 64
    assert worker_cfg.render.width == 48 and worker_cfg.train.seed == 1
    # Without the record every key counts as set (the old behaviour, and --resume's): nothing sized.
    assert size_for_device(config_from_yaml(job.config_yaml), "cpu") == {}

    # The run directory holds the sized config: the next invocation of the sweep resumes it.
    _fake_run_dir(spec, run, "interrupted", 3, config=worker_cfg)
    assert plan_runs(spec)[1].action == "resume"
    # A key the sweep sets is still compared: a stored value that differs is another run.
    other = worker_cfg.copy()
    other.render.width = CPU_SETTINGS["render.width"]
    import shutil
    shutil.rmtree(spec.run_dir(run))
    _fake_run_dir(spec, run, "interrupted", 3, config=other)
    with pytest.raises(SweepError, match=r"render.width: 32 → 48"):
        plan_runs(spec)


# ---------------------------------------------------------------------------------------- per-run progress
class _Bar:
    def __init__(self):
        self.postfix = ""

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text


def test_the_sweep_bar_names_the_training_runs_and_their_steps(tmp_path):
    from carv3d.sweep.progress import RunProgress, last_logged_step

    def run_dir(name, status, steps_logged, partial=False):
        path = tmp_path / name
        path.mkdir()
        if status:
            (path / "run.json").write_text(json.dumps({"status": status}))
        lines = "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in steps_logged)
        (path / "metrics.jsonl").write_text(lines + ('{"step": 99, "lo' if partial else ""))
        return path

    a = run_dir("a", "running", [10, 20, 30], partial=True)   # a line being written is not read
    b = run_dir("b", "running", [])
    c = run_dir("c", None, [])                                # not started yet
    assert last_logged_step(a) == 30 and last_logged_step(b) is None and last_logged_step(tmp_path / "x") is None
    # A long file: only its tail is read, and the step is still the last one.
    (b / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "pad": "x" * 100}) + "\n" for s in range(1, 501)))
    assert last_logged_step(b) == 500

    bar = _Bar()
    watcher = RunProgress(bar, {"a": (a, 300), "b": (b, 1000), "c": (c, 300)}, interval=0.01, failed=1)
    watcher.refresh()
    assert bar.postfix == "a 30/300, b 500/1000; 1 failed"
    watcher.done("a")
    watcher.done("b", failed=True)
    assert bar.postfix == "2 failed"
    many = {f"r{i}": (run_dir(f"r{i}", "running", [i]), 9) for i in range(5)}
    watcher = RunProgress(bar, many)
    watcher.refresh()
    assert bar.postfix == "r0 0/9, r1 1/9, r2 2/9 (+2 training)"
    with RunProgress(bar, {"a": (a, 300)}, interval=0.01) as live:  # the thread refreshes by itself
        deadline = time.time() + 5
        while bar.postfix != "a 30/300" and time.time() < deadline:
            time.sleep(0.01)
    assert bar.postfix == "a 30/300" and not live._thread.is_alive()


def test_a_zip_axis_may_repeat_a_value_when_its_rows_differ(tmp_path):
    path = tmp_path / "arms.yaml"
    path.write_text("overrides: {prompt: a red cube}\nzip:\n  estimator.preset: [sds, carv, carv]\n"
                    "  guidance: [{type: sds}, {type: sds}, {type: csd}]\n")
    spec = load_sweep(path)
    assert [run.axes for run in spec.runs] == [
        {"estimator.preset": "sds", "guidance": {"type": "sds"}},
        {"estimator.preset": "carv", "guidance": {"type": "sds"}},
        {"estimator.preset": "carv", "guidance": {"type": "csd"}}]
    assert [spec.configs[run.name].guidance.type for run in spec.runs] == ["sds", "sds", "csd"]
    assert len({run.name for run in spec.runs}) == 3


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_leaves_the_runs_resumable(tiny_sd_path, tmp_path):
    """A sweep with two worker processes, Ctrl-C (SIGINT to the process group, as a terminal sends it)
    while both train: the sweep exits 130, each run saved a checkpoint and is `interrupted`, no
    worker is left behind, and running the sweep again finishes both from their checkpoints."""
    import signal
    import subprocess

    overrides = {**tiny_sweep_overrides(tiny_sd_path, steps=2000), "train.checkpoint_every": 0,
                 "train.turntable_frames": 0}
    path = write_sweep(tmp_path, json.dumps({"name": "sigint", "overrides": overrides, "grid": {"train.seed": [0, 1]},
                                             "output_dir": str(tmp_path / "sweeps")}))
    spec = load_sweep(path)
    command = [sys.executable, "-m", "carv3d.cli", "sweep", str(path), "--max-parallel", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    metrics = [spec.run_dir(run) / "metrics.jsonl" for run in spec.runs]
    deadline = time.monotonic() + 240
    while not all(m.is_file() and m.stat().st_size > 0 for m in metrics):  # both are training
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()[0][-3000:]
        time.sleep(0.5)
    os.killpg(sweep.pid, signal.SIGINT)
    output = sweep.communicate(timeout=240)[0].decode(errors="replace")
    assert sweep.returncode == 130, output[-3000:]
    with pytest.raises(ProcessLookupError):  # nobody left in the sweep's process group
        os.killpg(sweep.pid, 0)
    steps = []
    for run in spec.runs:
        status = json.loads((spec.run_dir(run) / "run.json").read_text())
        assert status["status"] == "interrupted" and 0 < status["step"] < 2000, status
        assert latest_checkpoint(spec.run_dir(run)) is not None
        steps.append(status["step"])

    # again, with fewer steps so that it ends soon: both resume from their checkpoints and finish
    path.write_text(path.read_text().replace('"train.steps": 2000', f'"train.steps": {max(steps) + 2}'))
    again = run_sweep(path, gpus=["0", "1"])
    assert again.exit_code == 0, again.report()
    for run, step in zip(spec.runs, steps):
        status = json.loads((spec.run_dir(run) / "run.json").read_text())
        assert (status["status"], status["step"]) == ("finished", max(steps) + 2)
        log = (spec.directory / "logs" / f"{run.name}.log").read_text()
        assert "resume" in log.split("sweep worker pid")[-1], log[-2000:]


@pytest.mark.parametrize("overrides", [["scene.type=gaussians"], ["guidance.type=vsd"], ["scene.type=nerf"]],
                         ids=["gaussians", "vsd", "nerf"])
def test_a_run_config_of_any_scene_or_guidance_type_survives_the_trip_to_a_worker(overrides):
    """A worker rebuilds each run's config from its YAML: the seams' own schemas must come back
    (a Gaussian scene's `rasterizer`, VSD's `lora_rank`), value for value."""
    from omegaconf import OmegaConf

    from carv3d.config import load_config
    from carv3d.sweep.jobs import config_from_yaml

    cfg = load_config(overrides=overrides, prompt="a red cube")
    again = config_from_yaml(OmegaConf.to_yaml(cfg))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert OmegaConf.get_type(again.scene) is OmegaConf.get_type(cfg.scene)
    assert OmegaConf.get_type(again.guidance) is OmegaConf.get_type(cfg.guidance)


def test_after_a_run_the_process_is_left_as_a_fresh_one(monkeypatch):
    """A worker trains many runs: after each, the environment is as before it, and torch.compile
    holds no graphs (else a run of new shapes could hit the per-function limit of compiled variants
    and run uncompiled, silently)."""
    from torch._dynamo.testing import CompileCounter

    from carv3d.sweep.jobs import as_a_fresh_process

    before = dict(os.environ)
    counter = CompileCounter()
    double = torch.compile(lambda x: x * 2, backend=counter, dynamic=False)
    for size in (2, 3):  # one "run"'s shapes
        double(torch.ones(size))
    assert counter.frame_count == 2
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = "/somewhere/a/run/chose"  # as a run's teacher.compile_cache does
    try:
        as_a_fresh_process(before)
        assert dict(os.environ) == before
        double(torch.ones(2))  # the next run compiles its shapes afresh
        assert counter.frame_count == 3
    finally:
        os.environ.clear()
        os.environ.update(before)


@pytest.mark.slow
def test_a_run_in_a_used_worker_trains_exactly_as_in_a_fresh_one(tiny_sd_path, tmp_path):
    """Seed 0, seed 1, then seed 0 again (its val_every differs, which 3 steps never reach) over two
    workers: the third run shares a process with an earlier run, the first had a fresh one; their
    metrics agree to the bit."""
    overrides = {**tiny_sweep_overrides(tiny_sd_path, steps=3), "estimator.preset": "carv"}
    overrides.pop("train.val_every")
    path = write_sweep(tmp_path, json.dumps({"name": "reuse", "overrides": overrides,
                                             "zip": {"train.seed": [0, 1, 0], "train.val_every": [0, 0, 1000]},
                                             "output_dir": str(tmp_path / "sweeps")}))
    outcome = run_sweep(path, gpus=["0", "1"])
    assert outcome.exit_code == 0, outcome.report()

    def numbers(run):
        rows = [json.loads(line) for line in (outcome.spec.run_dir(run) / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not (k.startswith("time_") or "seconds" in k)} for row in rows]

    first, _, third = outcome.spec.runs
    pids = {r.name: (outcome.spec.directory / "logs" / f"{r.name}.log").read_text().split("sweep worker pid ")[1].split()[0]
            for r in outcome.spec.runs}
    assert len(set(pids.values())) == 2  # two workers for three runs: the third ran in a used process
    assert numbers(first) == numbers(third) and len(numbers(first)) == 3
