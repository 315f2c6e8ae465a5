"""`carv3d doctor`: each check gives the answer of the function a run asks, and each failure a run
would meet is reported (one line, what to do, exit code 1) before any run starts; nothing is created.

The checks are pinned to ``train.device=cpu`` (or to a CUDA device object, which resolving fast
paths and backends needs no GPU for), so the expectations hold on any machine."""

from __future__ import annotations

import json
import logging
import os
import types

import pytest
import torch

from carv3d import doctor
from carv3d.cli import main
from carv3d.config import load_config
from carv3d.devices import load_extension
from carv3d.doctor import FAIL, NOTE, OK, run_checks
from carv3d.io import unwritable_reason

CPU = "train.device=cpu"
CUDA = torch.device("cuda")  # resolving backends and fast paths for CUDA needs no GPU


def checks_for(*overrides, prompt=None, **kwargs):
    return {c.name: c for c in run_checks(load_config(overrides=[CPU, *overrides], prompt=prompt), build=False,
                                          **kwargs)}


def failed(checks):
    return [c.name for c in checks.values() if c.status == FAIL]


def test_the_default_config_on_a_cpu_reports_the_runs_own_choices():
    from carv3d.render.renderer import choose_sampler
    from carv3d.scene.hashgrid import choose_grid_backend
    from carv3d.sizing import size_for_device
    from carv3d.teacher.loading import resolve_teacher_path

    cfg = load_config(overrides=[CPU], prompt="a red cube")
    checks = {c.name: c for c in run_checks(cfg, build=False)}
    cpu = torch.device("cpu")
    backend, reason = choose_grid_backend("auto", cpu)
    assert checks["hash grid"].detail == f"{backend} ({reason})"
    sized = load_config(overrides=[CPU])
    size_for_device(sized, cpu)
    sampler, reason = choose_sampler(sized.render, cpu)
    assert checks["ray sampler"].detail == f"{sampler} ({reason})" and sampler == "stratified"
    assert checks["teacher weights"].detail.endswith(str(resolve_teacher_path("embedded")))
    assert checks["prompt"].status == OK and checks["sizes"].status == NOTE
    assert failed(checks) == [] and "nerfacc build" not in checks  # a CPU samples without nerfacc
    assert cfg.render.width == load_config(overrides=[CPU]).render.width  # the caller's config is not sized


@pytest.mark.parametrize("overrides, prompt, name, words", [
    (["render.sampler=occupancy_grid"], None, "ray sampler", "render.sampler=stratified"),
    (["scene.grid.backend=tcnn"], None, "hash grid", "needs a CUDA device"),
    (["scene.type=gaussians", "scene.rasterizer=gsplat"], None, "rasterizer", "scene.rasterizer=torch"),
    (["teacher.pretrained=/no/such/teacher"], None, "teacher weights", "does not exist"),
    ([], "a flibbertigibbet", "prompt", "flibbertigibbet"),
    (["train.run_name=../x"], None, "run name", "plain directory name"),
])
def test_what_a_run_would_stop_on_fails_with_what_to_do(overrides, prompt, name, words):
    checks = checks_for(*overrides, prompt=prompt)
    assert checks[name].status == FAIL and words in checks[name].detail
    assert failed(checks) == [name]


def test_a_device_that_cannot_be_used_fails_and_the_checks_that_need_no_device_still_run():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    checks = {c.name: c for c in run_checks(load_config(overrides=["train.device=cuda"]), build=False)}
    assert failed(checks) == ["device"] and "train.device=cpu" in checks["device"].detail
    assert {"teacher weights", "output folder", "prompt"} <= set(checks) and "hash grid" not in checks


def test_an_incomplete_teacher_folder_and_an_existing_run_directory_fail(tmp_path):
    (tmp_path / "teacher" / "unet").mkdir(parents=True)
    checks = checks_for(f"teacher.pretrained={tmp_path / 'teacher'}")
    assert failed(checks) == ["teacher weights"] and "missing" in checks["teacher weights"].detail
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    checks = checks_for(f"train.output_dir={tmp_path / 'runs'}", "train.run_name=mine")
    assert failed(checks) == ["run name"] and "--resume" in checks["run name"].detail
    assert checks_for(f"train.output_dir={tmp_path / 'runs'}", "train.run_name=other")["run name"].status == OK


def test_an_output_folder_under_a_file_fails_and_a_new_one_in_a_writable_folder_passes(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = checks_for(f"train.output_dir={blocker}/runs")
    assert bad["output folder"].status == FAIL and "is a file" in bad["output folder"].detail
    assert checks_for(f"train.output_dir={tmp_path}/new/runs")["output folder"].status == OK
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # the checks created nothing


def test_unwritable_reason_tests_the_nearest_existing_folder_and_leaves_nothing(tmp_path):
    assert unwritable_reason(tmp_path / "x" / "y") is None
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    assert "is a file" in unwritable_reason(tmp_path / "f" / "y")


def test_a_failed_or_disabled_cuda_build_fails_with_its_error_and_a_good_one_is_timed():
    def broken(module):
        raise RuntimeError("Ninja is required to load C++ extensions")

    crashed = doctor._extension_check("nerfacc build", "nerfacc.cuda._backend", True, broken)
    assert crashed.status == FAIL and "Ninja is required" in crashed.detail and "CUDA toolkit" in crashed.detail
    # nerfacc without nvcc: the import succeeds, prints a message and leaves _C = None
    disabled = doctor._extension_check("nerfacc build", "nerfacc.cuda._backend", True,
                                       lambda module: types.SimpleNamespace(_C=None))
    assert disabled.status == FAIL and "_C is None" in disabled.detail
    assert load_extension("m", lambda module: types.SimpleNamespace(_C=object()))[1] is None
    loaded = []
    good = doctor._extension_check("gsplat build", "gsplat.cuda._backend", True, loaded.append)
    assert good.status == OK and loaded == ["gsplat.cuda._backend"] and "built or loaded in" in good.detail
    assert doctor._extension_check("gsplat build", "x", False, broken).status == NOTE  # --no-build imports nothing


def test_fast_paths_are_resolved_as_the_run_resolves_them_and_create_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = tmp_path / "cache"
    long_run = load_config(overrides=["teacher.compile=auto", f"teacher.compile_cache={cache}", "train.steps=10000"])
    checks = {c.name: c for c in doctor._fast_path_checks(long_run, CUDA)}
    assert "compile=auto" in checks["teacher fast paths"].detail and checks["compile cache"].detail == str(cache)
    short_run = load_config(overrides=["teacher.compile=auto", f"teacher.compile_cache={cache}", "train.steps=500"])
    checks = {c.name: c for c in doctor._fast_path_checks(short_run, CUDA)}
    assert "compile" not in checks["teacher fast paths"].detail and "compile cache" not in checks  # eager: too short
    (tmp_path / "f").write_text("")
    blocked = load_config(overrides=["teacher.compile=full", f"teacher.compile_cache={tmp_path / 'f' / 'c'}"])
    checks = {c.name: c for c in doctor._fast_path_checks(blocked, CUDA)}
    assert checks["compile cache"].status == FAIL and "is a file" in checks["compile cache"].detail
    assert sorted(os.listdir(tmp_path)) == ["f"] and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_compile_cache_check_follows_the_environment_as_the_run_does(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "from_env"))
    assert doctor.compile_cache_check("auto").detail == str(tmp_path / "from_env")  # the user's variable wins
    assert doctor.compile_cache_check("").detail == str(tmp_path / "from_env")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert doctor.compile_cache_check("").status == NOTE
    assert doctor.compile_cache_check(str(tmp_path / "c")).detail == str(tmp_path / "c")


def test_a_missing_video_encoder_is_a_note(monkeypatch):
    real = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    assert checks_for()["turntable video"].status == NOTE
    assert "skips turntable.mp4" in checks_for()["turntable video"].detail
    assert "turntable video" not in checks_for("train.turntable_frames=0")


def test_the_command_prints_the_checks_writes_the_same_json_and_exits_by_them(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--no-build", "--prompt", "a red cube", "--out", str(out), CPU]) == 0
    # the report silences the run's INFO lines while it runs, and leaves the level the CLI set
    assert logging.getLogger("carv3d").level == logging.INFO
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for check in report["checks"]:
        assert f"{check['status']:<4}  {check['name']}" in printed
    assert "checks passed" in printed
    before = out.read_text()
    assert main(["doctor", "--no-build", "--out", str(out), CPU]) == 2  # an existing report is not replaced
    assert "already exists" in capsys.readouterr().err and out.read_text() == before
    assert main(["doctor", "--no-build", "teacher.pretrained=/no/such/teacher", CPU]) == 1
    assert "1 of" in capsys.readouterr().out
