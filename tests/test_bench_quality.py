"""scripts/bench_quality.py: the pure logic against hand-computed values, and (slow) the CPU preset end to end."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from carv3d.testing.scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "bench_quality.py"


def _load_bench():
    return load_script("bench_quality")


bench = _load_bench()


# ------------------------------------------------------------------------------------ time to reach
def test_time_to_reach_interpolates_between_the_checkpoints_around_the_crossing():
    times, values = [0, 10, 20, 30], [0.5, 0.6, 0.8, 0.9]
    # crosses 0.7 between (10, 0.6) and (20, 0.8): 10 + (0.7 − 0.6)/(0.8 − 0.6)·10 = 15
    assert bench.time_to_reach(times, values, 0.7) == pytest.approx(15.0)
    assert bench.time_to_reach(times, values, 0.8) == pytest.approx(20.0)  # reached exactly at a grid point
    assert bench.time_to_reach(times, values, 0.5) == 0.0  # already there at t = 0
    assert bench.time_to_reach(times, values, 0.95) is None  # never


def test_time_to_reach_counts_from_where_the_curve_stays_above_and_skips_missing_points():
    # rises above, falls back below and rises again: the last crossing counts, 20 + 0.05/0.4·10 = 21.25
    assert bench.time_to_reach([0, 10, 20, 30], [0.5, 0.9, 0.55, 0.95], 0.6) == pytest.approx(21.25)
    # touching the target exactly is not falling below: the crossing is between 0 and 10, 0.1/0.4·10 = 2.5
    assert bench.time_to_reach([0, 10, 20, 30], [0.5, 0.9, 0.6, 0.95], 0.6) == pytest.approx(2.5)
    # the untrained scene already scores the target, training dips below it first: 10 + 0.1/0.3·10 = 13.33
    assert bench.time_to_reach([0, 10, 20], [0.8, 0.6, 0.9], 0.7) == pytest.approx(13.333, abs=1e-3)
    assert bench.time_to_reach([0, 10, 20], [0.8, 0.9, 0.6], 0.7) is None  # ends below: not reached
    # None at t = 10: interpolate between (0, 0.5) and (20, 0.8): 0.15/0.3·20 = 10
    assert bench.time_to_reach([0, 10, 20], [0.5, None, 0.8], 0.65) == pytest.approx(10.0)


# ------------------------------------------------------------------------------------ mean ± std
def test_mean_std_is_the_sample_standard_deviation():
    result = bench.mean_std([1.0, 2.0, 3.0, 4.0])
    assert result["mean"] == pytest.approx(2.5)
    assert result["std"] == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3))  # 1.29099
    assert bench.mean_std([None, 1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2.0)), "n": 2}
    assert bench.mean_std([0.7]) == {"mean": 0.7, "std": None, "n": 1}
    assert bench.mean_std([None]) == {"mean": None, "std": None, "n": 0}


def _run(prompt, seed, method, ious, best=(True, True, True, True), steps_per_checkpoint=100):
    return {"prompt": prompt, "seed": seed, "method": method,
            "evaluations": [{"silhouette_iou": iou, "best_match_is_prompted": ok, "masked_colour_error": 1 - iou,
                             "psnr": 10.0 + 10 * iou, "front_matches_front": None, "chamfer": None,
                             "step": i * steps_per_checkpoint}
                            for i, (iou, ok) in enumerate(zip(ious, best))]}


def test_aggregate_averages_prompts_within_a_seed_then_takes_mean_and_std_over_seeds():
    runs = [_run("a", 0, "sds", [0.5, 0.7]), _run("b", 0, "sds", [0.5, 0.9], best=(True, False)),
            _run("a", 1, "sds", [0.5, 0.6]), _run("b", 1, "sds", [0.5, 0.8])]
    # seed 0: [0.5, (0.7 + 0.9)/2 = 0.8]; seed 1: [0.5, 0.7] → mean [0.5, 0.75], std [0, √(2·0.05²) = 0.070711]
    iou = bench.aggregate(runs, "silhouette_iou", 2)
    assert [p["mean"] for p in iou] == pytest.approx([0.5, 0.75])
    assert [p["std"] for p in iou] == pytest.approx([0.0, 0.0707107], abs=1e-6)
    # booleans become fractions: seed 0 has 1 of 2 prompts right at the end, seed 1 both → mean 0.75
    best = bench.aggregate(runs, "best_match_is_prompted", 2)
    assert [p["mean"] for p in best] == pytest.approx([1.0, 0.75])
    # a metric nobody measured stays missing instead of becoming 0
    assert bench.aggregate(runs, "chamfer", 2)[1] == {"mean": None, "std": None, "n": 0}


# ------------------------------------------------------------------------------------ ahead or not
def test_ahead_at_every_checkpoint_leaves_out_t0_and_needs_every_later_one():
    result = bench.ahead_at_every_checkpoint([0.5, 0.6, 0.8], [0.5, 0.55, 0.7])
    assert result["every_checkpoint"] is True and result["per_checkpoint"] == [True, True]
    assert result["difference"] == pytest.approx([0.05, 0.1])
    behind_once = bench.ahead_at_every_checkpoint([0.5, 0.6, 0.7], [0.5, 0.55, 0.72])
    assert behind_once["every_checkpoint"] is False and behind_once["per_checkpoint"] == [True, False]
    tie = bench.ahead_at_every_checkpoint([0.5, 0.6], [0.5, 0.6])  # equal is not ahead
    assert tie["every_checkpoint"] is False
    # lower is better (colour error): 0.2 < 0.3 is ahead
    assert bench.ahead_at_every_checkpoint([0.4, 0.2], [0.4, 0.3], higher_is_better=False)["every_checkpoint"] is True
    assert bench.ahead_at_every_checkpoint([0.5, None], [0.5, 0.6])["per_checkpoint"] == [False]


def test_summary_of_a_hand_made_report():
    times = bench.checkpoint_times(30.0, 3)
    assert times == [0.0, 10.0, 20.0, 30.0]
    runs = [_run("a", 0, "sds", [0.5, 0.6, 0.7, 0.8]),
            _run("a", 1, "sds", [0.5, 0.6, 0.7, 0.8]),
            _run("a", 0, "carv", [0.5, 0.7, 0.9, 0.9], steps_per_checkpoint=40),
            _run("a", 1, "carv", [0.5, 0.7, 0.7, 0.9], steps_per_checkpoint=60),
            {"prompt": "a", "seed": 2, "method": "carv", "error": "RuntimeError: boom"}]  # left out
    report = {"settings": {"checkpoint_seconds": times, "prompts": ["a"]},
              "runs": {str(i): run for i, run in enumerate(runs)}}
    summary = bench.summarize(report)
    overall = summary["overall"]
    assert overall["runs"] == {"sds": 2, "carv": 2}
    # carv mean [0.5, 0.7, 0.8, 0.9] reaches the sds final 0.8 exactly at t = 20 → 2/3 of the budget
    assert overall["baseline"] == "sds" and overall["baseline_final_mean_iou"] == pytest.approx(0.8)
    carv = overall["versus_baseline"]["carv"]
    assert set(overall["versus_baseline"]) == {"carv"}
    assert carv["seconds_to_baseline_final_iou"] == pytest.approx(20.0)
    assert carv["fraction_of_budget"] == pytest.approx(2 / 3)
    assert carv["meets_target_fraction"] is False
    assert carv["ahead_on_iou"]["every_checkpoint"] is True
    assert carv["ahead_on_colour_error"]["every_checkpoint"] is True  # colour error = 1 − IoU here
    assert carv["ahead_on_psnr"]["every_checkpoint"] is True
    # mean steps: carv 0, 50, 100, 150 (40 and 60 per checkpoint) → 100 at t = 20; sds 300 in the budget
    assert carv["steps_to_baseline_final_iou"] == pytest.approx(100.0)
    assert carv["baseline_steps_in_budget"] == pytest.approx(300.0)
    assert overall["curves"]["carv"]["silhouette_iou"][2]["std"] == pytest.approx(math.sqrt(0.02))  # 0.9, 0.7
    assert summary["per_prompt"]["a"]["versus_baseline"]["carv"]["seconds_to_baseline_final_iou"] == pytest.approx(20.0)
    assert summary["ranking"]["best"] == {"sds": "sds", "carv": "carv"}  # one arm per preset


def test_ranking_picks_each_presets_best_arm_by_final_iou_then_colour_error():
    times = bench.checkpoint_times(20.0, 2)
    arms = {"sds-lr1": ["estimator.preset=sds"], "sds-lr2": ["estimator.preset=sds", "optim.lr_grid=0.02"],
            "carv-lr1": ["optim.lr_grid=0.01"], "carv-lr4": ["estimator.preset=\"carv\"", "optim.lr_grid=0.04"]}
    runs = [_run("a", 0, "sds-lr1", [0.5, 0.6, 0.8]), _run("a", 0, "sds-lr2", [0.5, 0.7, 0.75]),
            _run("a", 0, "carv-lr1", [0.5, 0.8, 0.9]), _run("a", 0, "carv-lr4", [0.5, 0.85, 0.9])]
    runs[3]["evaluations"][-1]["masked_colour_error"] = 0.05  # same final IoU as carv-lr1, lower colour error
    report = {"settings": {"checkpoint_seconds": times, "prompts": ["a"], "arms": arms, "baseline": "sds-lr1"},
              "runs": {str(i): run for i, run in enumerate(runs)}}
    summary = bench.summarize(report)
    ranking = summary["ranking"]
    # the arm without an estimator.preset override is the default preset, carv
    assert [row["arm"] for row in ranking["by_preset"]["sds"]] == ["sds-lr1", "sds-lr2"]
    assert [row["arm"] for row in ranking["by_preset"]["carv"]] == ["carv-lr4", "carv-lr1"]
    assert ranking["best"] == {"sds": "sds-lr1", "carv": "carv-lr4"}
    assert set(summary["overall"]["versus_baseline"]) == {"sds-lr2", "carv-lr1", "carv-lr4"}
    # sds-lr2 ends below the baseline's 0.8: it never reaches it
    assert summary["overall"]["versus_baseline"]["sds-lr2"]["seconds_to_baseline_final_iou"] is None
    assert "best carv arm: carv-lr4" in bench.format_summary({**report, "summary": summary})


def test_interpolate_between_grid_points_and_none_outside():
    assert bench.interpolate([0.0, 10.0, 20.0], [0.0, 100.0, 300.0], 15.0) == pytest.approx(200.0)
    assert bench.interpolate([0.0, 10.0], [0.0, 100.0], 10.0) == pytest.approx(100.0)
    assert bench.interpolate([0.0, 10.0], [0.0, 100.0], 11.0) is None
    assert bench.interpolate([0.0, 10.0], [None, 100.0], 5.0) is None


def test_arms_from_a_sweep_file_are_its_runs_labelled_by_their_axes(tmp_path):
    sweep = tmp_path / "tune.yaml"
    sweep.write_text("name: tune\noverrides:\n  render.samples_per_ray: 32\n"
                     "grid:\n  estimator.preset: [sds, carv]\n  optim.lr_grid: [0.01, 0.02]\n")
    arms = bench.arms_from_sweep(str(sweep))
    assert list(arms) == ["preset_sds-lr_grid_0_01", "preset_sds-lr_grid_0_02", "preset_carv-lr_grid_0_01",
                          "preset_carv-lr_grid_0_02"]
    assert arms["preset_carv-lr_grid_0_02"] == ["render.samples_per_ray=32", 'estimator.preset="carv"',
                                                "optim.lr_grid=0.02"]
    assert bench.arm_group(arms["preset_carv-lr_grid_0_02"], "estimator.preset", "carv") == "carv"
    settings = bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--arms", str(sweep)]))
    assert settings["baseline"] == "preset_sds-lr_grid_0_01"  # no arm is called sds: the first one
    specs = bench.build_specs(settings, [])
    assert len(specs) == 2 * 4  # 2 prompts × 1 seed × 4 arms
    assert specs[0].overrides[-3:] == arms[specs[0].method]
    seeded = tmp_path / "seeded.yaml"
    seeded.write_text("grid:\n  train.seed: [0, 1]\n")
    with pytest.raises(SystemExit, match="sets train.seed"):
        bench.arms_from_sweep(str(seeded))
    bench.check_arms(settings)  # every arm resolves
    typo = tmp_path / "typo.yaml"
    typo.write_text("grid:\n  optim.lr_gird: [0.01]\n")
    with pytest.raises(SystemExit, match="lr_grid"):
        bench.check_arms(bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--arms", str(typo)])))


# ------------------------------------------------------------------------------------ the plan
def test_paired_schedule_puts_each_sds_run_next_to_its_carv_twin_alternating_the_order():
    schedule = bench.paired_schedule(["a red cube", "a blue house"], [0, 1])
    assert schedule == [("a red cube", 0, "sds"), ("a red cube", 0, "carv"),
                        ("a blue house", 0, "carv"), ("a blue house", 0, "sds"),
                        ("a red cube", 1, "sds"), ("a red cube", 1, "carv"),
                        ("a blue house", 1, "carv"), ("a blue house", 1, "sds")]
    three = bench.paired_schedule(["a"], [0, 1], ["x", "y", "z"])
    assert three == [("a", 0, "x"), ("a", 0, "y"), ("a", 0, "z"), ("a", 1, "z"), ("a", 1, "y"), ("a", 1, "x")]


def test_resume_reuses_finished_runs_only_with_the_same_settings(tmp_path):
    args = bench.parse_args(["--preset", "cpu", "--budget", "5", "--checkpoints", "1"])
    settings = bench.resolve_settings(args)
    path = tmp_path / "old.json"
    ok, failed = _run("a red cube", 0, "sds", [0.5, 0.6]), {"prompt": "a red cube", "seed": 0, "method": "carv", "error": "x"}
    path.write_text(json.dumps({"settings": settings, "runs": {"ok": ok, "failed": failed}}))
    assert bench.reusable_runs(path, settings) == {"ok": ok}  # a failed run is run again
    specs = bench.build_specs(settings, ["a red cube | seed 0 | sds"])
    assert [spec.key for spec in specs] == ["a red cube | seed 0 | carv", "a blue house | seed 0 | carv",
                                            "a blue house | seed 0 | sds"]
    other = bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--budget", "6", "--checkpoints", "1"]))
    with pytest.raises(SystemExit, match="other settings"):
        bench.reusable_runs(path, other)


# ------------------------------------------------------------------------------------ config file per scene type
NERF_CPU = str(REPO_ROOT / "configs" / "demo_cpu.yaml")
GAUSSIANS_CPU = str(REPO_ROOT / "configs" / "gaussians_demo_cpu.yaml")


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mixed_arms(tmp_path):
    """An arms file of a NeRF arm, two Gaussian arms (one with a Gaussian-only key) and one that sets no scene type."""
    arms = tmp_path / "mixed.yaml"
    arms.write_text("zip:\n  estimator.preset: [carv, carv, sds, sds]\n  scene:\n    - {type: nerf}\n"
                    "    - {type: gaussians}\n    - {type: gaussians, density: {grad_threshold: 0.4}}\n"
                    "    - {mlp_width: 16}\n")
    return str(arms)


def test_scene_type_of_reads_the_overrides_as_the_config_loader_does():
    assert bench.scene_type_of([], "nerf") == "nerf"
    assert bench.scene_type_of(['scene.type="gaussians"'], "nerf") == "gaussians"
    assert bench.scene_type_of(["scene.type=gaussians", "scene.type=nerf"], "x") == "nerf"  # the last one wins
    assert bench.scene_type_of(["scene={type: gaussians, n_points: 500}"], "nerf") == "gaussians"
    assert bench.scene_type_of(["scene.type=gaussians", "scene.n_points=500"], "nerf") == "gaussians"
    assert bench.scene_type_of(["estimator.preset=sds"], "nerf") == "nerf"


def test_arm_config_files_picks_the_presets_file_of_each_arms_scene_type():
    configs = bench.PRESETS["cpu"].configs
    arms = {"nerf": ["scene.type=nerf"], "splats": ['scene.type="gaussians"'], "plain": ["estimator.preset=sds"]}
    assert bench.arm_config_files(arms, [], None, configs) == {
        "nerf": {"scene_type": "nerf", "file": NERF_CPU}, "splats": {"scene_type": "gaussians", "file": GAUSSIANS_CPU},
        "plain": {"scene_type": "nerf", "file": NERF_CPU}}
    # a common --set scene.type applies to every arm that does not set its own
    picked = bench.arm_config_files(arms, ["scene.type=gaussians"], None, configs)
    assert {arm: entry["file"] for arm, entry in picked.items()} == {"nerf": NERF_CPU, "splats": GAUSSIANS_CPU,
                                                                     "plain": GAUSSIANS_CPU}
    # --config: that file for every arm, whatever its scene type
    assert bench.arm_config_files(arms, [], "my.yaml", configs) == dict.fromkeys(
        arms, {"scene_type": None, "file": "my.yaml"})
    defaults = bench.arm_config_files(arms, [], None, {"nerf": None, "gaussians": None})
    assert {arm: entry["file"] for arm, entry in defaults.items()} == dict.fromkeys(arms)
    with pytest.raises(SystemExit, match=r"arm splats: scene.type=gaussians has no config file in the preset"):
        bench.arm_config_files(arms, [], None, {"nerf": NERF_CPU})


def test_cpu_preset_gives_nerf_and_gaussian_arms_their_own_config_files(tmp_path):
    settings = bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--arms", _mixed_arms(tmp_path)]))
    files = {arm: entry["file"] for arm, entry in settings["arm_config_files"].items()}
    nerf, splats, splats_sds, plain = list(settings["arms"])
    assert files == {nerf: NERF_CPU, splats: GAUSSIANS_CPU, splats_sds: GAUSSIANS_CPU, plain: NERF_CPU}
    assert {arm: entry["sha256"] for arm, entry in settings["arm_config_files"].items()} == {
        nerf: _sha256(NERF_CPU), splats: _sha256(GAUSSIANS_CPU), splats_sds: _sha256(GAUSSIANS_CPU),
        plain: _sha256(NERF_CPU)}
    assert _sha256(NERF_CPU) != _sha256(GAUSSIANS_CPU)
    assert settings["config_file"] is None
    assert settings["scene_config_files"] == {"nerf": NERF_CPU, "gaussians": GAUSSIANS_CPU}
    assert "gaussians: " + GAUSSIANS_CPU in bench.protocol_text({**settings, "device": "cpu"})
    # each run trains with its arm's file
    assert {spec.method: spec.config for spec in bench.build_specs(settings, [])} == files
    bench.check_arms(settings)  # every arm validates with its own file (scene.grid only reaches the NeRF arms)
    # h200: the config defaults for both scene types
    h200 = bench.resolve_settings(bench.parse_args(["--arms", _mixed_arms(tmp_path)]))
    assert {arm: (entry["file"], entry["sha256"]) for arm, entry in h200["arm_config_files"].items()} == dict.fromkeys(
        h200["arms"], (None, None))
    bench.check_arms(h200)


def test_an_explicit_config_is_every_arms_file_instead_of_the_presets(tmp_path):
    arms = _mixed_arms(tmp_path)
    settings = bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--arms", arms, "--config", NERF_CPU]))
    assert settings["config_file"] == NERF_CPU and settings["scene_config_files"] is None
    assert settings["arm_config_files"] == {arm: {"scene_type": None, "file": NERF_CPU, "sha256": _sha256(NERF_CPU)}
                                            for arm in settings["arms"]}
    assert {spec.config for spec in bench.build_specs(settings, [])} == {NERF_CPU}
    # the NeRF file's scene.grid with a Gaussian arm: the config's own message, as before the mapping
    with pytest.raises(SystemExit, match=r"arm preset_carv-scene_type_gaussians: unknown config key 'scene.grid'"):
        bench.check_arms(settings)
    gaussians = bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--arms", arms, "--config", GAUSSIANS_CPU]))
    assert {entry["file"] for entry in gaussians["arm_config_files"].values()} == {GAUSSIANS_CPU}


def test_a_preset_file_of_another_scene_type_is_refused(monkeypatch):
    # a preset that lists the Gaussians' file under nerf: the default arms would train Gaussians
    wrong = bench.Preset(prompts=("a red cube",), seeds=1, budget=1.0, checkpoints=1, parallel=1,
                         configs={"nerf": GAUSSIANS_CPU, "gaussians": GAUSSIANS_CPU})
    monkeypatch.setitem(bench.PRESETS, "cpu", wrong)
    settings = bench.resolve_settings(bench.parse_args(["--preset", "cpu"]))
    with pytest.raises(SystemExit, match=r"arm sds: trains scene.type=gaussians with .*gaussians_demo_cpu.yaml, "
                                         r"the preset's file for scene.type=nerf"):
        bench.check_arms(settings)


def test_resume_refuses_a_changed_config_file_of_one_arm(tmp_path, monkeypatch):
    nerf, gaussians = tmp_path / "nerf.yaml", tmp_path / "gaussians.yaml"
    nerf.write_text(Path(NERF_CPU).read_text())
    gaussians.write_text(Path(GAUSSIANS_CPU).read_text())
    preset = bench.Preset(prompts=("a red cube",), seeds=1, budget=5.0, checkpoints=1, parallel=2,
                          configs={"nerf": str(nerf), "gaussians": str(gaussians)})
    monkeypatch.setitem(bench.PRESETS, "cpu", preset)
    argv = ["--preset", "cpu", "--arms", str(REPO_ROOT / "configs" / "arms" / "gaussians_world.yaml")]
    settings = bench.resolve_settings(bench.parse_args(argv))
    path = tmp_path / "old.json"
    ok = _run("a red cube", 0, "preset_carv-scene_type_nerf", [0.5, 0.6])
    path.write_text(json.dumps({"settings": settings, "runs": {"ok": ok}}))
    assert bench.reusable_runs(path, bench.resolve_settings(bench.parse_args(argv))) == {"ok": ok}
    gaussians.write_text(gaussians.read_text() + "# edited\n")  # only the Gaussian arms' file changes
    changed = bench.resolve_settings(bench.parse_args(argv))
    assert changed["arm_config_files"]["preset_carv-scene_type_nerf"]["sha256"] == _sha256(nerf)
    assert changed["arm_config_files"]["preset_carv-scene_opacity_reset_every_700"]["sha256"] == _sha256(gaussians)
    assert _sha256(gaussians) != settings["arm_config_files"]["preset_carv-scene_opacity_reset_every_700"]["sha256"]
    with pytest.raises(SystemExit, match=r"other settings \(arm_config_sha256 .*" + _sha256(gaussians)):
        bench.reusable_runs(path, changed)


def test_resume_reads_a_report_from_before_per_arm_config_files(tmp_path):
    settings = bench.resolve_settings(bench.parse_args(["--preset", "cpu", "--budget", "5", "--checkpoints", "1"]))
    old_settings = {key: value for key, value in settings.items() if key not in ("scene_config_files", "arm_config_files")}
    old_settings.update(config_file=NERF_CPU, config_file_sha256=_sha256(NERF_CPU))  # one file for every arm
    path = tmp_path / "old.json"
    ok = _run("a red cube", 0, "sds", [0.5, 0.6])
    path.write_text(json.dumps({"settings": old_settings, "runs": {"ok": ok}}))
    assert bench.arm_config_hashes(old_settings) == {"sds": _sha256(NERF_CPU), "carv": _sha256(NERF_CPU)}
    assert bench.reusable_runs(path, settings) == {"ok": ok}
    path.write_text(json.dumps({"settings": {**old_settings, "config_file_sha256": "0" * 64}, "runs": {"ok": ok}}))
    with pytest.raises(SystemExit, match="other settings"):
        bench.reusable_runs(path, settings)

# ------------------------------------------------------------------------------------ end to end (slow)
@pytest.mark.slow
def test_cpu_preset_end_to_end_writes_the_json_and_plot_and_resumes(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(SCRIPT), "--preset", "cpu", "--prompt", "a blue house", "--budget", "3",
               "--checkpoints", "2", "--eval-views", "12", "--eval-resolution", "16", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[2/2]" in done.stdout and "ETA" in done.stdout
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert {"command", "settings", "protocol", "runs", "summary", "sessions"} <= set(report)
    assert report["settings"]["checkpoint_seconds"] == [0.0, 1.5, 3.0]
    assert set(report["runs"]) == {"a blue house | seed 0 | sds", "a blue house | seed 0 | carv"}
    for run in report["runs"].values():
        assert run["steps"] >= 1 and run["train_seconds"] >= 3.0
        assert [e["t_nominal"] for e in run["evaluations"]] == [0.0, 1.5, 3.0]
        first, last = run["evaluations"][0], run["evaluations"][-1]
        assert first["step"] == 0 and first["t_train"] == 0.0 and last["t_train"] >= 3.0
        for key in ("silhouette_iou", "masked_colour_error", "psnr", "best_match", "best_match_is_prompted",
                    "front_matches_front", "noise_draws", "eval_seconds"):
            assert key in last
        assert 0.0 <= last["silhouette_iou"] <= 1.0 and isinstance(last["front_matches_front"], bool)
    # same seed, same initial scene: both methods start from the same quality
    sds, carv = (report["runs"][f"a blue house | seed 0 | {m}"]["evaluations"][0] for m in ("sds", "carv"))
    assert sds["silhouette_iou"] == carv["silhouette_iou"]
    assert report["runs"]["a blue house | seed 0 | sds"]["evaluations"][-1]["noise_draws"] == 1
    overall = report["summary"]["overall"]
    assert overall["runs"] == {"sds": 1, "carv": 1}
    assert {"baseline_final_mean_iou", "versus_baseline", "curves", "mean_steps"} <= set(overall)
    assert {"seconds_to_baseline_final_iou", "fraction_of_budget", "steps_to_baseline_final_iou",
            "ahead_on_iou"} <= set(overall["versus_baseline"]["carv"])
    assert set(report["summary"]["per_prompt"]) == {"a blue house"}
    again = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 runs to do (2 reused)" in again.stdout
    assert json.loads(out.read_text())["runs"] == report["runs"]


def test_the_shipped_arms_files_resolve():
    for path in sorted((REPO_ROOT / "configs" / "arms").glob("*.yaml")):
        for preset in ("h200", "cpu"):  # the cpu preset: each arm with its scene type's demo config
            settings = bench.resolve_settings(bench.parse_args(["--preset", preset, "--arms", str(path)]))
            bench.check_arms(settings)  # every arm's config resolves
            assert len(settings["arms"]) >= 2, path
    tune = bench.arms_from_sweep(str(REPO_ROOT / "configs" / "arms" / "tune_world.yaml"))
    assert len(tune) == 20 and {bench.arm_group(o, "estimator.preset", "carv") for o in tune.values()} == {"sds", "carv"}


def test_a_subset_of_prompts_is_summarised_on_its_own():
    times = bench.checkpoint_times(20.0, 2)
    # prompt a: carv ahead; prompt b: carv behind. Over both, sds ends at 0.75 and carv at 0.75.
    runs = [_run("a", 0, "sds", [0.5, 0.6, 0.7]), _run("a", 0, "carv", [0.5, 0.8, 0.9]),
            _run("b", 0, "sds", [0.5, 0.7, 0.8]), _run("b", 0, "carv", [0.5, 0.55, 0.6])]
    subsets = bench.parse_subsets(["held_out=a", "both=a, b"], ["a", "b"])
    assert subsets == {"held_out": ["a"], "both": ["a", "b"]}
    report = {"settings": {"checkpoint_seconds": times, "prompts": ["a", "b"], "subsets": subsets},
              "runs": {str(i): run for i, run in enumerate(runs)}}
    summary = bench.summarize(report)
    held_out = summary["subsets"]["held_out"]
    assert held_out["runs"] == {"sds": 1, "carv": 1}
    assert held_out["baseline_final_mean_iou"] == pytest.approx(0.7)
    # carv on a crosses 0.7 between (0, 0.5) and (10, 0.8): 0.2/0.3·10 = 6.67 s
    assert held_out["versus_baseline"]["carv"]["seconds_to_baseline_final_iou"] == pytest.approx(6.667, abs=1e-3)
    assert summary["subsets"]["both"]["versus_baseline"] == summary["overall"]["versus_baseline"]
    assert "[held_out] carv" in bench.format_summary({"settings": report["settings"], "summary": summary})
    with pytest.raises(SystemExit, match="not among the prompts"):
        bench.parse_subsets(["x=c"], ["a", "b"])
    with pytest.raises(SystemExit, match="NAME=PROMPT"):
        bench.parse_subsets(["just-a-name"], ["a", "b"])


def test_a_report_cut_short_is_also_compared_on_the_pairs_every_arm_finished():
    times = bench.checkpoint_times(10.0, 1)
    # sds finished a/0 and b/0; carv only a/0 (b/0 was killed). Overall, sds averages a and b while carv
    # has a alone; matched, both have a alone.
    runs = [_run("a", 0, "sds", [0.5, 0.6]), _run("b", 0, "sds", [0.5, 1.0]), _run("a", 0, "carv", [0.5, 0.7]),
            {"prompt": "b", "seed": 0, "method": "carv", "error": "killed"}]
    report = {"settings": {"checkpoint_seconds": times, "prompts": ["a", "b"]},
              "runs": {str(i): run for i, run in enumerate(runs)}}
    summary = bench.summarize(report)
    assert summary["overall"]["curves"]["sds"]["silhouette_iou"][1]["mean"] == pytest.approx(0.8)
    matched = summary["matched"]
    assert matched["pairs"] == [["a", 0]] and matched["pairs_left_out"] == [["b", 0]]
    assert matched["runs"] == {"sds": 1, "carv": 1}
    assert matched["curves"]["sds"]["silhouette_iou"][1]["mean"] == pytest.approx(0.6)
    assert matched["versus_baseline"]["carv"]["ahead_on_iou"]["every_checkpoint"] is True  # 0.7 > 0.6
    text = bench.format_summary({"settings": report["settings"], "summary": summary})
    assert "matched: the 1 (prompt, seed) pairs every arm finished (1 left out)" in text
    # a complete report has no matched section
    del report["runs"]["3"], report["runs"]["1"]
    assert "matched" not in bench.summarize(report)


def test_column_labels_drop_the_prefix_long_arm_names_share():
    assert bench.column_labels(["sds", "carv"]) == {"sds": "sds", "carv": "carv"}
    long = ["preset_carv-scene_type_gaussians_grad_thre-96ce683f", "preset_carv-scene_type_gaussians_n_points-4342fc23"]
    assert bench.column_labels(long) == {long[0]: "…grad_thre-96ce683f", long[1]: "…n_points-4342fc23"}


def test_bad_evaluation_options_stop_the_bench_before_any_run():
    with pytest.raises(SystemExit, match="--eval-views / --eval-resolution: --views 4"):
        bench.resolve_settings(bench.parse_args(["--eval-views", "4"]))
    with pytest.raises(SystemExit, match="--resolution 8"):
        bench.resolve_settings(bench.parse_args(["--eval-resolution", "8"]))


def test_a_summary_with_no_finished_run_still_prints():
    times = bench.checkpoint_times(20.0, 2)
    report = {"settings": {"checkpoint_seconds": times, "prompts": ["a"], "subsets": {"one": ["a"]}},
              "runs": {"0": {"prompt": "a", "seed": 0, "method": "sds", "error": "boom"},
                       "1": {"prompt": "a", "seed": 0, "method": "carv", "error": "boom"}}}
    report["summary"] = bench.summarize(report)
    text = bench.format_summary(report)
    assert "[one] carv: reaches sds's final IoU (none: no finished run) at never" in text


def test_the_eta_follows_the_waves_of_runs_side_by_side():
    """6 runs of 100 s, 3 side by side: two waves, done at 200 s. The ETA at each finish is the
    schedule's remaining time, where elapsed / done × remaining read 500 s at the first one."""
    now = {"t": 0.0}
    progress = bench.Progress(6, 3, clock=lambda: now["t"])
    etas = []
    for t in (100.0, 100.0, 100.0, 200.0, 200.0, 200.0):
        now["t"] = t
        etas.append(progress.finished())
    assert etas == [100.0, 100.0, 100.0, 0.0, 0.0, 0.0]
    # uneven durations: the next queued run goes to the slot that frees first
    now["t"] = 0.0
    progress = bench.Progress(4, 2, clock=lambda: now["t"])
    now["t"] = 60.0
    assert progress.finished(duration=60.0) == pytest.approx(60.0)  # running: 0 → 60, 60 → 120; queued: 1 → from 60
    now["t"] = 100.0
    assert progress.finished(duration=100.0) == pytest.approx(80.0)  # mean 80: running end at 140 and 180


def test_legend_labels_name_what_sets_each_arm_apart():
    """The plot's legend: an arm's overrides less those every arm shares, keys without their first
    part; arms alike once shortened get their names back; a report without arm settings, the names."""
    curves = {"nerf-1": {}, "gauss-2": {}, "gauss-3": {}}
    report = {"summary": {"overall": {"curves": curves}}, "settings": {"arms": {
        "nerf-1": ['estimator.preset="carv"', 'scene.type="nerf"'],
        "gauss-2": ['estimator.preset="carv"', 'scene.type="gaussians"'],
        "gauss-3": ['estimator.preset="carv"', 'scene.type="gaussians"', "scene.lr.opacity=0.1"]}}}
    assert bench.legend_labels(report) == {"nerf-1": "type=nerf", "gauss-2": "type=gaussians",
                                        "gauss-3": "type=gaussians, lr.opacity=0.1"}
    wrapped = bench.legend_labels(report, width=16)["gauss-3"]
    assert wrapped == "type=gaussians,\nlr.opacity=0.1"
    report["settings"]["arms"]["gauss-2"] = ['estimator.preset="carv"', 'scene.type="nerf"']  # alike
    alike = bench.legend_labels(report)
    assert alike["nerf-1"] == "nerf-1\ntype=nerf" and alike["gauss-2"] == "gauss-2\ntype=nerf"
    assert bench.legend_labels({"summary": {"overall": {"curves": {"sds": {}, "carv": {}}}}, "settings": {}}) == \
        {"sds": "sds", "carv": "carv"}
