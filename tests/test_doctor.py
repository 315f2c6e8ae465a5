"""`carv3d doctor`: each check gives the answer of the function a run asks, and each failure a run
would meet is reported (one line, what to do, exit code 1) before any run starts."""

from __future__ import annotations

import json
import os

import pytest
import torch

from carv3d import doctor
from carv3d.cli import main
from carv3d.config import load_config
from carv3d.doctor import FAIL, NOTE, OK, run_checks
from carv3d.io import unwritable_reason


def by_name(checks):
    return {check.name: check for check in checks}


def test_the_default_config_on_this_cpu_reports_the_runs_own_choices():
    from carv3d.render.renderer import select_sampler
    from carv3d.scene.hashgrid import choose_grid_backend
    from carv3d.teacher.loading import resolve_teacher_path

    checks = by_name(run_checks(load_config(), build=False))
    cpu = torch.device("cpu")
    backend, reason = choose_grid_backend("auto", cpu)
    assert checks["hash grid"].detail == f"{backend} ({reason})"
    sized = load_config()
    from carv3d.sizing import size_for_device

    size_for_device(sized, cpu)
    assert checks["ray sampler"].detail == select_sampler(sized.render, cpu) == "stratified"
    assert checks["teacher weights"].detail.endswith(str(resolve_teacher_path("embedded")))
    assert checks["sizes"].status == NOTE and "cpu-sized" in checks["sizes"].detail
    assert all(check.status != FAIL for check in checks.values())
    assert "nerfacc build" not in checks  # the CPU samples without nerfacc


@pytest.mark.parametrize("override, name, words", [
    ("train.device=cuda", "device", "use train.device=cpu"),
    ("render.sampler=occupancy_grid", "ray sampler", "render.sampler=stratified"),
    ("teacher.pretrained=/no/such/teacher", "teacher weights", "does not exist"),
])
def test_what_a_run_would_stop_on_fails_with_what_to_do(override, name, words):
    if override == "train.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    checks = by_name(run_checks(load_config(overrides=[override]), build=False))
    assert checks[name].status == FAIL and words in checks[name].detail
    assert [c.name for c in checks.values() if c.status == FAIL] == [name]


def test_an_output_folder_under_a_file_fails_and_a_new_one_in_a_writable_folder_passes(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = by_name(run_checks(load_config(overrides=[f"train.output_dir={blocker}/runs"]), build=False))
    assert bad["output folder"].status == FAIL and "is a file" in bad["output folder"].detail
    good = by_name(run_checks(load_config(overrides=[f"train.output_dir={tmp_path}/new/runs"]), build=False))
    assert good["output folder"].status == OK
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # the check created nothing


def test_unwritable_reason_tests_the_nearest_existing_folder_and_leaves_nothing(tmp_path):
    assert unwritable_reason(tmp_path / "x" / "y") is None
    assert os.listdir(tmp_path) == []
    (tmp_path / "f").write_text("")
    assert "is a file" in unwritable_reason(tmp_path / "f" / "y")
    assert "cannot create files" in unwritable_reason("/proc/carv3d-doctor-test")


def test_a_failed_cuda_build_is_a_failure_with_its_error_and_a_good_one_is_timed():
    def broken(module):
        raise RuntimeError("Ninja is required to load C++ extensions")

    failed = doctor._extension_check("nerfacc build", "nerfacc.cuda._backend", True, broken)
    assert failed.status == FAIL and "Ninja is required" in failed.detail and "CUDA toolkit" in failed.detail
    loaded = []
    good = doctor._extension_check("gsplat build", "gsplat.cuda._backend", True, loaded.append)
    assert good.status == OK and loaded == ["gsplat.cuda._backend"] and "built or loaded in" in good.detail
    skipped = doctor._extension_check("gsplat build", "gsplat.cuda._backend", False, broken)
    assert skipped.status == NOTE  # --no-build imports nothing


def test_an_unwritable_compile_cache_fails(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "f").write_text("")
    assert doctor._compile_cache_check(str(tmp_path / "f" / "cache")).status == FAIL
    assert doctor._compile_cache_check(str(tmp_path / "cache")).status == OK
    assert doctor._compile_cache_check("").status == NOTE


def test_a_missing_video_encoder_is_a_note(monkeypatch):
    real = doctor.importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec",
                        lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    checks = by_name(run_checks(load_config(), build=False))
    assert checks["turntable video"].status == NOTE and "skips turntable.mp4" in checks["turntable video"].detail
    no_video = by_name(run_checks(load_config(overrides=["train.turntable_frames=0"]), build=False))
    assert "turntable video" not in no_video


def test_the_command_prints_the_checks_writes_the_same_json_and_exits_by_them(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--no-build", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    for check in report["checks"]:
        assert f"{check['status']:<4}  {check['name']}" in printed
    assert "checks passed" in printed
    before = out.read_text()
    assert main(["doctor", "--no-build", "--out", str(out)]) == 2  # an existing report is not replaced
    assert "already exists" in capsys.readouterr().err and out.read_text() == before
    assert main(["doctor", "--no-build", "teacher.pretrained=/no/such/teacher"]) == 1
    assert "1 of" in capsys.readouterr().out
