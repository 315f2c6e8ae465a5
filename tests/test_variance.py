"""`carv3d variance`: the statistics against direct computations, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch

from carv3d.cli import main
from carv3d.variance import (FEW_DRAWS, FrozenScene, GradientStats, WindowMeans, format_table, mark_few_draws,
                             variance_split, with_and_without_carv)


def test_gradient_stats_match_torch():
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(40, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8)
    stats = GradientStats()
    for i, row in enumerate(draws):
        stats.update(row, seconds=float(i))
    assert torch.allclose(stats.mean, draws.mean(0))
    assert torch.allclose(stats.variance, draws.var(0, unbiased=True))
    assert stats.trace == pytest.approx(float(draws.var(0).sum()))
    assert stats.cost == 20.0  # median of seconds 1..39 (the first draw is warm-up)


def test_variance_split_recovers_two_level_model():
    """Var(R=1, K) = σ_b² + σ_w²/K exactly → the least-squares fit returns both."""
    sigma_b2, sigma_w2 = 2.0, 12.0
    rows = [{"method": "uniform", "upstream_samples": 1, "noise_draws": k, "variance": sigma_b2 + sigma_w2 / k}
            for k in (1, 2, 4, 8, 16)]
    split = variance_split(rows)
    assert split["sigma_b2"] == pytest.approx(sigma_b2)
    assert split["sigma_w2"] == pytest.approx(sigma_w2)
    assert split["ecm_bound_from_reuse"] == pytest.approx(1 + sigma_w2 / sigma_b2)


def test_variance_split_uses_every_upstream_count():
    """Var(R, K) = σ_b²/R + σ_w²/(R·K): (2, 1) and (1, 16) alone determine both (other methods'
    rows are ignored); rows with K = 1 only cannot separate them (1/R = 1/(R·K))."""
    sigma_b2, sigma_w2 = 3.0, 20.0
    model = lambda r, k: {"method": "uniform", "upstream_samples": r, "noise_draws": k,  # noqa: E731
                          "variance": sigma_b2 / r + sigma_w2 / (r * k)}
    split = variance_split([model(2, 1), model(1, 16), {**model(1, 16), "method": "adaptive", "variance": 1.0}])
    assert split["sigma_b2"] == pytest.approx(sigma_b2) and split["sigma_w2"] == pytest.approx(sigma_w2)
    assert variance_split([model(1, 1), model(2, 1)]) == {}  # both rows have 1/R = 1/(R·K): not separable


def test_variance_command_writes_report_and_plot(capsys, tmp_path, tiny_sd_path):
    out = tmp_path / "variance.json"
    code = main(["variance", "--prompt", "a red cube", "--draws", "4", "--pilot", "2", "--rk", "2x1,1x2",
                 "--methods", "uniform,adaptive", "--out", str(out), "--device", "cpu", "--window", "2",
                 f"teacher.pretrained={tiny_sd_path}", "scene.grid.n_levels=2", "scene.grid.log2_hashmap_size=10",
                 "render.width=8", "render.height=8", "render.samples_per_ray=6"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    rows = {(r["method"], r["upstream_samples"], r["noise_draws"]): r for r in report["rows"]}
    assert set(rows) == {(m, r, k) for m in ("uniform", "adaptive") for r, k in ((2, 1), (1, 2))}
    base = rows[("uniform", 2, 1)]
    assert base["ecm"] == pytest.approx(1.0)
    for r in report["rows"]:
        assert r["variance"] > 0 and r["cost_seconds"] > 0 and r["draws"] == 4
        assert r["windows"] == 2 and r["window_variance"] >= 0  # two windows of two draws each
        assert r["ecm"] == pytest.approx(base["variance"] * base["cost_seconds"] / (r["variance"] * r["cost_seconds"]))
        uniform = rows[("uniform", r["upstream_samples"], r["noise_draws"])]
        assert r["relative_efficiency"] == pytest.approx(uniform["variance"] / r["variance"])
    assert "| method |" in captured.out and "W·Var, W = 2" in captured.out
    # The guidance is named, with CARV against without it; SDS has nothing of its own to train.
    assert report["guidance"] == "sds" and report["guidance_training_in_cost"] is False and report["clock"] == "wall"
    assert "SDS (guidance.type sds) with and without CARV" in captured.out
    assert all(r["guidance_training_seconds"] == 0.0 for r in report["rows"])
    # 4 draws per estimator: flagged in the JSON and with a caveat under the table.
    assert report["few_draws"] is True and all(r["few_draws"] for r in report["rows"])
    assert "caveat: 4 draws per estimator (< 32)" in captured.out and "--draws 32" in captured.out
    # The report is never overwritten by accident.
    code = main(["variance", "--prompt", "a red cube", "--out", str(out), f"teacher.pretrained={tiny_sd_path}"])
    assert code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("options, fragments", [
    (["--rk", "0x1"], ["--rk '0x1'", "R (renders) must be 1 to 1024"]),  # was a ValueError from range() 30 s in
    (["--rk", "2x0"], ["--rk '2x0'", "K (noise draws)"]),
    (["--pilot", "-1"], ["--pilot must be 0 or more"]),  # was accepted
    (["--window", "-2"], ["--window must be 0 or more"]),  # was accepted
    (["--seed", "-5"], ["--seed -5 is out of range"]),  # was accepted
    (["--window", "4", "--draws", "4"], ["needs --draws of at least 8"]),  # was checked after building the scene
    (["--guidance-warmup", "-1"], ["--guidance-warmup must be 0 or more"]),  # likewise
    (["--out", "/proc/variance.json"], ["cannot write", "/proc/variance.json"]),  # was found after measuring
])
def test_bad_options_fail_before_the_scene_is_built(capsys, monkeypatch, tmp_path, options, fragments):
    import carv3d.variance

    def not_yet(*args, **kwargs):
        raise AssertionError("the scene was built before the options were checked")

    monkeypatch.setattr(carv3d.variance, "FrozenScene", not_yet)
    monkeypatch.chdir(tmp_path)
    code = main(["variance", "--prompt", "a red cube", *options])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert list(tmp_path.iterdir()) == []


def test_window_variance_sees_negative_correlation_between_consecutive_draws():
    """Antithetic pairs (x, −x) have per-draw variance 1 per coordinate but window-of-2 means of 0;
    independent draws give W·Var of the window mean ≈ Var (2,000 windows of 4 draws in 3
    coordinates: relative error of a variance estimate ≈ sqrt(2/2000) ≈ 3 %, asserted within 10 %)."""
    generator = torch.Generator().manual_seed(0)
    pairs, single = WindowMeans(2), GradientStats()
    for _ in range(100):
        x = torch.randn(3, generator=generator)
        for g in (x, -x):
            pairs.update(g)
            single.update(g, 0.0)
    assert pairs.stats.count == 100 and pairs.scaled_trace == pytest.approx(0.0, abs=1e-12)
    assert single.trace == pytest.approx(3.0, rel=0.2)

    independent, per_draw = WindowMeans(4), GradientStats()
    for _ in range(8000):
        g = torch.randn(3, generator=generator) * torch.tensor([1.0, 2.0, 3.0])
        independent.update(g)
        per_draw.update(g, 0.0)
    assert independent.stats.count == 2000
    assert independent.scaled_trace == pytest.approx(14.0, rel=0.1)
    assert per_draw.trace == pytest.approx(14.0, rel=0.05)
    assert WindowMeans(4).scaled_trace is None


def _report(draws: int, split: dict) -> dict:
    row = {"method": "uniform", "upstream_samples": 2, "noise_draws": 1, "draws": draws, "variance": 2.0,
           "cost_seconds": 0.01, "ecm": 1.0, "relative_efficiency": 1.0, "bias_z": 108.0}
    return mark_few_draws({"rows": [row], "variance_split": split, "window": None})


def test_few_draws_are_flagged_and_a_meaningless_split_is_not_printed_as_a_number():
    report = _report(8, {"sigma_b2": -0.5, "sigma_w2": 3.0, "ecm_bound_from_reuse": float("inf")})
    table = format_table(report)
    assert report["few_draws"] is True and report["rows"][0]["few_draws"] is True
    assert report["few_draws_threshold"] == FEW_DRAWS == 32
    assert "σ_b² ≈ n/a (too few draws), σ_w² ≈ 3, ECM bound from reuse alone ≈ n/a (too few draws)" in table
    assert "caveat: 8 draws per estimator (< 32)" in table and "inf" not in table and "-0.5" not in table


def test_enough_draws_print_numbers_and_no_caveat():
    report = _report(64, {"sigma_b2": 0.5, "sigma_w2": 1.5, "ecm_bound_from_reuse": 4.0})
    table = format_table(report)
    assert report["few_draws"] is False and "caveat" not in table
    assert "σ_b² ≈ 0.5, σ_w² ≈ 1.5, ECM bound from reuse alone ≈ 4.00" in table


def test_variance_writes_into_the_run_directory_by_default(capsys, tmp_path, tiny_sd_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = [f"teacher.pretrained={tiny_sd_path}", "scene.grid.n_levels=2", "scene.grid.log2_hashmap_size=10",
            "render.width=8", "render.height=8", "render.samples_per_ray=4"]
    code = main(["train", "--prompt", "a red cube", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=r",
                 "train.steps=1", "train.progress=false", "train.tensorboard=false", "train.turntable_frames=0",
                 "train.val_resolution=8", "train.val_every=0", "export.at_end=false", *tiny])
    assert code == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "r"
    code = main(["variance", str(run_dir), "--draws", "2", "--pilot", "2", "--rk", "1x1", "--methods", "uniform",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert (run_dir / "variance.json").is_file() and (run_dir / "variance.png").is_file()
    assert not (tmp_path / "variance.json").exists()
    assert json.loads((run_dir / "variance.json").read_text())["source"]["run_dir"] == str(run_dir)


def _row(method, R, K, variance, cost):
    return {"method": method, "upstream_samples": R, "noise_draws": K, "draws": 64, "variance": variance,
            "cost_seconds": cost, "ecm": (10.0 * 0.2) / (variance * cost), "relative_efficiency": 1.0, "bias_z": 0.0}


def test_with_and_without_carv_picks_the_best_carv_row_and_compares_it_with_both_plain_rows():
    """ECMs by hand: the baseline (uniform, 2, 1) has Var·cost = 10 · 0.2 = 2; adaptive (1, 4) 4 · 0.16 =
    0.64, so 3.125; uniform (1, 4) 6 · 0.15 = 0.9, 2.22; uniform (1, 1) is plain (no CARV) with
    Var·cost 20 · 0.12 = 2.4, so adaptive's ECM against it is 2.4 / 0.64 = 3.75."""
    rows = [_row("uniform", 2, 1, 10.0, 0.2), _row("uniform", 1, 1, 20.0, 0.12), _row("uniform", 1, 4, 6.0, 0.15),
            _row("adaptive", 1, 4, 4.0, 0.16), _row("adaptive", 2, 1, 1e9, 0.2)]
    split = with_and_without_carv(rows)
    best = split["best"]
    assert (best["method"], best["upstream_samples"], best["noise_draws"]) == ("adaptive", 1, 4)
    assert best["ecm"] == pytest.approx(3.125)
    assert split["ecm_vs_uniform_R2_K1"] == pytest.approx(3.125)
    assert split["ecm_vs_uniform_R1_K1"] == pytest.approx(3.75)
    assert with_and_without_carv([_row("uniform", 2, 1, 10.0, 0.2)]) == {}  # no row uses CARV

    report = mark_few_draws({"guidance": "vsd", "rows": rows, "variance_split": {}, "window": None,
                             "baseline": {"method": "uniform", "upstream_samples": 2, "noise_draws": 1},
                             "guidance_state_source": "the run's at step 600", "guidance_training_in_cost": True,
                             "clock": "cpu", "with_and_without_carv": split})
    table = format_table(report)
    assert table.splitlines()[0] == ("VSD (guidance.type vsd) with and without CARV: ECM against VSD without CARV "
                                     "(uniform t, R = 2, K = 1); LoRA: the run's at step 600, held fixed; cost "
                                     "includes the LoRA's training step, as in training; cost in CPU seconds of "
                                     "this process")
    assert ("VSD with CARV, best: adaptive R = 1, K = 4: ECM 3.12 against VSD without CARV (uniform t, K = 1, R = 2), "
            "3.75 against R = 1") in table


class _SleepingStep:
    """A stand-in for the distillation step: sleeps (no CPU work) and leaves a gradient of ones."""

    def __init__(self, params, seconds):
        from carv3d.estimator.timing import StepTimer

        self.params, self.seconds, self.timer, self.calls = params, seconds, StepTimer("cpu"), []

    def __call__(self, step, n_renders=None, frozen=False, update_guidance=None):
        import time

        self.calls.append(update_guidance)
        time.sleep(self.seconds)
        for p in self.params:
            p.grad = torch.ones_like(p)


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_the_cpu_clock_does_not_count_time_the_process_does_not_run(clock):
    """A draw that sleeps 0.2 s costs ≥ 0.2 s of wall clock and (nearly) no CPU time."""
    from carv3d.estimator import ScoreDistillation

    scene = FrozenScene.__new__(FrozenScene)
    scene.device, scene.clock, scene.guidance_training_cost, scene._guidance_snapshot = torch.device("cpu"), clock, True, None
    scene.params = [torch.nn.Parameter(torch.zeros(3))]
    scene.guidance = ScoreDistillation()
    scene.step = _SleepingStep(scene.params, 0.2)
    grad, seconds = scene.gradient(None, None, 1, 0)
    assert torch.equal(grad, torch.ones(3))
    assert scene.step.calls == [False]  # SDS: nothing of its own to train
    if clock == "wall":
        assert seconds >= 0.2
    else:
        assert seconds < 0.1


def test_the_cpu_clock_is_refused_on_a_gpu():
    with pytest.raises(ValueError, match="clock 'cpu'"):
        FrozenScene(None, torch.device("cuda"), clock="cpu")
    with pytest.raises(ValueError, match="clock must be one of"):
        FrozenScene(None, torch.device("cpu"), clock="process")


def test_guidance_state_of_a_checkpoint():
    """What the variance command and the benchmark scripts load into the guidance: VSD's particle
    state, and None for SDS and CSD checkpoints (an empty dict) and checkpoints without an estimator."""
    from carv3d.step import guidance_state

    particle = {"particle": {"weights": {"a": torch.zeros(1)}, "optimizer": {}}}
    assert guidance_state({"estimator": {"guidance": particle}}) is particle
    assert guidance_state({"estimator": {"guidance": {}}}) is None
    assert guidance_state({"estimator": {}}) is None and guidance_state({}) is None


def test_camera_strata_go_to_the_rows_with_carv_and_the_plain_rows_keep_independent_cameras(monkeypatch):
    """--camera-stratified: a row's gradients are drawn with stratified cameras only when the row uses
    CARV (K > 1 or a proposal other than uniform); uniform t with K = 1, the baseline, stays plain, and
    the two-level split is fitted only on rows with independent cameras."""
    import carv3d.variance as variance_module

    class RecordingScene:
        trains_guidance, clock = False, "wall"

        def __init__(self):
            self.seen = []

        def camera_sampler(self, stratified):
            return {"stratified": stratified}

        def gradient(self, estimator, sampler, R, step):
            self.seen.append((estimator, R, sampler["stratified"]))
            return torch.randn(8, generator=torch.Generator().manual_seed(len(self.seen))), 0.01

    from types import SimpleNamespace

    monkeypatch.setattr(variance_module, "make_estimator",
                        lambda cfg, scene, method, R, K: SimpleNamespace(method=method, K=K, adaptive_refresh_every=1))
    scene = RecordingScene()
    cfg = SimpleNamespace(guidance=SimpleNamespace(type="sds"))
    report = variance_module.measure(cfg, scene, ["uniform", "adaptive"], [(2, 1), (1, 4)], draws=3, pilot=0,
                                     camera_stratified=True, progress=False)
    cameras = {(r["method"], r["upstream_samples"], r["noise_draws"]): r["cameras"] for r in report["rows"]}
    assert cameras == {("uniform", 2, 1): "independent", ("adaptive", 2, 1): "stratified",
                       ("uniform", 1, 4): "stratified", ("adaptive", 1, 4): "stratified"}
    for estimator, R, stratified in scene.seen:  # what each draw was actually given
        assert stratified == (estimator.method != "uniform" or estimator.K > 1)
    assert report["variance_split"] == {}  # one independent-camera uniform row cannot separate σ_b² and σ_w²
    table = variance_module.format_table(variance_module.mark_few_draws(report))
    assert "| cameras |" in table and "| uniform | 2 | 1 |" in table
    assert [line.endswith(" independent |") for line in table.splitlines() if line.startswith("| uniform | 2 | 1")] == [True]
    plain = variance_module.measure(cfg, RecordingScene(), ["uniform"], [(2, 1), (1, 4)], draws=3, pilot=0,
                                    progress=False)
    assert {r["cameras"] for r in plain["rows"]} == {"independent"}
