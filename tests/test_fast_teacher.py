"""CUDA fast paths against eager (GPU only): CUDA-graph replay + channels_last, compile, sync-free steps.

    python -m pytest -m gpu tests/test_fast_teacher.py

Tolerances: the teachers run in fp16; channels_last and graph replay may pick other cuDNN kernels,
which reorder fp16 sums (~1e-3 relative per layer). Predictions are compared with an error relative
to their norm of 1e-2, gradients by cosine similarity ≥ 0.999 and norm ratio within 2%.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from carv3d.config import DiffusersTeacherConfig, load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def teachers(tiny_sd_path):
    from carv3d.teacher import load_teacher

    eager = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path), cuda_graph="off", channels_last="off"), "cuda")
    fast = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path), cuda_graph="on", channels_last="on"), "cuda")
    return eager, fast


def _inputs(teacher, n: int, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x_t = torch.randn((n, *teacher.latent_shape), generator=generator, device="cuda")
    t = torch.randint(20, 980, (n,), generator=generator, device="cuda")
    embedding = teacher.embed("a red cube")
    cond = teacher.conditioning(embedding, ["front", "side", "back", "overhead"][:1] * n)
    return x_t, t, cond


def test_fast_teacher_matches_eager_and_replays_fresh_inputs(teachers):
    from carv3d.teacher.graphs import CapturedUNet

    eager, fast = teachers
    assert fast.fast.cuda_graph and fast.fast.channels_last and isinstance(fast._unet_call, CapturedUNet)
    for n, seed in ((3, 0), (3, 1), (5, 2), (3, 3)):  # a repeated shape must replay the new inputs, not stale ones
        x_t, t, cond = _inputs(eager, n, seed)
        want = eager.predict_noise(x_t, t, cond, guidance_scale=7.5)
        got = fast.predict_noise(x_t, t, cond, guidance_scale=7.5)
        assert torch.isfinite(got).all()
        assert _relative_error(got, want) < 1e-2, (n, seed)
    assert len(fast._unet_call.graphs) == 2  # shapes 2·3 and 2·5 rows
    assert fast._unet_call.replays == 4 and not fast._unet_call.failed
    # Different inputs give different outputs through the replayed graph (it is not a constant).
    a = fast.predict_noise(*_inputs(eager, 3, 10), guidance_scale=7.5)
    b = fast.predict_noise(*_inputs(eager, 3, 11), guidance_scale=7.5)
    assert _relative_error(a, b) > 0.1


def test_captured_unet_outputs_survive_replays_and_eviction():
    """A returned prediction is a copy (the next replay must not overwrite it), evicting every graph
    at ``max_graphs`` starts a fresh pool that captures again, and a call that needs gradients runs
    eagerly with its autograd history. An fp32 linear map, so replay and eager agree to rounding."""
    from carv3d.teacher.graphs import CapturedUNet

    weight = torch.randn(8, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    forward = lambda x, t, h: x @ weight + t.view(-1, 1) + h.sum()  # noqa: E731
    unet = CapturedUNet(forward, max_graphs=2)
    t, h = torch.ones(4, device="cuda"), torch.zeros(1, 3, device="cuda")
    first_input = torch.randn(4, 8, device="cuda")
    first = unet(first_input, t, h)
    kept = first.clone()
    unet(torch.randn(4, 8, device="cuda"), t, h)  # same shape: a replay of the same graph
    assert torch.equal(first, kept)
    assert torch.allclose(first, forward(first_input, t, h), rtol=1e-5, atol=1e-5)
    for rows in (5, 6):  # shape 6 is the third: it evicts both graphs, drops the pool and captures anew
        x = torch.randn(rows, 8, device="cuda")
        assert torch.allclose(unet(x, torch.ones(rows, device="cuda"), h),
                              forward(x, torch.ones(rows, device="cuda"), h), rtol=1e-5, atol=1e-5)
    assert len(unet.graphs) == 1 and not unet.failed
    x = torch.randn(7, 8, device="cuda", requires_grad=True)
    out = unet(x, torch.ones(7, device="cuda"), h)
    assert out.requires_grad
    out.sum().backward()
    assert torch.allclose(x.grad, weight.sum(1).expand(7, 8), rtol=1e-5, atol=1e-5)
    assert len(unet.graphs) == 1  # the gradient call was not captured


def test_fast_encode_matches_eager_with_its_gradient(teachers):
    eager, fast = teachers
    image = torch.rand(2, 3, 32, 32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    grads = []
    outs = []
    for teacher in (eager, fast):
        x = image.clone().requires_grad_(True)
        latents = teacher.encode(x)
        (latents * torch.linspace(-1, 1, latents.numel(), device="cuda").view_as(latents)).sum().backward()
        outs.append(latents.detach())
        grads.append(x.grad)
    assert _relative_error(outs[1], outs[0]) < 1e-2
    assert _relative_error(grads[1], grads[0]) < 2e-2


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_compiled_teacher_matches_eager_for_noise_and_encode_gradient(teachers, tiny_sd_path, mode):
    """``teacher.compile``: the compiled U-Net (inside the CUDA graph) and the compiled VAE encoder,
    forward and backward. Inductor fuses and reorders fp16 arithmetic, and guidance 7.5 amplifies
    the difference of two fp16 predictions, so the reference is the fp32 teacher: the compiled fp16
    teacher must be as close to it as the eager fp16 teacher is (within 1.5× of eager's error, plus
    1e-3 for rounding)."""
    from carv3d.teacher import load_teacher

    eager, _ = teachers
    exact = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path), cuda_graph="off", dtype="float32"), "cuda")
    compiled = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path), cuda_graph="on", compile=mode,
                                                   compile_after=0), "cuda")
    assert compiled.fast.compile == mode and compiled.fast.cuda_graph

    def close_as_eager(got, eager_value, exact_value):
        return _relative_error(got, exact_value) <= 1.5 * _relative_error(eager_value, exact_value) + 1e-3

    for n, seed in ((2, 0), (2, 1)):
        x_t, t, cond = _inputs(eager, n, seed)
        predictions = [teacher.predict_noise(x_t, t, cond if teacher is not exact else
                                             exact.conditioning(exact.embed("a red cube"), ["front"] * n),
                                             guidance_scale=7.5) for teacher in (eager, compiled, exact)]
        assert close_as_eager(predictions[1], predictions[0], predictions[2]), seed
    image = torch.rand(2, 3, 32, 32, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    outs, grads = [], []
    for teacher in (eager, compiled, exact):
        for _ in range(2):  # the second call runs the already-compiled graph
            x = image.clone().requires_grad_(True)
            latents = teacher.encode(x)
            (latents * torch.linspace(-1, 1, latents.numel(), device="cuda").view_as(latents)).sum().backward()
        outs.append(latents.detach())
        grads.append(x.grad)
    assert close_as_eager(outs[1], outs[0], outs[2])
    assert close_as_eager(grads[1], grads[0], grads[2])


def test_a_shape_switches_from_its_eager_graph_to_its_compiled_graph_after_compile_after_calls(teachers, tiny_sd_path):
    """teacher.compile_after: a shape's first calls replay the eager U-Net's CUDA graph, later ones the
    compiled U-Net's, recorded anew; the eager graph of that shape is dropped. Every prediction stays
    as close to the fp32 teacher as the eager fp16 teacher's."""
    from carv3d.teacher import load_teacher
    from carv3d.teacher.compiling import CompileWhenSettled

    eager, _ = teachers
    exact = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path), cuda_graph="off", dtype="float32"), "cuda")
    settled = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path), cuda_graph="on", compile="full",
                                                  compile_after=2), "cuda")
    call = settled._unet_call
    assert isinstance(call, CompileWhenSettled)
    x_t, t, cond = _inputs(eager, 2, 0)
    want = exact.predict_noise(x_t, t, exact.conditioning(exact.embed("a red cube"), ["front"] * 2), guidance_scale=7.5)
    reference = eager.predict_noise(x_t, t, cond, guidance_scale=7.5)
    for i in range(4):
        got = settled.predict_noise(x_t, t, cond, guidance_scale=7.5)
        assert _relative_error(got, want) <= 1.5 * _relative_error(reference, want) + 1e-3, i
        if i == 1:
            assert len(call.early.graphs) == 1 and not call.late.graphs      # two eager replays so far
    assert not call.early.graphs and len(call.late.graphs) == 1              # switched, the eager graph dropped
    assert call.early.replays == 2 and call.late.replays == 2 and not call.late.failed


def _trainer(tiny_sd_path, tmp_path, fast: bool, teacher=None):
    from carv3d.train import Trainer

    switch = "on" if fast else "off"
    cfg = load_config(overrides=[
        f"teacher.pretrained={tiny_sd_path}", "train.device=cuda", "render.sampler=stratified",
        "render.width=32", "render.height=32", "render.samples_per_ray=32", "scene.grid.n_levels=8",
        "scene.grid.log2_hashmap_size=15", "estimator.noise_draws=4", "train.progress=false",
        "train.tensorboard=false", f"teacher.cuda_graph={switch}", f"teacher.channels_last={switch}",
        f"train.sync_free={switch}", f"train.output_dir={tmp_path}",
    ], prompt="a red cube")
    return Trainer(cfg, teacher=teacher)


def test_training_step_gradient_fast_matches_eager(tiny_sd_path, tmp_path, teachers):
    eager_teacher, fast_teacher = teachers
    eager = _trainer(tiny_sd_path, tmp_path, fast=False, teacher=eager_teacher)
    fast = _trainer(tiny_sd_path, tmp_path, fast=True, teacher=fast_teacher)
    assert fast.sync_free and not eager.sync_free
    # One step (same scene, same draws): later steps would compare Adam's amplification of rounding
    # differences in near-zero gradients, not the fast paths. .grad holds the step's gradient.
    eager.train_step()
    fast.train_step()
    for (name, a), (_, b) in zip(eager.scene.named_parameters(), fast.scene.named_parameters()):
        ga, gb = a.grad.flatten().float(), b.grad.flatten().float()
        cosine = float(torch.nn.functional.cosine_similarity(ga, gb, dim=0))
        # The teacher runs in fp16 and guidance 7.5 multiplies the rounding differences of ε_c − ε_u:
        # on the H200 the closest parameters agreed to cosine 1.000 and the worst (an MLP bias summed
        # over every sample) to 0.996.
        assert cosine > 0.99, (name, cosine)
        assert abs(float(gb.norm() / ga.norm()) - 1.0) < 0.05, name
    assert fast.guard.total() == eager.guard.total() == 0


def test_sync_free_step_does_not_synchronise(tiny_sd_path, tmp_path, teachers):
    """After warm-up, a sync-free step with the stratified sampler makes no blocking CUDA call.

    ``torch.cuda.set_sync_debug_mode("warn")`` warns at every synchronising call (``.item()``, a
    blocking copy to the host, ``nonzero``...). The occupancy-grid sampler is excluded: nerfacc's
    packed sampling sizes its output on the host.
    """
    _, fast_teacher = teachers
    trainer = _trainer(tiny_sd_path, tmp_path, fast=True, teacher=fast_teacher)
    for _ in range(3):
        trainer.train_step()  # captures, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] + f" ({w.filename}:{w.lineno})" for w in caught
             if "synchroniz" in str(w.message).lower()]
    assert not syncs, "synchronising calls in a sync-free step:\n" + "\n".join(syncs)


def test_step_timer_events_agree_with_a_synchronised_clock():
    """StepTimer's CUDA events (read lazily) against perf_counter around the same work, synchronised."""
    import time

    from carv3d.estimator.timing import StepTimer

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    events, clock = StepTimer("cuda"), 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with events("matmul"):
            for _ in range(20):
                a @ a
        torch.cuda.synchronize()
        clock += time.perf_counter() - started
    assert events.use_events
    assert events.seconds("matmul") == pytest.approx(clock, rel=0.2)


def test_branch_predictions_through_the_cuda_graph_match_eager(teachers):
    """CSD's teacher call (predict_noise_branches) replays the same captured U-Net as SDS's guided one."""
    eager, fast = teachers
    for n, seed in ((3, 10), (3, 11)):
        x_t, t, cond = _inputs(eager, n, seed)
        want_u, want_c = eager.predict_noise_branches(x_t, t, cond)
        got_u, got_c = fast.predict_noise_branches(x_t, t, cond)
        assert _relative_error(got_u, want_u) < 1e-2 and _relative_error(got_c, want_c) < 1e-2
        guided = fast.predict_noise(x_t, t, cond, guidance_scale=7.5)
        assert _relative_error(guided, got_u + 7.5 * (got_c - got_u)) < 1e-2


def test_wide_head_math_kernel_matches_sdpa_in_half_precision_values_and_gradients():
    # Stable Diffusion's VAE encoder (random weights) at 256 px: its 512-channel head on CUDA in fp16
    # through SDPA's math kernel (what the teacher uses) against SDPA's own choice (the generic
    # memory-efficient kernel), both against an fp32 reference.
    from diffusers.models.attention_processor import AttnProcessor2_0

    from carv3d.teacher.attention import MathSDPAttnProcessor, wide_head_attention_layers
    from carv3d.testing.random_sd import make_vae

    torch.manual_seed(0)
    vae = make_vae().eval().requires_grad_(False).cuda()
    (layer,) = wide_head_attention_layers(vae.encoder)
    pixels = torch.rand(1, 3, 256, 256, device="cuda") * 2 - 1
    weights = torch.randn(1, 8, 32, 32, device="cuda")

    def encode(dtype, processor):
        vae.to(dtype)
        layer.set_processor(processor)
        x = pixels.to(dtype).detach().requires_grad_(True)  # a leaf in every dtype (fp32 .to() is a no-op)
        out = vae.encoder(x)
        (out.float() * weights).sum().backward()
        return out.float(), x.grad.float()

    reference = encode(torch.float32, AttnProcessor2_0())
    for processor in (AttnProcessor2_0(), MathSDPAttnProcessor()):
        out, grad = encode(torch.float16, processor)
        assert _relative_error(out, reference[0]) < 1e-2, type(processor).__name__
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference[1].flatten(), dim=0)
        assert cosine > 0.999 and abs(float(grad.norm() / reference[1].norm()) - 1) < 0.02, type(processor).__name__

