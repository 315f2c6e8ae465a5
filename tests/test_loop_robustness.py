"""The training loop under faults: a failing output, signals, non-finite parameters, a second resume.

Each test names the defect it guards against (issue "Robustness found by attack").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from carv3d.checkpoint import latest_checkpoint, load_checkpoint
from carv3d.config import load_config
from carv3d.errors import RunDirError, TrainingDivergedError, UserError
from carv3d.train import Trainer, resume, train

from test_train_e2e import tiny_overrides


def _cfg(tiny_sd_path, tmp_path, name, steps=4, **extra):
    return load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=steps,
                                                **{"train.run_name": name, **extra}), prompt="a red cube")


def _status(run_dir) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_a_failing_turntable_costs_neither_the_mesh_nor_the_run(tiny_sd_path, tmp_path, monkeypatch):
    """A GPU machine without an ffmpeg plugin: the turntable writer raised, the run crashed before
    the mesh export and run.json stayed `running`."""
    import carv3d.outputs as outputs

    def no_ffmpeg(*args, **kwargs):
        raise RuntimeError("imageio: no ffmpeg backend")

    monkeypatch.setattr(outputs, "write_video", no_ffmpeg)
    run_dir = train(_cfg(tiny_sd_path, tmp_path, "noffmpeg"))
    status = _status(run_dir)
    assert status["status"] == "finished" and status["outputs_failed"] == ["turntable"]
    assert (run_dir / "mesh" / "mesh.glb").is_file() and not (run_dir / "turntable.mp4").exists()


def test_run_json_tells_the_step_of_every_checkpoint(tiny_sd_path, tmp_path, monkeypatch):
    """run.json said `running, step 0` for the whole run (written at start and end only)."""
    seen = []
    original = Trainer.save

    def save_and_read(self):
        path = original(self)
        seen.append((_status(self.run_dir)["step"], _status(self.run_dir)["checkpoint"], path.name))
        return path

    monkeypatch.setattr(Trainer, "save", save_and_read)
    train(_cfg(tiny_sd_path, tmp_path, "status", steps=4))
    assert [(s, c) for s, c, _ in seen] == [(2, "step_0000002.pt"), (4, "step_0000004.pt"), (4, "step_0000004.pt")]
    assert all(c == n for _, c, n in seen)


def test_non_finite_parameters_are_never_checkpointed(tiny_sd_path, tmp_path):
    """optim.lr_grid=nan ended `finished` with a NaN checkpoint as LATEST."""
    trainer = Trainer(_cfg(tiny_sd_path, tmp_path, "nanparams", steps=4))
    from carv3d.run_dir import create_run_dir

    trainer.run_dir = create_run_dir(trainer.cfg)
    clean = trainer.train_step

    def poisoning_step():  # a finite loss, then parameters driven to NaN by the update itself
        metrics = clean()
        if trainer.step == 3:
            with torch.no_grad():
                next(trainer.scene.parameters()).fill_(float("nan"))
        return metrics

    trainer.train_step = poisoning_step
    with pytest.raises(TrainingDivergedError, match="not finite at step 4.*step_0000002.pt, is intact"):
        trainer.run()
    state = load_checkpoint(latest_checkpoint(trainer.run_dir))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["scene"].values())
    assert _status(trainer.run_dir)["status"] == "diverged"


def test_the_divergence_message_does_not_claim_a_checkpoint_that_does_not_exist(tiny_sd_path, tmp_path):
    trainer = Trainer(_cfg(tiny_sd_path, tmp_path, "nockpt", **{"train.max_nonfinite_steps": 1}))
    with pytest.raises(TrainingDivergedError, match="No checkpoint had been written yet"):
        trainer.guard._in_a_row = 1
        trainer.check_divergence()


def test_a_second_resume_of_the_same_run_is_refused(tiny_sd_path, tmp_path):
    """Two `--resume` at once both exited 0 and metrics.jsonl held steps 65-100 twice."""
    from carv3d.run_dir import run_lock

    run_dir = train(_cfg(tiny_sd_path, tmp_path, "locked", steps=2))
    rows_before = (run_dir / "metrics.jsonl").read_text()
    with run_lock(run_dir):  # another process (here: this one) is training it
        holder = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from carv3d.train import resume
            from carv3d.errors import UserError
            try:
                resume({str(run_dir)!r}, ["train.steps=4"])
            except UserError as err:
                print("REFUSED", err)
            """)], capture_output=True, text=True, timeout=300)
    assert "REFUSED" in holder.stdout, holder.stdout + holder.stderr
    assert (run_dir / "metrics.jsonl").read_text() == rows_before
    assert resume(run_dir, ["train.steps=4"]) == run_dir  # free again once the holder is gone


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_checkpoint_and_resume(tiny_sd_path, tmp_path, sig):
    """SIGTERM (schedulers, `docker stop`) lost every step since the last checkpoint."""
    cfg = _cfg(tiny_sd_path, tmp_path, f"sig{int(sig)}", steps=6, **{"train.checkpoint_every": 100})
    trainer = Trainer(cfg)
    from carv3d.run_dir import create_run_dir

    trainer.run_dir = create_run_dir(cfg)
    clean = trainer.train_step

    def signalling_step():
        metrics = clean()
        if trainer.step == 3:
            os.kill(os.getpid(), sig)
        return metrics

    trainer.train_step = signalling_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert load_checkpoint(latest_checkpoint(trainer.run_dir))["step"] == 3
    assert _status(trainer.run_dir)["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or sig != signal.SIGTERM
    assert resume(trainer.run_dir) == trainer.run_dir
    assert load_checkpoint(latest_checkpoint(trainer.run_dir))["step"] == 6


def test_an_existing_run_is_never_overwritten(tiny_sd_path, tmp_path):
    train(_cfg(tiny_sd_path, tmp_path, "once", steps=1))
    with pytest.raises(RunDirError):
        train(_cfg(tiny_sd_path, tmp_path, "once", steps=1))
    assert issubclass(RunDirError, UserError)


def test_a_full_disk_stops_the_run_truthfully_and_it_resumes(tiny_sd_path, tmp_path, monkeypatch):
    """A full disk while checkpointing: a one-line DiskFullError, run.json says `stopped` at the last
    checkpoint (it used to keep saying `running`), and the run resumes once there is space."""
    import errno

    import carv3d.checkpoint as checkpoint
    from carv3d.errors import DiskFullError

    real_save = torch.save
    calls = {"n": 0}

    def filling_disk(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the step-4 checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", filling_disk)
    cfg = _cfg(tiny_sd_path, tmp_path, "fulldisk", steps=6)
    with pytest.raises(DiskFullError, match="step_0000004.pt"):
        train(cfg)
    run_dir = tmp_path / "fulldisk"
    status = _status(run_dir)
    assert status["status"] == "stopped" and status["checkpoint"] == "step_0000002.pt" and "disk" in status["error"]
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 2
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert resume(run_dir) == run_dir and _status(run_dir)["status"] == "finished"


def test_a_resumed_run_logs_each_step_once(tiny_sd_path, tmp_path):
    """kill -9 after step 90's row but before its checkpoint (at step 50), then --resume: metrics.jsonl
    held steps 60-90 twice (the killed run's and the continued run's), and TensorBoard drew both."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(_cfg(tiny_sd_path, tmp_path, "killed", **{"train.tensorboard": True, "export.at_end": False,
                                                               "train.turntable_frames": 0}))
    # As a kill leaves it: the rows of steps 3-4 written, the newest checkpoint at step 2, a line cut short.
    (run_dir / "checkpoints" / "step_0000004.pt").unlink()
    (run_dir / "checkpoints" / "LATEST").write_text("step_0000002.pt\n")
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "sds_gradi')
    assert resume(run_dir, ["train.steps=4"]) == run_dir
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("sds_gradient_norm")] == [1, 2, 3, 4]
