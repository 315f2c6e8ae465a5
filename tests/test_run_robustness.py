"""A run directory under attack (issue 21): names that escape the output folder, a full disk, stale
temporaries, two trainings of one run, a LATEST that points elsewhere, and durable renames.

Each test fails on the code before the fix: it asserts the behaviour (what is refused, what is left
on disk, what the message says), not that something runs.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from carv3d import io as carv3d_io
from carv3d.checkpoint import (LATEST_FILE, latest_checkpoint, load_checkpoint, remove_stale_temporaries,
                               save_checkpoint)
from carv3d.config import load_config
from carv3d.errors import (CheckpointError, ConfigError, DiskFullError, RunDirError, RunLockedError,
                           UserError)
from carv3d.run_dir import LOCK_FILE, check_plain_name, create_run_dir, run_lock

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------- item 7: run names
@pytest.mark.parametrize("name", ["../../escape", "..", "a/b", "a\\b", "/some/where", "   ", ".hidden",
                                  "run name", "x" * 201, "run\nname"])
def test_run_name_that_is_not_a_plain_directory_name_is_refused_before_anything_is_written(tmp_path, name):
    out = tmp_path / "deep" / "out"
    cfg = load_config(overrides=[f"train.output_dir={out}"], prompt="a red cube")
    cfg.train.run_name = name
    with pytest.raises(ConfigError) as err:
        create_run_dir(cfg)
    message = str(err.value)
    assert "train.run_name" in message and "plain directory name" in message and "train.output_dir" in message
    assert "\n" not in message.replace(repr(name)[1:-1], "") and err.value.exit_code == 2
    assert _files(tmp_path) == [] and not (tmp_path / "escape").exists()
    assert not Path("/some/where").exists()


def test_plain_run_names_and_the_default_name_are_accepted(tmp_path):
    cfg = load_config(overrides=[f"train.output_dir={tmp_path}", "train.run_name=red-cube_seed0.v2"], prompt="a cube")
    assert create_run_dir(cfg) == tmp_path / "red-cube_seed0.v2"
    cfg.train.run_name = ""  # the default: prompt slug + timestamp
    assert create_run_dir(cfg).name.startswith("a_cube-")
    assert check_plain_name("0") == "0"


def test_runs_of_one_prompt_started_in_the_same_second_get_a_directory_each(tmp_path, monkeypatch):
    """The default name holds the time to the second: the second of two runs started within it (a shell
    loop over seeds) failed as "already exists", and two processes could both pass the existence check
    before either made the directory. Here the clock stands still and eight threads start at once."""
    import datetime
    import threading
    from types import SimpleNamespace

    import carv3d.run_dir as run_dir_module

    class StoppedClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(run_dir_module, "_dt", SimpleNamespace(datetime=StoppedClock))
    cfg = load_config(overrides=[f"train.output_dir={tmp_path}"], prompt="a red cube")
    assert create_run_dir(cfg).name == "a_red_cube-20260102-030405"
    assert create_run_dir(cfg).name == "a_red_cube-20260102-030405-2"

    start = threading.Barrier(8)
    made, errors = [], []

    def start_a_run():
        start.wait()
        try:
            made.append(create_run_dir(cfg))
        except Exception as err:  # recorded, asserted below
            errors.append(err)

    threads = [threading.Thread(target=start_a_run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(made)) == 8
    assert sorted(p.name for p in made) == sorted(f"a_red_cube-20260102-030405-{i}" for i in range(3, 11))
    # A name the user chose is never given a suffix: an existing one is refused as before.
    cfg.train.run_name = "mine"
    create_run_dir(cfg)
    with pytest.raises(RunDirError, match="already exists"):
        create_run_dir(cfg)


def test_sweeps_use_the_same_name_check(tmp_path):
    from carv3d.sweep import SweepError, load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("name: ../../escape\ngrid:\n  train.seed: [0]\n")
    with pytest.raises(SweepError, match=r"s\.yaml:1: sweep name '\.\./\.\./escape' contains a path separator"):
        load_sweep(path, validate=False)


# ---------------------------------------------------------------------------------------- item 9: a full disk
def _run_with_checkpoint(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    save_checkpoint(run_dir, 3, {"w": torch.arange(4.0)})
    return run_dir


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_full_disk_while_saving_a_checkpoint_is_a_clear_error_and_loses_nothing(tmp_path, monkeypatch, failure):
    run_dir = _run_with_checkpoint(tmp_path)
    before = _files(run_dir / "checkpoints")

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # a partial temporary, as a real full disk leaves
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError) as err:
        save_checkpoint(run_dir, 4, {"w": torch.ones(4)})
    message = str(err.value)
    assert isinstance(err.value, UserError) and err.value.exit_code == 2 and "\n" not in message
    assert str(run_dir / "checkpoints" / "step_0000004.pt") in message  # which file
    assert " free" in message and ("KiB" in message or "MiB" in message or "GiB" in message)  # how much space
    assert "step_0000003.pt" in message and "intact" in message  # nothing is lost
    assert f"carv3d train --resume {run_dir}" in message  # how to go on
    assert _files(run_dir / "checkpoints") == before  # no temporary left, LATEST unchanged
    assert latest_checkpoint(run_dir).name == "step_0000003.pt"


def test_full_disk_while_pointing_latest_removes_the_unreachable_new_checkpoint(tmp_path, monkeypatch):
    run_dir = _run_with_checkpoint(tmp_path)
    real = carv3d_io.atomic_write_text

    def latest_fails(path, text):
        if Path(path).name == LATEST_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr("carv3d.checkpoint.atomic_write_text", latest_fails)
    with pytest.raises(DiskFullError, match="LATEST"):
        save_checkpoint(run_dir, 4, {"w": torch.ones(4)})
    assert _files(run_dir / "checkpoints") == ["LATEST", "step_0000003.pt"]


def test_other_write_errors_are_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    run_dir = _run_with_checkpoint(tmp_path)

    def denied(obj, f, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", denied)
    with pytest.raises(PermissionError):
        save_checkpoint(run_dir, 4, {"w": torch.ones(4)})


def test_first_checkpoint_on_a_full_disk_says_there_was_none_before(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(DiskFullError, match="no checkpoint yet"):
        save_checkpoint(run_dir, 1, {})
    assert _files(run_dir / "checkpoints") == []


def test_full_disk_during_export_names_the_file_and_leaves_no_partial_set(tmp_path, monkeypatch):
    import numpy as np

    from carv3d.export import pipeline
    from carv3d.export.pipeline import ExportedMesh, write_mesh

    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], dtype=np.int64)
    mesh = ExportedMesh(vertices, faces, np.full((4, 4), 200, dtype=np.uint8), threshold=1.0)

    def full(path, *args, **kwargs):
        Path(path).write_bytes(b"ply\n")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "write_ply", full)
    out = tmp_path / "mesh"
    with pytest.raises(DiskFullError) as err:
        write_mesh(mesh, out, ["glb", "ply", "obj"])
    message = str(err.value)
    assert str(out / "mesh.ply") in message and "free" in message and "Nothing was replaced" in message
    assert "carv3d export" in message and "\n" not in message
    assert _files(out) == []  # neither the GLB written before nor the staging folder


# ---------------------------------------------------------------------------------------- items 10 and 12: the run lock
def test_run_lock_removes_stale_checkpoint_temporaries_and_nothing_else(tmp_path):
    run_dir = _run_with_checkpoint(tmp_path)
    ckpt = run_dir / "checkpoints"
    stale = [ckpt / ".step_0000004.tmp-k2j3h4.pt", ckpt / ".LATEST.tmp-a8b9c0", run_dir / ".run.tmp-x1y2.json",
             run_dir / ".metrics.tmp-q7r8s9.jsonl"]  # metrics.jsonl is rewritten on resume
    for path in stale:
        path.write_bytes(b"half")
    kept = [ckpt / "notes.txt", ckpt / ".step_0000004.pt", run_dir / "run.json"]
    for path in kept:
        path.write_text("mine")
    with run_lock(run_dir):
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        assert (run_dir / LOCK_FILE).is_file()
    assert not (run_dir / LOCK_FILE).exists()
    assert remove_stale_temporaries(run_dir) == []


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from carv3d.run_dir import run_lock
        with run_lock(Path({str(run_dir)!r})):
            print("held", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_training_of_one_run_is_refused_until_the_first_dies_even_by_kill_9(tmp_path):
    run_dir = _run_with_checkpoint(tmp_path)
    child = _hold_lock_in_child(run_dir)
    try:
        with pytest.raises(RunLockedError) as err:
            with run_lock(run_dir):
                pytest.fail("two holders of one run lock")
        message = str(err.value)
        assert f"run {run_dir} is already being trained by process {child.pid}" in message
        assert f"carv3d train --resume {run_dir}" in message and err.value.exit_code == 2
        with pytest.raises(RunLockedError):  # also within one process: a second acquisition is refused
            with run_lock(run_dir):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (run_dir / LOCK_FILE).exists()  # kill -9 ran no clean-up, yet the lock is free:
    with run_lock(run_dir):
        pass


def test_run_lock_in_a_read_only_run_directory_is_a_user_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    run_dir = _run_with_checkpoint(tmp_path)
    run_dir.chmod(0o555)
    try:
        with pytest.raises(RunDirError, match="writable run directory"):
            with run_lock(run_dir):
                pass
    finally:
        run_dir.chmod(0o755)


def test_sweep_lock_is_the_same_flock_lock(tmp_path):
    from carv3d.sweep import SweepError
    from carv3d.sweep.state import sweep_lock

    with sweep_lock(tmp_path):
        with pytest.raises(SweepError, match=f"another sweep \\(pid {os.getpid()} "):
            with sweep_lock(tmp_path):
                pass
    # a lock file left by a killed sweep whose pid is now alive (pid reuse) does not block: no flock is held
    (tmp_path / "sweep.lock").write_text('{"pid": 1, "host": "%s"}' % os.uname().nodename)
    with sweep_lock(tmp_path):
        pass


# ---------------------------------------------------------------------------------------- item 13: LATEST
@pytest.mark.parametrize("content", ["../../other/checkpoints/step_0000010.pt", "/abs/checkpoints/step_0000010.pt",
                                     "sub/step_0000010.pt", "step_0000010.pt\n../x", "step_10.pt", "", "LATEST"])
def test_latest_naming_anything_but_its_own_checkpoint_is_refused(tmp_path, content):
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    torch.save({"format_version": 1, "step": 10}, other / "step_0000010.pt")
    run_dir = tmp_path / "a" / "b" / "run"
    (run_dir / "checkpoints" / "sub").mkdir(parents=True)
    torch.save({"format_version": 1, "step": 10}, run_dir / "checkpoints" / "sub" / "step_0000010.pt")
    (run_dir / "checkpoints" / LATEST_FILE).write_text(content)
    with pytest.raises(CheckpointError) as err:
        latest_checkpoint(run_dir)
    assert "step_NNNNNNN.pt" in str(err.value) or "does not exist" in str(err.value)


def test_latest_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    run_dir = _run_with_checkpoint(tmp_path)
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save({"format_version": 1, "step": 9}, elsewhere)
    (run_dir / "checkpoints" / "step_0000009.pt").symlink_to(elsewhere)
    (run_dir / "checkpoints" / LATEST_FILE).write_text("step_0000009.pt\n")
    with pytest.raises(CheckpointError, match="outside this run"):
        latest_checkpoint(run_dir)


def test_valid_latest_and_steps_past_seven_digits(tmp_path):
    run_dir = tmp_path / "run"
    for step in (9_999_999, 10_000_000, 10_000_001, 10_000_002):
        save_checkpoint(run_dir, step, {"w": torch.tensor([float(step)])}, keep=2)
    assert _files(run_dir / "checkpoints") == ["LATEST", "step_10000001.pt", "step_10000002.pt"]
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 10_000_002


# ---------------------------------------------------------------------------------------- item 16: durability
def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "dir" if os.path.isdir(target) else Path(target).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "run", 1, {"w": torch.ones(2)})
    kinds = [(kind, "tmp" if ".tmp-" in name else name) for kind, name in events]
    assert kinds == [("fsync", "tmp"), ("replace", "step_0000001.pt"), ("fsync", "dir"),
                     ("fsync", "tmp"), ("replace", "LATEST"), ("fsync", "dir")]
    events.clear()
    from carv3d.run_dir import write_status

    write_status(tmp_path / "run", status="running", step=1)
    assert [(k, "tmp" if ".tmp-" in n else n) for k, n in events] == [
        ("fsync", "tmp"), ("replace", "run.json"), ("fsync", "dir")]


def test_a_failed_fsync_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")

    def fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        carv3d_io.atomic_write_text(target, "new")
    assert target.read_text() == "old" and _files(tmp_path) == ["run.json"]


# ---------------------------------------------------------------------------------------- item 11: sweeps
def test_an_absurd_sweep_is_refused_at_once_with_the_override_named(tmp_path, monkeypatch):
    from carv3d.sweep import SweepError, load_sweep, run_sweep
    from carv3d.sweep import spec as sweep_spec

    path = tmp_path / "big.yaml"
    path.write_text(f"name: big\noverrides: {{prompt: a red cube}}\ngrid:\n  train.seed: {list(range(100))}\n"
                    f"  optim.lr_grid: {[0.001 * (i + 1) for i in range(100)]}\n")
    monkeypatch.setattr(sweep_spec, "run_config", lambda *a: pytest.fail("configs resolved before the size check"))
    started = time.perf_counter()
    with pytest.raises(SweepError) as err:
        run_sweep(path, dry_run=True)
    assert time.perf_counter() - started < 2.0
    message = str(err.value)
    assert "10,000 runs" in message and "train.seed: 100 × optim.lr_grid: 100" in message
    assert "--max-runs 10000" in message and "limit of 1,000" in message
    spec = load_sweep(path, validate=False, max_runs=None)  # the override lifts the limit
    assert len(spec.runs) == 10_000
    with pytest.raises(SweepError, match="--max-runs must be at least 1"):
        run_sweep(path, dry_run=True, max_runs=0)


def _sweep(tmp_path: Path, prompts: str, extra: str = "") -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(f"name: prompts\noutput_dir: {tmp_path / 'out'}\noverrides:\n  train.steps: 3\n{extra}"
                    f"grid:\n  train.seed: [0, 1]\nzip:\n  prompt: {prompts}\n")
    return path


def test_a_prompt_the_embedded_teacher_does_not_know_fails_the_dry_run_at_its_line(tmp_path):
    from carv3d.sweep import SweepError, run_sweep

    if not (ROOT / "assets" / "embedded_teacher" / "carv3d_vocabulary.json").is_file():
        pytest.skip("the embedded teacher is not built")
    path = _sweep(tmp_path, "\n    - a red cube\n    - a red teapot\n")
    with pytest.raises(SweepError) as err:
        run_sweep(path, dry_run=True)
    message = str(err.value)
    assert message.startswith(f"{path}:10: run '") and "'a red teapot'" in message and "teapot" in message
    assert "Known objects:" in message and not (tmp_path / "out").exists()
    assert len(run_sweep(_sweep(tmp_path, "[a red cube, a blue cone]"), dry_run=True).planned) == 4


def test_a_negative_prompt_is_checked_too_and_open_vocabulary_teachers_take_any_prompt(tmp_path, tiny_sd_path):
    from carv3d.sweep import SweepError, run_sweep

    if (ROOT / "assets" / "embedded_teacher" / "carv3d_vocabulary.json").is_file():
        path = _sweep(tmp_path, "[a red cube]", extra="  teacher.negative_prompt: blurry teapot\n")
        with pytest.raises(SweepError, match=r"prompts\.yaml:5: .*the teacher at .*embedded_teacher .*negative prompt.*blurry"):
            run_sweep(path, dry_run=True)
    path = _sweep(tmp_path, "[a red teapot]", extra=f"  teacher.pretrained: {tiny_sd_path}\n")
    assert len(run_sweep(path, dry_run=True).planned) == 2


def test_a_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format_version": 1, "step": 1, "scene": Exploit()}, tmp_path / "step_0000001.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "step_0000001.pt")
    assert "refuses to load it" in str(err.value) and "weights_only" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage that is no zip", b"PK\x03\x04 truncated zip"])
def test_empty_random_and_truncated_checkpoints_are_a_checkpoint_error(tmp_path, content):
    path = tmp_path / "step_0000001.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="is corrupt or not a carv3d checkpoint") as err:
        load_checkpoint(path)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_a_long_load_error_is_cut_at_a_word_and_marked(tmp_path, monkeypatch):
    reason = "PytorchStreamReader failed reading zip archive: failed finding central directory " * 5

    def failing_load(*args, **kwargs):
        raise RuntimeError(reason)

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "step_0000001.pt")
    quoted = str(err.value).split("(RuntimeError: ", 1)[1].split(" …)", 1)[0]
    assert reason.startswith(quoted) and reason[len(quoted)] == " " and 150 < len(quoted) <= 200


def test_benchmark_json_is_written_whole_or_not_at_all(tmp_path):
    """write_json_report: the folder is made, odd values become strings, and a report that cannot be
    written (NaN with allow_nan=False) leaves the previous complete file and no temporary behind."""
    import json
    from pathlib import Path as _Path

    from carv3d.io import write_json_report

    path = tmp_path / "deep" / "report.json"
    write_json_report(path, {"seconds": 1.5, "where": _Path("/x")}, indent=1)
    assert json.loads(path.read_text()) == {"seconds": 1.5, "where": "/x"}
    with pytest.raises(ValueError):
        write_json_report(path, {"seconds": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text())["seconds"] == 1.5
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
