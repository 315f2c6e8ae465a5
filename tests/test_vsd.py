"""VSD: the LoRA particle model (carv3d.teacher.lora) and the guidance (carv3d.estimator.guidance).

References are computed another way: the teacher's own guided call, and a plain diffusers U-Net
whose weights are the LoRA-merged ones (peft's ``merge_and_unload`` on a copy, W + (α/r)·B·A written
into the weights) with the trained camera layers — a second implementation of ε̂_φ that shares no
code path with the mixed-batch call.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft")

from carv3d.config import load_config  # noqa: E402
from carv3d.estimator import Draws, VariationalScoreDistillation, build_estimator  # noqa: E402
from carv3d.estimator.guidance import ParticlePredictor  # noqa: E402
from carv3d.step import TeacherPredictor  # noqa: E402
from carv3d.estimator.timing import StepTimer  # noqa: E402
from carv3d.teacher.lora import LoRAParticle  # noqa: E402
from carv3d.testing.scripts import load_script

PROMPT = "a red cube"
LABELS = ["front", "back", "side"]


def cameras(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 4, 4) camera-to-world matrices: a random rotation and translation each."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, 3, 3, generator=g))
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, :3, :3] = q
    c2w[:, :3, 3] = 2.0 * torch.randn(n, 3, generator=g)
    return c2w


def perturb(particle: LoRAParticle, std: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its init (B = 0 would hide the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in particle.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def setup(teacher, fused=True, **kwargs):
    particle = LoRAParticle(teacher, fused_call=fused, seed=0, **kwargs)
    emb = teacher.embed(PROMPT)
    c2w = cameras(len(LABELS))
    cond = teacher.conditioning(emb, LABELS, c2w)
    plain = teacher.conditioning(emb, [None] * len(LABELS), c2w)
    return particle, cond, plain, c2w


def draws_for(teacher, n_rows: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, *teacher.latent_shape, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([20, 150, 400, 610, 800, 979][:n_rows])
    a = teacher.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    index = torch.arange(n_rows) % len(LABELS)
    return Draws(x=x, x_t=a.sqrt() * x + (1 - a).sqrt() * noise, t=t, noise=noise, upstream_index=index)


def merged_unet(particle: LoRAParticle):
    """A plain diffusers U-Net with the adapters merged into its weights and the trained camera layers."""
    model = copy.deepcopy(particle.model)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def trained_particle(tiny_teacher):
    """A particle model on the tiny SD teacher with every trainable tensor moved off its init."""
    particle, cond, plain, c2w = setup(tiny_teacher)
    perturb(particle)
    return particle, cond, plain, c2w


def test_residual_equals_two_separate_unet_calls_row_by_row(tiny_teacher, trained_particle):
    """Fused (one mixed-batch call) and separate calls both equal, row by row, the teacher's guided
    call minus a merged-weights U-Net's prediction."""
    teacher = tiny_teacher
    particle, cond, plain, c2w = trained_particle
    draws = draws_for(teacher, n_rows=4)
    predictor = TeacherPredictor(teacher, cond, 7.5, StepTimer("cpu"), particle, plain)
    assert isinstance(predictor, ParticlePredictor)
    guidance = VariationalScoreDistillation(particle)

    idx = draws.upstream_index
    guided = teacher.predict_noise(draws.x_t, draws.t, cond.select(idx), 7.5)  # call 1: the frozen teacher
    reference = merged_unet(particle)  # call 2: W + BA merged, trained camera MLP as the class embedding
    with torch.no_grad():
        phi = reference(draws.x_t, draws.t, plain.cond[idx], class_labels=c2w[idx].reshape(-1, 16)).sample
    expected = guided - phi
    batches: dict[str, list[int]] = {"teacher": [], "copy": []}
    hooks = [unet.register_forward_pre_hook(lambda m, args, name=name: batches[name].append(args[0].shape[0]))
             for name, unet in (("teacher", teacher.unet), ("copy", particle.model.get_base_model()))]
    for fused in (True, False):
        particle.fused_call = fused
        batches["teacher"].clear(), batches["copy"].clear()
        residual = guidance.residual(draws, predictor)
        # fused: one U-Net call of 3N rows (uncond, cond, LoRA); separate: the teacher's 2N and the copy's N
        assert batches == ({"teacher": [], "copy": [12]} if fused else {"teacher": [8], "copy": [4]}), batches
        assert residual.shape == draws.x_t.shape
        for n in range(len(idx)):
            torch.testing.assert_close(residual[n], expected[n], rtol=1e-4, atol=1e-5, msg=f"fused {fused}, row {n}")
    particle.fused_call = False
    for hook in hooks:
        hook.remove()
    # the adapters matter: ε̂_φ is not the teacher's conditional prediction any more
    cond_only = teacher.predict_noise(draws.x_t, draws.t, plain.select(idx), 1.0)
    assert (phi - cond_only).abs().max() > 1e-3


def test_at_init_lora_prediction_is_the_teacher_without_guidance(tiny_teacher):
    """B = 0 and a zero camera layer: ε̂_φ = ε̂_c of the plain prompt, whatever the camera; the VSD
    residual is then (s − 1)·(ε̂_c − ε̂_u) for view-independent text."""
    teacher = tiny_teacher
    particle, cond, plain, _ = setup(teacher)
    draws = draws_for(teacher)
    idx = draws.upstream_index
    phi = particle.predict_particle(draws.x_t, draws.t, plain.select(idx))
    torch.testing.assert_close(phi, teacher.predict_noise(draws.x_t, draws.t, plain.select(idx), 1.0),
                               rtol=0, atol=1e-6)
    predictor = TeacherPredictor(teacher, plain, 7.5, StepTimer("cpu"), particle, plain)
    residual = VariationalScoreDistillation(particle).residual(draws, predictor)
    u, c = teacher.predict_noise_branches(draws.x_t, draws.t, plain.select(idx))
    torch.testing.assert_close(residual, 6.5 * (c - u), rtol=1e-4, atol=1e-5)
    # with the teacher's CUDA-graph fast path the copy's call goes through CapturedUNet (eager on a CPU)
    from carv3d.teacher.fast import FastPaths
    from carv3d.teacher.graphs import CapturedUNet

    graphed = LoRAParticle(teacher.with_fast_paths(FastPaths(cuda_graph=True)), seed=0)
    assert isinstance(graphed._particle_call, CapturedUNet)
    assert torch.equal(graphed.predict_particle(draws.x_t, draws.t, plain.select(idx)), phi)


@pytest.mark.parametrize("which", ["tiny_teacher", "tiny_pixel_teacher"])
def test_lora_loss_decreases_on_a_fixed_batch(which, request):
    """8 AdamW steps (lr 2e-2) on one fixed batch of 2 (x, t, ε): the loss falls by more than 10 %
    (a rank-4 adapter on a tiny U-Net; deterministic, seeded). The control with lr 0 keeps the loss
    exactly: the fall is the adapters' training, nothing else. Both the latent (Stable Diffusion)
    and the pixel-space teacher."""
    teacher = request.getfixturevalue(which)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, *teacher.latent_shape, generator=g) * 2 - 1
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([300, 600])
    for lr in (2e-2, 0.0):
        particle, _, plain, _ = setup(teacher, lr=lr)
        rows = plain.select(torch.tensor([0, 1]))
        first = float(particle.update(x, t, noise, rows))
        for _ in range(7 if lr else 1):
            last = float(particle.update(x, t, noise, rows))
        if lr:
            assert last < 0.9 * first, (first, last)
        else:
            assert last == first


def test_training_target_follows_the_prediction_type(tiny_teacher):
    """The loss at zero adapters equals MSE(U-Net output, target) with the target from diffusers'
    scheduler: ε, ``get_velocity`` (v) or x₀."""
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    teacher = tiny_teacher
    particle, _, plain, c2w = setup(teacher)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, *teacher.latent_shape, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([10, 500, 990])
    x_t = scheduler.add_noise(x, noise, t)
    with torch.no_grad():
        out = teacher.unet(x_t, t, plain.cond).sample
    targets = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x, noise, t), "sample": x}
    for kind, target in targets.items():
        particle.prediction_type = kind
        with torch.no_grad():
            loss = particle.loss(x, t, noise, plain, camera_kept=torch.zeros(3, dtype=torch.bool))
        torch.testing.assert_close(loss, torch.nn.functional.mse_loss(out, target), rtol=1e-5, atol=1e-6)


def test_update_draws_particle_timesteps_and_camera_dropout_from_the_generator():
    """t' covers {⌊t_min·T⌋, …, ⌈t_max·T⌉ − 1}; the dropped-camera fraction is 0.1 within 4 SE
    (n = 20,000: SE = 0.0021); the same generator state gives the same draws."""

    class Recorder:
        num_train_timesteps = 1000
        calls: list = []

        def __call__(self, x_t, t, i):
            return x_t

        def branches(self, x_t, t, i):
            return x_t, x_t

        def guided_and_particle(self, x_t, t, i):
            return x_t, x_t

        def update_particle(self, x, t, noise, index, kept):
            self.calls.append((x, t, noise, index, kept))
            return torch.zeros(())

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    rec = Recorder()
    vsd = VariationalScoreDistillation(rec, samples=4, t_min=0.2, t_max=0.5, camera_dropout=0.1)
    x = torch.randn(5000, 1, 2)
    vsd.update(x, rec, torch.Generator().manual_seed(0))
    xs, t, noise, index, kept = rec.calls[-1]
    assert int(t.min()) == 200 and int(t.max()) == 499 and t.shape == (20000,)
    assert torch.equal(index, torch.arange(5000).repeat_interleave(4)) and torch.equal(xs, x.repeat_interleave(4, 0))
    assert abs(float((~kept).float().mean()) - 0.1) < 4 * (0.1 * 0.9 / 20000) ** 0.5
    vsd.update(x, rec, torch.Generator().manual_seed(0))
    assert torch.equal(rec.calls[-1][1], t) and torch.equal(rec.calls[-1][2], noise)


def test_vsd_through_the_estimator_shares_the_draws_and_is_unbiased():
    """With linear predictions ε̂_s = a_s(t)·x_t + b_s(t)·c and ε̂_φ = a_φ(t)·x_t + b_φ(t)·c, the VSD
    latent gradient's expectation is the finite sum Σ_t p(t)w(t)[(a_s − a_φ)(t)√ᾱ_t·x + (b_s − b_φ)(t)·c].
    MC mean of 1,200 estimates per render under CARV's proposal and strata (K = 4) against it, 5 SE
    per element (18 elements: a false alarm has probability ~1e-5). One predictor call per step
    gives both predictions for the same rows."""
    from test_estimator import ALPHAS, C_VEC, GRID, X3, reference_pw
    from carv3d.estimator import ScoreDistillationEstimator, TimestepDistribution

    a_s, a_p = 0.9 + 0.2 * torch.cos(GRID / 90.0), 0.5 + 0.1 * torch.sin(GRID / 70.0)
    b_s, b_p = torch.sin(GRID / 210.0), 0.3 * torch.cos(GRID / 40.0)

    class Linear:
        num_train_timesteps = 1000
        calls = 0

        def lin(self, a, b, x_t, t):
            return (a[t].view(-1, 1, 1) * x_t.double() + b[t].view(-1, 1, 1) * C_VEC).to(x_t.dtype)

        def __call__(self, x_t, t, i):
            raise AssertionError("VSD must not call the plain guided prediction")

        def branches(self, x_t, t, i):
            raise AssertionError("VSD must not call the branches")

        def guided_and_particle(self, x_t, t, i):
            self.calls += 1
            return self.lin(a_s, b_s, x_t, t), self.lin(a_p, b_p, x_t, t)

        def update_particle(self, *args):
            return torch.zeros(())

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    model = Linear()
    dist = TimestepDistribution(ALPHAS, 0.02, 0.98, weighting="sds", proposal="teacher-weight")
    est = ScoreDistillationEstimator(dist, noise_draws=4, stratified=True, guidance=VariationalScoreDistillation(model))
    M = 1200
    x = X3.repeat_interleave(M, 0)
    result = est.estimate(x.clone().requires_grad_(True), model, torch.Generator().manual_seed(3), step=0)
    assert model.calls == 1
    g = result.latent_gradient.double().reshape(3, M, -1)
    pw = reference_pw(20, 980, "sds")
    exact = ((pw * (a_s - a_p) * ALPHAS.double().sqrt()).sum() * X3.double()
             + (pw * (b_s - b_p)).sum() * C_VEC).reshape(3, -1)
    se = g.std(1) / M ** 0.5
    assert ((g.mean(1) - exact).abs() <= 5 * se + 1e-9).all()
    assert "particle_loss" in result.stats


def test_config_checks(tmp_path):
    from carv3d.errors import ConfigError

    cfg = load_config(overrides=["guidance.type=vsd"])
    assert (cfg.guidance.lora_rank, cfg.guidance.lora_lr, cfg.guidance.camera_dropout) == (4, 1e-4, 0.1)
    bad = {"guidance.lora_t_min=0.6": "lora_t_min < lora_t_max", "guidance.lora_rank=0": "[1, 1024]",
           "guidance.camera_dropout=1.5": "guidance.camera_dropout", "guidance.lora_lr=-1": "guidance.lora_lr",
           "guidance.lora_betas=[0.9]": "guidance.lora_betas"}
    for override, message in bad.items():
        extra = ["guidance.lora_t_max=0.5"] if "t_min" in override else []
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(overrides=["guidance.type=vsd", override, *extra])
    with pytest.raises(ConfigError, match="unknown config key 'guidance.lora_rank'"):
        load_config(overrides=["guidance.lora_rank=4"])  # an SDS run has no LoRA keys


def test_missing_peft_is_one_clear_error(tiny_teacher, monkeypatch):
    import builtins

    from carv3d.errors import BackendUnavailableError
    from carv3d.teacher.lora import build_particle

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("no peft")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'carv3d\[vsd\]'"):
        build_particle(load_config(overrides=["guidance.type=vsd"]).guidance, tiny_teacher)
    assert build_particle(load_config().guidance, tiny_teacher) is None  # SDS needs none


def test_build_estimator_needs_the_particle_for_vsd():
    from test_estimator import ALPHAS

    cfg = load_config(overrides=["guidance.type=vsd"])
    with pytest.raises(ValueError, match="particle model"):
        build_estimator(cfg.estimator, ALPHAS, "cpu", cfg.guidance)


def test_resume_is_bit_identical_with_the_lora_and_its_optimiser(tiny_sd_path, tmp_path):
    """2 steps in one go against 1 step, a checkpoint and a resume: the scene, the scene's Adam,
    the LoRA/camera weights and their AdamW state are equal bit for bit (CPU)."""
    from test_train_e2e import tiny_overrides

    from carv3d.checkpoint import latest_checkpoint, load_checkpoint
    from carv3d.train import resume, train

    extra = {"guidance.type": "vsd", "guidance.lora_lr": 1e-2, "estimator.upstream_samples": 1,
             "train.val_every": 0, "train.checkpoint_every": 1, "train.turntable_frames": 0,
             "export.at_end": False}

    def run(name, steps):
        cfg = load_config(overrides=tiny_overrides(tiny_sd_path, tmp_path, steps=steps, **extra,
                                                   **{"train.run_name": name}), prompt=PROMPT)
        return train(cfg)

    full, half = run("full", 2), run("half", 1)
    resume(half, ["train.steps=2"])
    a, b = (load_checkpoint(latest_checkpoint(d)) for d in (full, half))
    assert a["step"] == b["step"] == 2
    for key in a["scene"]:
        assert torch.equal(a["scene"][key], b["scene"][key]), key
    pa, pb = a["estimator"]["guidance"]["particle"], b["estimator"]["guidance"]["particle"]
    assert len(pa["weights"]) > 0 and set(pa["weights"]) == set(pb["weights"])
    moved = 0
    for name in pa["weights"]:
        assert torch.equal(pa["weights"][name], pb["weights"][name]), name
        moved += int(pa["weights"][name].abs().sum() > 0)
    assert moved == len(pa["weights"])  # B and the camera's output layer have left zero: the LoRA trained
    for key, state in pa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, pb["optimizer"]["state"][key][name]), (key, name)
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg"], b["optimizer"]["state"][0]["exp_avg"])


def test_variance_command_measures_vsd_with_the_lora_held_fixed(capsys, tmp_path, tiny_sd_path, monkeypatch):
    """`carv3d variance` with guidance.type vsd: --guidance-warmup trains the LoRA at the frozen scene,
    then every estimator of the grid (with and without CARV) uses that same LoRA, which the
    measurement does not move; the residuals are VSD's (the particle model is called)."""

    from carv3d.cli import main
    from carv3d.teacher import lora

    snapshots, calls = [], {"predict": 0, "update": 0}
    real_measure = __import__("carv3d.variance", fromlist=["measure"]).measure

    def measure(cfg, scene, *args, **kwargs):
        particle = scene.guidance.particle
        snapshots.append({k: v.clone() for k, v in particle.state_dict()["weights"].items()})
        report = real_measure(cfg, scene, *args, **kwargs)
        snapshots.append({k: v.clone() for k, v in particle.state_dict()["weights"].items()})
        return report

    for name in ("predict", "update"):
        real = getattr(lora.LoRAParticle, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(lora.LoRAParticle, name, counted)
    monkeypatch.setattr("carv3d.variance.measure", measure)
    out = tmp_path / "variance.json"
    code = main(["variance", "--prompt", PROMPT, "--draws", "3", "--rk", "1x1,1x2", "--methods", "uniform,is+stratified",
                 "--guidance-warmup", "2", "--out", str(out), "--device", "cpu", "guidance.type=vsd",
                 "guidance.lora_lr=0.01", f"teacher.pretrained={tiny_sd_path}", "scene.grid.n_levels=2",
                 "scene.grid.log2_hashmap_size=10", "render.width=8", "render.height=8", "render.samples_per_ray=6"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["guidance"] == "vsd" and report["guidance_warmup"] == 2
    rows = {(r["method"], r["upstream_samples"], r["noise_draws"]) for r in report["rows"]}
    assert {("uniform", 1, 1), ("is+stratified", 1, 2), ("uniform", 2, 1)} <= rows
    # The warm-up, then one LoRA training step per gradient: its cost is the gradient's (a training step
    # pays it), and the LoRA is put back after each, so every gradient sees the warmed-up LoRA.
    assert calls["update"] == 2 + 3 * len(rows)
    assert calls["predict"] == 2 + 3 * len(rows)  # one predictor call per gradient
    before, after = snapshots
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(before[k].abs().sum() > 0 for k in before if "lora_B" in k)  # the warm-up moved B off zero
    assert report["guidance_training_in_cost"] is True
    assert all(0 < r["guidance_training_seconds"] < r["cost_seconds"] for r in report["rows"])
    printed = capsys.readouterr().out
    assert printed.startswith("VSD (guidance.type vsd) with and without CARV: ECM against VSD without CARV (uniform t, "
                              "R = 2, K = 1); LoRA: 2 warm-up steps at the frozen scene, held fixed; cost includes "
                              "the LoRA's training step")
    best = report["with_and_without_carv"]["best"]
    assert "VSD with CARV, best: " in printed and (best["method"] != "uniform" or best["noise_draws"] > 1)


def test_variance_can_leave_the_lora_training_out_of_the_cost(capsys, tmp_path, tiny_sd_path):
    """--no-guidance-training-cost: no LoRA step during the measurement, nothing of it in the cost."""

    from carv3d.cli import main

    out = tmp_path / "variance.json"
    code = main(["variance", "--prompt", PROMPT, "--draws", "2", "--rk", "1x1", "--methods", "uniform",
                 "--no-guidance-training-cost", "--out", str(out), "--device", "cpu", "guidance.type=vsd",
                 f"teacher.pretrained={tiny_sd_path}", "scene.grid.n_levels=2", "scene.grid.log2_hashmap_size=10",
                 "render.width=8", "render.height=8", "render.samples_per_ray=6"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["guidance_training_in_cost"] is False
    assert all(r["guidance_training_seconds"] == 0.0 for r in report["rows"])
    assert "LoRA: untrained" in capsys.readouterr().out


def test_an_import_broken_by_ctrl_c_exits_as_interrupted(capsys, monkeypatch):
    """peft brings accelerate, which diffusers imports at start-up; a Ctrl-C inside numpy's lazy
    ``np.dtypes`` import there surfaces as a RecursionError. The CLI reports it as the interrupt it
    is (exit 130, no traceback) — and an error without a Ctrl-C stays a bug (raised)."""
    import os
    import signal
    import time

    from carv3d import cli
    from carv3d.commands import COMMANDS

    command = next(c for c in COMMANDS if c.NAME == "variance")

    def broken_import(args):
        try:
            os.kill(os.getpid(), signal.SIGINT)  # Python's handler raises KeyboardInterrupt here
            time.sleep(10)  # bounded: a SIGINT that never arrives fails the test instead of hanging it
        except KeyboardInterrupt:
            raise RecursionError("maximum recursion depth exceeded") from None

    monkeypatch.setattr(command, "run", broken_import)
    assert cli.main(["variance", "--prompt", "a red cube"]) == cli.INTERRUPTED
    assert capsys.readouterr().err.strip().endswith("carv3d variance: interrupted")
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the exit stays clean
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def plain_bug(args):
        raise RecursionError("a real bug")

    monkeypatch.setattr(command, "run", plain_bug)
    with pytest.raises(RecursionError, match="a real bug"):
        cli.main(["variance", "--prompt", "a red cube"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_gpu_check_script_runs_in_cpu_smoke_mode(tmp_path):
    """scripts/gpu_check_vsd.py --cpu-smoke: every section runs on tiny models and the CPU, and its
    correctness checks pass there (fp32)."""

    module = load_script("gpu_check_vsd")
    assert module.main([str(tmp_path), "--cpu-smoke", "--budget-s", "900"]) == 0
    report = json.loads((tmp_path / "gpu_check_vsd.json").read_text())
    assert report["status"] == "finished" and report["correctness"]["ok"] is True
    assert all(r["status"] == "ok" for r in report["sd21_step"]["results"]), report["sd21_step"]["results"]
    assert report["projection"]["hours"]["vsd_carv_K2_no_saving"] > 0
    assert {m: report["world"]["summary"][m]["runs"] for m in ("sds", "vsd")} == {"sds": 1, "vsd": 1}


def test_gpu_check_vsd_reprojects_with_the_step_saving_bench_quality_measured(tmp_path):
    """--project-from + --saving-from: hours = (5,000 · t_64 + 20,000 · t_512) / saving / 3.6e6, with the
    saving = the baseline's steps in the budget / the arm's steps to the baseline's final IoU."""
    module = load_script("gpu_check_vsd")
    earlier = {"device_name": "card", "date": "then", "sd21_step": {"results": [
        {"name": "vsd/plain/K1", "status": "ok", "ms_per_step_median": 100.0},
        {"name": "vsd/carv/K8", "status": "ok", "ms_per_step_median": 200.0}]}}
    bench = {"settings": {"baseline": "sds"}, "summary": {"overall": {"versus_baseline": {
        "carv": {"steps_to_baseline_final_iou": 100.0, "baseline_steps_in_budget": 400.0},
        "never": {"steps_to_baseline_final_iou": None, "baseline_steps_in_budget": 400.0}}}}}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out = tmp_path / "out"
    assert module.main([str(out), "--project-from", str(tmp_path / "earlier.json"),
                        "--saving-from", str(tmp_path / "bench.json"), "--saving-arm", "carv"]) == 0
    projection = json.loads((out / "gpu_check_vsd.json").read_text())["projection"]
    assert projection["iteration_saving"] == pytest.approx(4.0)
    assert projection["hours"]["plain_vsd_K1_64px_all_steps"] == pytest.approx(25_000 * 100.0 / 3.6e6)
    assert projection["hours"]["vsd_carv_K8_no_saving"] == pytest.approx(25_000 * 200.0 / 3.6e6)
    assert projection["hours"]["vsd_carv_K8_with_saving"] == pytest.approx(25_000 * 200.0 / 4.0 / 3.6e6)
    assert "in 100 steps against 400" in projection["assumptions"][2]
    with pytest.raises(SystemExit, match="never reached"):
        module.measured_saving(str(tmp_path / "bench.json"), "never")
    with pytest.raises(SystemExit, match="not an arm"):
        module.measured_saving(str(tmp_path / "bench.json"), "other")


def test_lora_copy_is_nchw_when_the_teachers_unet_is_channels_last(tiny_teacher):
    # teacher.compile=auto turns channels-last tensors on with a compile; the LoRA copy runs eagerly,
    # where NHWC convolutions measured slower, so it goes back to NCHW (the teacher keeps its layout).
    convs = [m for m in tiny_teacher.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    tiny_teacher.unet.to(memory_format=torch.channels_last)
    try:
        assert convs[1].weight.is_contiguous(memory_format=torch.channels_last)
        particle = LoRAParticle(tiny_teacher, seed=0)
        copied = [m for m in particle.model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert copied and all(m.weight.is_contiguous() for m in copied)
        assert convs[1].weight.is_contiguous(memory_format=torch.channels_last)  # the teacher's own: untouched
    finally:
        tiny_teacher.unet.to(memory_format=torch.contiguous_format)
