"""End to end with the tiny Stable-Diffusion-shaped teacher: train → checkpoint → resume → export."""

from __future__ import annotations

import json

import pytest
import torch

from carv3d.checkpoint import latest_checkpoint, load_checkpoint
from carv3d.config import load_config
from carv3d.train import read_metrics, resume, train


def tiny_overrides(teacher_path, out_dir, steps=4, **extra):
    overrides = {
        "teacher.pretrained": str(teacher_path),
        "scene.grid.n_levels": 4,
        "scene.grid.log2_hashmap_size": 12,
        "scene.grid.base_resolution": 8,
        "scene.mlp_width": 16,
        "render.width": 16,
        "render.height": 16,
        "render.samples_per_ray": 12,
        "render.shading": "random",
        "render.background": "learned",
        "estimator.noise_draws": 2,  # fixed K: auto-K depends on measured wall clock
        "estimator.upstream_samples": 2,
        "estimator.adaptive_refresh_every": 1,
        "camera.stratified": True,
        "export.resolution": 24,
        "export.threshold": 2.0,
        "train.steps": steps,
        "train.val_every": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.turntable_frames": 3,
        "train.val_resolution": 16,
        "train.output_dir": str(out_dir),
        "train.progress": False,
        "train.tensorboard": False,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def _field_params(run_dir):
    state = load_checkpoint(latest_checkpoint(run_dir))
    return state["step"], state["scene"], state["optimizer"]


def test_train_resume_matches_uninterrupted_and_exports(tiny_sd_path, tmp_path):
    trimesh = pytest.importorskip("trimesh")
    full_cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=4, **{"train.run_name": "full"}),
                           prompt="a red cube")
    full = train(full_cfg)
    half_cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=2, **{"train.run_name": "half"}),
                           prompt="a red cube")
    half = train(half_cfg)
    assert _field_params(half)[0] == 2
    resumed = resume(half, ["train.steps=4"])
    assert resumed == half

    step_a, field_a, optim_a = _field_params(full)
    step_b, field_b, optim_b = _field_params(half)
    assert step_a == step_b == 4
    for key in field_a:
        assert torch.equal(field_a[key], field_b[key]), f"resumed run differs from the uninterrupted one in {key}"
    assert torch.equal(optim_a["state"][0]["exp_avg"], optim_b["state"][0]["exp_avg"])

    # The run directory holds what DESIGN.md promises.
    for name in ("config.yaml", "run.json", "metrics.jsonl", "turntable.mp4", "mesh/mesh.glb", "mesh/mesh.ply", "mesh/mesh.obj"):
        assert (full / name).is_file(), name
    assert sorted((full / "validation").glob("step_*.png"))
    status = json.loads((full / "run.json").read_text())
    assert status["status"] == "finished" and status["step"] == 4
    rows = read_metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("sds_gradient_norm" in r for r in rows)

    mesh = trimesh.load(full / "mesh" / "mesh.ply", process=False)
    assert len(mesh.faces) > 0
    assert mesh.visual.vertex_colors.shape[0] == len(mesh.vertices)
    # the blob initialisation exports a closed surface around the origin
    assert abs(mesh.centroid).max() < 0.2


def test_sds_preset_matches_threestudio_sds(tiny_teacher):
    """The sds preset's latent gradient equals a hand-written threestudio-style SDS step bit for bit."""
    from carv3d.estimator import build_estimator

    cfg = load_config(overrides=["estimator.preset=sds"])
    estimator = build_estimator(cfg.estimator, tiny_teacher.alphas_cumprod, "cpu")
    embedding = tiny_teacher.embed("a red cube")
    cond = tiny_teacher.conditioning(embedding, ["front"])
    x = torch.randn(1, *tiny_teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    guidance = 7.5

    def predict(x_t, t, idx):
        return tiny_teacher.predict_noise(x_t, t, cond.select(idx), guidance)

    result = estimator.estimate(x.clone().requires_grad_(True), predict, torch.Generator().manual_seed(11), step=0)

    # threestudio's StableDiffusionGuidance.compute_grad_sds, written out.
    generator = torch.Generator().manual_seed(11)
    T = tiny_teacher.num_train_timesteps
    # threestudio's min/max_step_percent, set to the preset's range (its tuned t_max: 0.75)
    assert (cfg.estimator.t_min, cfg.estimator.t_max) == (0.02, 0.75)
    min_step, max_step = int(T * cfg.estimator.t_min), int(T * cfg.estimator.t_max)
    t = torch.randint(min_step, max_step + 1, (1,), generator=generator, dtype=torch.long)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    alpha = tiny_teacher.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
    eps_hat = tiny_teacher.predict_noise(x_t, t, cond, guidance)  # CFG itself is checked in test_teacher.py
    expected = (1 - alpha) * (eps_hat - noise)
    assert torch.equal(result.latent_gradient, expected)


def _trainer(tiny_sd_path, tmp_path, **extra):
    from carv3d.run_dir import create_run_dir
    from carv3d.train import Trainer

    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=6, **extra), prompt="a red cube")
    trainer = Trainer(cfg)
    trainer.run_dir = create_run_dir(cfg)
    return trainer


def test_nonfinite_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(tiny_sd_path, tmp_path):
    from carv3d.errors import TrainingDivergedError

    trainer = _trainer(tiny_sd_path, tmp_path, **{"train.max_nonfinite_steps": 3, "train.run_name": "nan"})
    clean_predict = trainer.teacher.predict_noise
    calls = {"n": 0}

    def predict_noise(*args, **kwargs):  # steps 3.. return NaN noise predictions
        calls["n"] += 1
        out = clean_predict(*args, **kwargs)
        return out * float("nan") if calls["n"] > 2 else out

    trainer.teacher.predict_noise = predict_noise
    with pytest.raises(TrainingDivergedError, match="3 non-finite steps in a row"):
        trainer.run()
    state = load_checkpoint(latest_checkpoint(trainer.run_dir))
    assert state["step"] == 2  # the last good checkpoint (checkpoint_every=2) is the one kept
    assert all(torch.isfinite(v).all() for v in state["scene"].values())
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "diverged"
    assert trainer.guard.total() == 3


def test_ctrl_c_saves_a_checkpoint_and_exports(tiny_sd_path, tmp_path):
    trainer = _trainer(tiny_sd_path, tmp_path, **{"train.run_name": "interrupted", "train.checkpoint_every": 100})
    clean_step = trainer.train_step

    def train_step():
        if trainer.step == 3:
            raise KeyboardInterrupt
        return clean_step()

    trainer.train_step = train_step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert load_checkpoint(latest_checkpoint(trainer.run_dir))["step"] == 3
    assert (trainer.run_dir / "mesh" / "mesh.glb").is_file() and (trainer.run_dir / "turntable.mp4").is_file()
    assert json.loads((trainer.run_dir / "run.json").read_text())["status"] == "interrupted"


def test_train_until_counts_only_time_inside_steps(tiny_sd_path, tmp_path, monkeypatch):
    """A fake clock: each step takes 0.25 s, the caller's "evaluation" between slices 10 s. The
    training clock must add up the steps only and stop at the first step that reaches the target."""
    import carv3d.train as train_module

    trainer = _trainer(tiny_sd_path, tmp_path, **{"train.run_name": "until"})
    now = {"t": 100.0}
    monkeypatch.setattr(train_module, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: now["t"])}))

    def train_step():
        now["t"] += 0.25
        trainer.step += 1

    trainer.train_step = train_step
    assert trainer.train_until(1.0) == 4 and trainer.elapsed_seconds == 1.0
    now["t"] += 10.0  # evaluating between slices: not training time
    assert trainer.train_until(1.6) == 3 and trainer.elapsed_seconds == 1.75  # overshoots by < one step
    assert trainer.train_until(1.7) == 0 and trainer.step == 7


def test_train_until_trains_the_real_scene(tiny_sd_path, tmp_path):
    trainer = _trainer(tiny_sd_path, tmp_path, **{"train.run_name": "until_real"})
    before = [p.detach().clone() for p in trainer.scene.parameters()]
    taken = trainer.train_until(1e-9)  # one real step reaches any positive target
    assert taken == 1 and trainer.step == 1 and trainer.elapsed_seconds > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.scene.parameters()))


@pytest.mark.parametrize("val_every, expected_steps", [(2, [2]), (0, [2]), (1, [1, 2])])
def test_each_step_is_validated_once_and_the_last_step_always(tiny_sd_path, tmp_path, monkeypatch,
                                                              val_every, expected_steps):
    """The loop's validation at the final step is not rendered again by the end of the run, and a
    run with validation off still ends with one sheet."""
    from carv3d import outputs

    rendered = []
    sheet = outputs.validation_sheet

    def counting_sheet(scene, resolution, **kwargs):
        rendered.append(resolution)
        return sheet(scene, resolution, **kwargs)

    monkeypatch.setattr(outputs, "validation_sheet", counting_sheet)
    cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=2, **{
        "train.val_every": val_every, "train.turntable_frames": 0, "export.at_end": False}), prompt="a red cube")
    run_dir = train(cfg)
    written = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "validation").glob("step_*.png"))
    assert written == expected_steps
    assert len(rendered) == len(expected_steps)
