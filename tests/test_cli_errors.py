"""Bad input: one clear message, exit code 2, no traceback, nothing half-written or overwritten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carv3d.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_user_error(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    assert err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def _tiny(tiny_sd_path, out_dir):
    return [f"teacher.pretrained={tiny_sd_path}", f"train.output_dir={out_dir}", "train.steps=0",
            "train.progress=false", "train.tensorboard=false", "scene.grid.n_levels=2",
            "scene.grid.log2_hashmap_size=10", "render.width=8", "render.height=8", "render.samples_per_ray=4",
            "export.resolution=16", "export.threshold=2.0", "train.turntable_frames=2", "train.val_resolution=8"]


def test_empty_prompt(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--prompt", "   ", f"train.output_dir={tmp_path}")
    assert_user_error(code, err, "prompt is empty")
    assert not any(tmp_path.iterdir()), "nothing may be written for an empty prompt"
    assert err.strip().count("\n") == 0, f"the error alone, not the machine's sizing lines before it: {err!r}"


def test_resume_of_a_path_that_is_no_run_says_so_before_anything_else(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path / "no_such_run"))
    assert_user_error(code, err, "no_such_run", "does not exist")
    assert "continues in place" not in err  # the note about replacing a run's files is for a run


def test_unknown_key_and_wrong_type(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--prompt", "a cube", "render.widht=3")
    assert_user_error(code, err, "render.widht", "render.width")
    code, err = run_cli(capsys, "train", "--prompt", "a cube", "train.steps=many")
    assert_user_error(code, err, "train.steps", "int")


def test_missing_teacher_weights(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--prompt", "a cube", f"teacher.pretrained={tmp_path / 'nowhere'}",
                        f"train.output_dir={tmp_path / 'runs'}")
    assert_user_error(code, err, "nowhere")


def test_missing_hub_weights_says_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, err = run_cli(capsys, "train", "--prompt", "a cube", "teacher.pretrained=someone/not-cached",
                        f"train.output_dir={tmp_path / 'runs'}")
    assert_user_error(code, err, "someone/not-cached", str(tmp_path / "hub"))


def test_resume_not_a_run(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path))
    assert_user_error(code, err, "not a carv3d run")
    code, err = run_cli(capsys, "train", "--resume", str(tmp_path / "missing"))
    assert_user_error(code, err, "does not exist")


def test_unwritable_output_dir(capsys, tmp_path, tiny_sd_path):
    if os.geteuid() == 0:  # root ignores permission bits; use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        out_dir = blocker / "runs"
    else:
        out_dir = tmp_path / "ro"
        out_dir.mkdir()
        out_dir.chmod(0o500)
    code, err = run_cli(capsys, "train", "--prompt", "a cube", *_tiny(tiny_sd_path, out_dir))
    assert_user_error(code, err, "cannot create the run directory", "train.output_dir")


def test_existing_run_is_never_overwritten_and_checkpoints_are_checked(capsys, tmp_path, tiny_sd_path):
    args = ["train", "--prompt", "a cube", *_tiny(tiny_sd_path, tmp_path), "train.run_name=mine"]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    run_dir = tmp_path / "mine"
    config_before = (run_dir / "config.yaml").read_text()
    mesh_before = (run_dir / "mesh" / "mesh.glb").read_bytes()

    code, err = run_cli(capsys, *args)
    assert_user_error(code, err, "already exists", "--resume")
    assert (run_dir / "config.yaml").read_text() == config_before
    assert (run_dir / "mesh" / "mesh.glb").read_bytes() == mesh_before

    # A truncated checkpoint is a clear error, not an unpickling traceback.
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    code, err = run_cli(capsys, "train", "--resume", str(run_dir))
    assert_user_error(code, err, "corrupt", checkpoint.name)
    code, err = run_cli(capsys, "export", str(run_dir), "--overwrite")
    assert_user_error(code, err, "corrupt")

    # A missing checkpoint too.
    (run_dir / "checkpoints" / "LATEST").unlink()
    code, err = run_cli(capsys, "train", "--resume", str(run_dir))
    assert_user_error(code, err, "no checkpoint")


def test_checkpoint_cannot_run_code(tmp_path):
    """A pickle that would execute code on load is refused (weights_only=True)."""
    import torch

    from carv3d.checkpoint import load_checkpoint
    from carv3d.errors import CheckpointError

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "step_0000001.pt"
    torch.save({"format_version": 1, "step": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "carv3d.cli", "train", "--prompt", "x", "estimator.noise_draw=2"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "estimator.noise_draws" in proc.stderr


def test_export_bad_input(capsys, tmp_path, tiny_sd_path):
    """Not a run, unknown format, texture size not a power of two, existing output: clear errors, nothing replaced."""
    code, err = run_cli(capsys, "export", str(tmp_path))
    assert_user_error(code, err, "not a carv3d run")
    code, err = run_cli(capsys, "train", "--prompt", "a cube", *_tiny(tiny_sd_path, tmp_path), "train.run_name=r")
    assert code == 0, err
    run_dir = tmp_path / "r"
    glb_before = (run_dir / "mesh" / "mesh.glb").read_bytes()
    code, err = run_cli(capsys, "export", str(run_dir), "--format", "fbx", "--out", str(tmp_path / "o1"))
    assert_user_error(code, err, "fbx")
    code, err = run_cli(capsys, "export", str(run_dir), "--texture-size", "300", "--out", str(tmp_path / "o2"))
    assert_user_error(code, err, "power of two")
    code, err = run_cli(capsys, "export", str(run_dir))
    assert_user_error(code, err, "--overwrite")
    assert (run_dir / "mesh" / "mesh.glb").read_bytes() == glb_before
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # With --out elsewhere it works and the files load back.
    code, err = run_cli(capsys, "export", str(run_dir), "--format", "ply", "--resolution", "16", "--out", str(tmp_path / "o3"))
    assert code == 0, err
    import trimesh

    assert len(trimesh.load(tmp_path / "o3" / "mesh.ply", process=False).faces) > 0
    # A threshold above every density: "the mesh is empty", and the (empty) folders made for it were left behind.
    code, err = run_cli(capsys, "export", str(run_dir), "--format", "ply", "--resolution", "16", "--threshold", "1e9",
                        "--out", str(tmp_path / "o4" / "deep"))
    assert_user_error(code, err, "the mesh is empty")
    assert not (tmp_path / "o4").exists()


def test_render_checks_its_output_before_loading_the_scene(capsys, tmp_path, tiny_sd_path, monkeypatch):
    """`carv3d render` used to render the whole turntable, then fail with a traceback on a bad --out."""
    import carv3d.saved_scene

    code, err = run_cli(capsys, "train", "--prompt", "a cube", *_tiny(tiny_sd_path, tmp_path), "train.run_name=r",
                        "export.at_end=false")
    assert code == 0, err

    def no_loading(*args, **kwargs):
        raise AssertionError("the scene was loaded before the output was checked")

    monkeypatch.setattr(carv3d.saved_scene, "load_scene", no_loading)
    (tmp_path / "afile").write_text("")
    before = sorted(tmp_path.rglob("*"))
    code, err = run_cli(capsys, "render", str(tmp_path / "r"), "--out", str(tmp_path / "afile" / "t.mp4"))
    assert_user_error(code, err, "cannot write", "afile", "--out")
    code, err = run_cli(capsys, "render", str(tmp_path / "r"))  # the run's own turntable.mp4 exists
    assert_user_error(code, err, "already exists", "--overwrite")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("options, fragments", [
    (["--frames", "0"], ["--frames 0", "1 to 10000"]),  # was ZeroDivisionError
    (["--frames", "-3"], ["--frames -3"]),  # was "upper bound and lower bound inconsistent"
    (["--resolution", "0"], ["--resolution 0", "1 to 4096"]),  # was IndexError
    (["--fps", "0"], ["--fps 0", "1 to 240"]),  # wrote a video of 0 frames per second
    (["--fps", "-1"], ["--fps -1"]),  # was ffmpeg's stderr and a traceback
    (["--out", "turntable.gif"], ["not an .mp4 file"]),  # was "`FFMPEG` can not handle the given uri"
    (["--out", "turntable"], ["not an .mp4 file"]),
])
def test_render_options_out_of_range_are_one_line_errors(capsys, tmp_path, monkeypatch, options, fragments):
    """`carv3d render` with a frame count, size or rate it cannot use (or a non-MP4 --out) loaded the scene,
    then ended in a traceback from the renderer or the video encoder."""
    import carv3d.saved_scene

    def no_loading(*args, **kwargs):
        raise AssertionError("the scene was loaded before the options were checked")

    monkeypatch.setattr(carv3d.saved_scene, "load_scene", no_loading)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, "render", str(tmp_path / "some_run"), *options)
    assert_user_error(code, err, *fragments)
    assert sorted(tmp_path.rglob("*")) == []


def _wait_until_torch_loads(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Return once the child has mapped libtorch, i.e. while ``import torch`` runs in it.

    torch is first imported by the parser's commands inside :func:`carv3d.cli.main`, whose handler
    turns Ctrl-C into exit 130; before that (the interpreter's start and ``import carv3d.cli``, ~0.1 s)
    a SIGINT is Python's own KeyboardInterrupt with a traceback. A fixed sleep of 0.5 s raced that
    window: a start-up slowed five-fold by a loaded machine would have failed the test."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        assert time.monotonic() < deadline, f"torch not loaded after {timeout:g} s"
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:  # ended between the poll and the read: the next poll says how
            pass
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the child's memory map (Linux /proc)")
@pytest.mark.parametrize("after_torch_loads", [0.0, 1.0], ids=["while-torch-loads", "a-second-later"])
def test_ctrl_c_while_starting_up_exits_130_without_a_traceback(tmp_path, after_torch_loads):
    """Ctrl-C in the first seconds (torch still importing) printed a traceback and died by SIGINT."""
    command = [sys.executable, "-m", "carv3d.cli", "train", "--prompt", "a red cube",
               f"train.output_dir={tmp_path}", "train.steps=2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_until_torch_loads(proc)
        time.sleep(after_torch_loads)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out and out.strip().splitlines()[-1].endswith("interrupted")
