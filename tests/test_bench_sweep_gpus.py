"""scripts/bench_sweep_gpus.py: nvidia-smi parsing and the occupancy rules on synthetic traces, and the
whole script on a CPU against a stand-in nvidia-smi (the two-run tiny sweep, ~20 s)."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from carv3d.testing.scripts import load_script

bench = load_script("bench_sweep_gpus")


def test_nvidia_smi_rows_parse_and_unavailable_fields_are_none():
    gpus = bench.parse_gpus("0, GPU-aaa, 97, 30512\n1, GPU-bbb, [N/A], 12\n\n")
    assert gpus == [{"index": 0, "uuid": "GPU-aaa", "utilization": 97.0, "memory_mib": 30512.0},
                    {"index": 1, "uuid": "GPU-bbb", "utilization": None, "memory_mib": 12.0}]
    assert bench.parse_apps("4242, GPU-aaa, 3000\nNo running processes found\n") == [
        {"pid": 4242, "uuid": "GPU-aaa", "memory_mib": 3000.0}]


def _trace(*held):
    """One sample a second; each argument lists the GPU uuid of every process at that sample."""
    return [{"t": float(t), "apps": [{"pid": 100 + i, "uuid": u} for i, u in enumerate(uuids)]} for t, uuids in enumerate(held)]


def test_occupancy_counts_processes_per_gpu_and_busy_time_up_to_the_tail():
    # two GPUs: a idle once between runs, b busy throughout; a holds its last process at t = 5, b at t = 6
    trace = _trace([], ["a", "b"], ["a", "b"], ["b"], ["a", "b"], ["a", "b"], ["b"], [])
    out = bench.occupancy(trace, ["a", "b"])
    assert out["first_busy_s"] == 1.0 and out["tail_s"] == 5.0
    assert out["per_gpu"]["a"]["busy_fraction_before_tail"] == pytest.approx(4 / 5)  # samples t = 1..5
    assert out["per_gpu"]["b"]["busy_fraction_before_tail"] == pytest.approx(1.0)
    assert out["every_gpu_busy_before_tail"] == pytest.approx(0.8) and out["one_run_per_gpu"] is True
    doubled = bench.occupancy(_trace(["a", "a"], ["b"]), ["a", "b"])  # two runs on one GPU at once
    assert doubled["one_run_per_gpu"] is False and doubled["per_gpu"]["a"]["max_processes"] == 2


def test_occupancy_of_a_gpu_that_never_ran_anything_has_no_tail():
    out = bench.occupancy(_trace(["a"], ["a"]), ["a", "b"])
    assert out["tail_s"] is None and out["every_gpu_busy_before_tail"] is None
    assert out["per_gpu"]["b"]["max_processes"] == 0


def test_the_sweep_copy_writes_into_the_work_folder_and_keeps_its_base(tmp_path):
    text = "name: s\nbase: ../demo_cpu.yaml\noutput_dir: runs/sweeps\ngrid:\n  train.seed: [0, 1]\n"
    out = bench._with_output_dir(text, tmp_path / "sweeps", Path("/repo/configs/sweeps"))
    import yaml

    data = yaml.safe_load(out)
    assert data["output_dir"] == str(tmp_path / "sweeps") and data["base"] == "/repo/configs/demo_cpu.yaml"
    assert data["grid"] == {"train.seed": [0, 1]}


def test_the_script_end_to_end_on_a_cpu_with_a_stand_in_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"  # one GPU that never holds a process (the runs train on the CPU)
    smi.write_text("#!/bin/sh\ncase \"$1\" in --query-gpu*) echo '0, GPU-fake, 0, 1';; *) echo 'No running processes found';; esac\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    first = tmp_path / "one.json"
    assert bench.main(["--sweep", str(Path(bench.__file__).parents[1] / "configs" / "sweeps" / "tiny.yaml"),
                       "--gpus", "0", "--nvidia-smi", str(smi), "--sample-s", "0.5",
                       "--workdir", str(tmp_path / "w1"), "--out", str(first)]) == 0
    report = json.loads(first.read_text())
    assert report["exit_code"] == 0 and report["statuses"] == {"finished": 2} and report["n_gpus"] == 1
    assert report["gpus"][0]["uuid"] == "GPU-fake" and len(report["trace"]) >= 2
    assert report["occupancy"]["per_gpu"]["GPU-fake"]["max_processes"] == 0


def test_gpu_load_is_the_mean_and_peak_of_each_gpus_samples():
    trace = [{"t": 0.0, "gpus": [{"uuid": "A", "utilization": 0.0, "memory_mib": 4.0},
                                 {"uuid": "B", "utilization": 50.0, "memory_mib": 100.0}], "apps": []},
             {"t": 1.0, "gpus": [{"uuid": "A", "utilization": 30.0, "memory_mib": 900.0},
                                 {"uuid": "B", "utilization": None, "memory_mib": None}], "apps": []},
             {"t": 2.0, "error": "timeout", "gpus": [], "apps": []}]
    load = bench.gpu_load(trace, ["A", "B", "C"])
    assert load["A"] == {"samples": 2, "utilization_mean": 15.0, "utilization_max": 30.0, "memory_mib_max": 900.0}
    assert load["B"] == {"samples": 2, "utilization_mean": 50.0, "utilization_max": 50.0, "memory_mib_max": 100.0}
    assert load["C"] == {"samples": 0, "utilization_mean": None, "utilization_max": None, "memory_mib_max": None}
