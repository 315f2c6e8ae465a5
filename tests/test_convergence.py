"""train.stop_when_converged: the rule by hand, the probes, and the loop (bit-identical before the stop, exact resume)."""

from __future__ import annotations

import json

import pytest
import torch

from carv3d.checkpoint import latest_checkpoint, load_checkpoint
from carv3d.config import load_config
from carv3d.convergence import (PROBE_VIEWS, ConvergenceDetector, ConvergenceRule, ProbeImages, first_stop,
                                probe_cameras, probe_change, render_probes)
from carv3d.errors import ConfigError
from carv3d.train import read_metrics, resume, train
from test_train_e2e import tiny_overrides
from carv3d.testing.scripts import load_script


# ------------------------------------------------------------------------------------ the rule by hand
STEPS = [100, 200, 300, 400, 500, 600, 700, 800]
CHANGES = [None, 0.5, 0.005, 0.02, 0.001, 0.002, 0.003, 0.0]
# still count:  0    0    1      0     1      2      3      4


def test_rule_fires_at_the_check_where_patience_is_reached():
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=3, min_steps=0) == 700
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=1, min_steps=0) == 300
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=4, min_steps=0) == 800
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=5, min_steps=0) is None
    # A larger tolerance keeps step 400's 0.02 still: 300..800 is one run of six still checks.
    assert first_stop(STEPS, CHANGES, tolerance=0.03, patience=3, min_steps=0) == 500


def test_rule_never_stops_before_min_steps():
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=1, min_steps=301) == 500
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=3, min_steps=750) == 800
    assert first_stop(STEPS, CHANGES, tolerance=0.01, patience=3, min_steps=801) is None


def test_a_change_equal_to_the_tolerance_is_not_still_and_no_signal_resets():
    rule = ConvergenceRule(tolerance=0.01, patience=2, min_steps=0)
    assert not rule.update(1, 0.009) and rule.still == 1
    assert not rule.update(2, 0.01) and rule.still == 0
    assert not rule.update(3, 0.0) and rule.still == 1
    assert not rule.update(4, None) and rule.still == 0


def test_probe_change_by_hand():
    opacity_a = torch.tensor([1.0, 0.5, 0.0, 0.0]).reshape(1, 1, 2, 2)
    opacity_b = torch.tensor([1.0, 0.0, 0.5, 0.0]).reshape(1, 1, 2, 2)
    colour_a = torch.zeros(1, 3, 2, 2)
    colour_b = colour_a.clone()
    colour_b[0, 0, 0, 0] = 0.6  # one channel of one pixel
    change = probe_change(ProbeImages(opacity_a, colour_a), ProbeImages(opacity_b, colour_b))
    # Σ|ΔA| = 1.0, Σ max = 1 + 0.5 + 0.5 = 2  →  d = 0.5;  c = 0.6 / (3 · 2) = 0.1
    assert change["shape"] == pytest.approx(0.5) and change["colour"] == pytest.approx(0.1)
    assert change["change"] == pytest.approx(0.5)
    empty = ProbeImages(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 2, 2))
    assert probe_change(empty, empty)["change"] == 0.0


def test_probe_cameras_are_fixed():
    a, b = probe_cameras(1.55, 50.0), probe_cameras(1.55, 50.0)
    assert torch.equal(a.c2w, b.c2w) and len(a) == PROBE_VIEWS
    assert a.azimuth.tolist() == pytest.approx([0, 45, 90, 135, 180, -135, -90, -45])
    assert a.elevation.tolist() == [15.0, 45.0] * (PROBE_VIEWS // 2)
    assert torch.allclose(a.positions.norm(dim=-1), torch.full((PROBE_VIEWS,), 1.55))


def test_probes_draw_no_randomness_and_restore_the_mode(tiny_sd_path, tmp_path):
    from carv3d.scene import build_scene

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path), prompt="a red cube")
    scene = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
    scene.train()
    rng = torch.get_rng_state()
    cameras = probe_cameras(1.55, 50.0)
    first, second = render_probes(scene, cameras), render_probes(scene, cameras)
    assert torch.equal(torch.get_rng_state(), rng) and scene.training
    assert torch.equal(first.opacity, second.opacity) and torch.equal(first.colour, second.colour)
    assert first.opacity.shape == (PROBE_VIEWS, 1, 32, 32) and float(first.opacity.max()) > 0


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override", ["train.converge_tolerance=0", "train.converge_tolerance=1.5",
                                      "train.converge_patience=0", "train.converge_check_every=0",
                                      "train.converge_min_steps=-1", "train.converge_tolerance=nan"])
def test_bad_values_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_a_mistyped_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"train\.stop_when_converged"):
        load_config(overrides=["train.stop_when_convergd=true"])


# ---------------------------------------------------------------------------------------- the loop
# tolerance 1: every compared check is still (a change is at most 1), so with checks every 2 steps and
# patience 2 the first check (step 2) has nothing to compare, steps 4 and 6 are still: the stop is step 6.
STOPS = {"train.stop_when_converged": True, "train.converge_check_every": 2, "train.converge_tolerance": 1.0,
         "train.converge_patience": 2, "train.converge_min_steps": 0}
QUICK = {"train.turntable_frames": 0, "export.at_end": False, "train.val_every": 0}


def _cfg(tiny_sd_path, tmp_path, name, steps, **extra):
    return load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=steps,
                                                **{"train.run_name": name, **QUICK, **extra}), prompt="a red cube")


def test_the_run_stops_where_the_rule_says_and_equals_a_run_without_it(tiny_sd_path, tmp_path, caplog):
    with caplog.at_level("INFO", logger="carv3d"):
        stopped = train(_cfg(tiny_sd_path, tmp_path, "stopped", 10, **STOPS))
    plain = train(_cfg(tiny_sd_path, tmp_path, "plain", 6))
    state, plain_state = load_checkpoint(latest_checkpoint(stopped)), load_checkpoint(latest_checkpoint(plain))
    assert state["step"] == plain_state["step"] == 6
    for key, value in plain_state["scene"].items():  # the probes changed nothing in the training
        assert torch.equal(state["scene"][key], value), key
    assert torch.equal(state["host_generator"], plain_state["host_generator"])

    status = json.loads((stopped / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 6 and status["steps"] == 10
    assert status["convergence"]["converged_at"] == 6 and status["convergence"]["checks"] == 3
    rows = read_metrics(stopped)
    assert rows[-1]["step"] == 6 and rows[-1]["converged"] == 1.0 and "sds_gradient_norm" in rows[-1]
    assert [r["step"] for r in rows if "convergence_still_checks" in r] == [2, 4, 6]
    assert (stopped / "validation" / "step_0000006.png").is_file()  # the end-of-run outputs follow the stop
    assert any("converged at step 6 of 10" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_stops_at_the_same_step(tiny_sd_path, tmp_path):
    full = train(_cfg(tiny_sd_path, tmp_path, "full", 10, **STOPS))
    half = train(_cfg(tiny_sd_path, tmp_path, "half", 4, **STOPS))  # ends at 4 with one still check counted
    resume(half, ["train.steps=10"])
    a, b = load_checkpoint(latest_checkpoint(full)), load_checkpoint(latest_checkpoint(half))
    assert a["step"] == b["step"] == 6  # without the saved probe images the resumed run would stop at 8
    for key, value in a["scene"].items():
        assert torch.equal(b["scene"][key], value), key
    assert torch.equal(a["convergence"]["previous_opacity"], b["convergence"]["previous_opacity"])
    assert a["convergence"]["last_change"] == b["convergence"]["last_change"]
    assert json.loads((half / "run.json").read_text())["convergence"]["converged_at"] == 6


def test_a_converged_run_resumed_with_more_steps_trains_on(tiny_sd_path, tmp_path):
    run = train(_cfg(tiny_sd_path, tmp_path, "again", 10, **STOPS))
    resume(run, ["train.steps=12"])
    # The count starts again at the resume: checks at 8 and 10 are still, so it stops at 10.
    assert load_checkpoint(latest_checkpoint(run))["step"] == 10


def test_detector_state_round_trips_through_a_checkpoint(tiny_sd_path, tmp_path):
    from carv3d.scene import build_scene

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, **STOPS), prompt="a red cube")
    scene = build_scene(cfg.scene, cfg.render, torch.device("cpu"), 0)
    detector = ConvergenceDetector.from_config(cfg, torch.device("cpu"))
    detector.check(scene, 2)
    detector.check(scene, 4)
    path = tmp_path / "state.pt"
    torch.save(detector.state_dict(), path)
    again = ConvergenceDetector.from_config(cfg, torch.device("cpu"))
    again.load_state_dict(torch.load(path, weights_only=True))
    assert again.rule.still == detector.rule.still == 1 and again.checks == 2
    assert again.last_change == detector.last_change == 0.0  # the scene did not change
    assert torch.equal(again.previous.opacity, detector.previous.opacity)


# ------------------------------------------------------------------------- the benchmark's bookkeeping
def _bench():
    return load_script("bench_convergence")


def _run(ious, changes, steps=800):
    checks = [{"step": s, "t_train": s / 10.0, "probe_seconds": s / 1000.0, "change": c, "shape": c, "iou": i}
              for s, c, i in zip(STEPS, changes, ious)]
    return {"prompt": "a red cube", "seed": 0, "steps": steps, "checks": checks}


def test_bench_counts_a_stop_below_the_final_iou_minus_the_margin_as_false():
    bench = _bench()
    late_gain = _run([0.5, 0.6, 0.7, 0.8, 0.85, 0.86, 0.87, 0.90], CHANGES)  # stops at 700 with 0.87 < 0.90 − 0.02
    flat = _run([0.5, 0.6, 0.7, 0.8, 0.85, 0.86, 0.89, 0.90], CHANGES)       # 0.89: within the margin
    a = bench.replay(late_gain, 0.01, 3, 0, margin=0.02)
    b = bench.replay(flat, 0.01, 3, 0, margin=0.02)
    assert a["stop_step"] == b["stop_step"] == 700 and a["false_stop"] and not b["false_stop"]
    assert a["steps_saved"] == 100 and a["seconds_saved"] == pytest.approx(80.0 - 70.0 - 0.7)
    never = bench.replay(flat, 0.01, 5, 0, margin=0.02)
    assert never["stop_step"] is None and not never["false_stop"] and never["steps_saved"] == 0
    summary = bench.summarise([late_gain, flat], 0.01, 3, 0, margin=0.02)
    assert summary["false_stop_rate"] == 0.5 and summary["stopped"] == 2
    assert summary["steps_saved_fraction"] == pytest.approx(200 / 1600)


def test_sync_free_steps_stop_at_the_same_step(tiny_sd_path, tmp_path):
    """Sync-free steps learn of a skipped step only by reading the guard: the check does, and stops alike."""
    run = train(_cfg(tiny_sd_path, tmp_path, "sync_free", 10, **STOPS, **{"train.sync_free": "on"}))
    assert json.loads((run / "run.json").read_text())["convergence"]["converged_at"] == 6


def test_a_skipped_step_is_not_checked(tiny_sd_path, tmp_path):
    """A non-finite step changed nothing: its check is skipped (it would read as still)."""
    from carv3d.run_dir import create_run_dir
    from carv3d.train import Trainer

    cfg = _cfg(tiny_sd_path, tmp_path, "skipped", 10, **STOPS)
    trainer = Trainer(cfg)
    trainer.run_dir = create_run_dir(cfg)
    clean_predict, calls = trainer.teacher.predict_noise, {"n": 0}

    def predict_noise(*args, **kwargs):  # step 4 (the 4th call, R = 2 renders in one call) is NaN
        calls["n"] += 1
        out = clean_predict(*args, **kwargs)
        return out * float("nan") if calls["n"] == 4 else out

    trainer.teacher.predict_noise = predict_noise
    trainer.run()
    rows = read_metrics(trainer.run_dir)
    assert [r["step"] for r in rows if "convergence_still_checks" in r] == [2, 6, 8]
    assert json.loads((trainer.run_dir / "run.json").read_text())["convergence"]["converged_at"] == 8
