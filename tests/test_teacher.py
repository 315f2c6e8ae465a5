"""carv3d.teacher: loading, text embeddings, encode/decode, guided noise prediction, clear errors.

References are computed another way: with diffusers' own StableDiffusionPipeline (loaded by
diffusers' pipeline loader, not carv3d's), with direct U-Net/VAE calls, with closed forms, with a
hand-built bilinear interpolation matrix and with finite differences.

Tolerances: the tiny teacher runs in float32 on CPU. Where carv3d batches differently from the
reference (6 prompts per text-encoder call vs 1, 2M rows per U-Net call vs M), BLAS kernels may
sum in a different order, so results agree to float32 rounding (atol 1e-5 on O(1) values), not bit
for bit; where the computation is the same, equality is exact.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from carv3d.config import DiffusersTeacherConfig
from carv3d.errors import PromptError, TeacherWeightsError
from carv3d.teacher import (
    VIEW_SUFFIXES,
    VOCABULARY_FILE,
    DiffusersTeacher,
    Teacher,
    load_teacher,
    model_output_to_noise,
    resolve_teacher_path,
    write_word_level_clip_tokenizer,
)
from carv3d.teacher import loading
from carv3d.testing.tiny_teachers import make_tiny_stable_diffusion_pipeline

PROMPT, NEGATIVE = "a red cube", "blue"
F32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reloaded_pipe(tiny_sd_path: Path, monkeypatch_module):
    """The saved tiny pipeline reloaded by diffusers' own pipeline loader, offline."""
    from diffusers import StableDiffusionPipeline

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return StableDiffusionPipeline.from_pretrained(tiny_sd_path, local_files_only=True, use_safetensors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation, half-pixel centres (align_corners=False):
    output i samples the input at s = (i + ½)·n_in/n_out − ½, clamped to [0, n_in − 1]."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        s = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1.0)
        lo = int(s)
        hi = min(lo + 1, n_in - 1)
        matrix[i, lo] += 1.0 - (s - lo)
        matrix[i, hi] += s - lo
    return matrix


def _resize_by_matrix(images: torch.Tensor, size: int) -> torch.Tensor:
    rows = _bilinear_matrix(images.shape[-2], size)
    cols = _bilinear_matrix(images.shape[-1], size)
    return (rows @ images.double() @ cols.T).float()


# ------------------------------------------------------------------------------------ tokenizer
EMBEDDED_WORDS = (
    "a", ",", "red", "orange", "yellow", "green", "blue", "purple", "white", "black",
    "sphere", "cube", "torus", "cone", "cylinder", "house", "snowman", "pyramid", "ring", "capsule",
    "front", "side", "back", "overhead", "view", "small", "large", "of", "the", "and",
)


def test_word_level_tokenizer_gives_one_token_per_word(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = write_word_level_clip_tokenizer(EMBEDDED_WORDS, tmp_path / "tok")
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in EMBEDDED_WORDS]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(EMBEDDED_WORDS)  # distinct tokens
    assert tokenizer.convert_ids_to_tokens([i[0] for i in ids[:3]]) == ["a</w>", ",</w>", "red</w>"]

    sentence = tokenizer("A Red cube, front view").input_ids  # lower-cased like CLIP
    expected = [tokenizer.bos_token_id] + [tokenizer.convert_tokens_to_ids(w + "</w>")
                                           for w in ("a", "red", "cube", ",", "front", "view")]
    assert sentence == expected + [tokenizer.eos_token_id]
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert reloaded("a red cube, front view").input_ids == sentence
    assert reloaded.model_max_length == 77

    # Words outside the vocabulary fall back to byte tokens (no <unk>) and decode back.
    dragon = tokenizer("dragon!", add_special_tokens=False).input_ids
    assert len(dragon) > 2 and tokenizer.decode(dragon) == "dragon !"
    with pytest.raises(ValueError, match="t-shirt"):
        write_word_level_clip_tokenizer(["t-shirt"], tmp_path / "bad")


# --------------------------------------------------------------------------- building and loading
def test_tiny_pipeline_is_seeded_and_reloads_bit_identically(reloaded_pipe) -> None:
    memory = make_tiny_stable_diffusion_pipeline(seed=0)
    for name in ("unet", "vae", "text_encoder"):
        saved, fresh = getattr(reloaded_pipe, name).state_dict(), getattr(memory, name).state_dict()
        assert saved.keys() == fresh.keys()
        assert all(torch.equal(saved[k], fresh[k]) for k in saved), name

    g = _generator(1)
    x, text = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g)
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        out_saved = reloaded_pipe.unet(x, t, encoder_hidden_states=text).sample
        out_memory = memory.unet(x, t, encoder_hidden_states=text).sample
        out_other_seed = make_tiny_stable_diffusion_pipeline(seed=1).unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(out_saved, out_memory)
    assert (out_saved - out_other_seed).abs().max() > 1e-3


def test_load_teacher_matches_diffusers_pipeline(tiny_teacher, reloaded_pipe) -> None:
    assert isinstance(tiny_teacher, Teacher)
    assert tiny_teacher.dtype == torch.float32 and tiny_teacher.device.type == "cpu"
    assert tiny_teacher.image_size == 64 and tiny_teacher.latent_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in tiny_teacher.unet.parameters())

    emb = tiny_teacher.embed(PROMPT, NEGATIVE)
    cond_ref, uncond_ref = reloaded_pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE)
    front_ref, _ = reloaded_pipe.encode_prompt(PROMPT + ", front view", "cpu", 1, False)
    assert_close(emb.plain, cond_ref[0], **F32)
    assert_close(emb.uncond, uncond_ref[0], **F32)
    assert_close(emb.by_view["front"], front_ref[0], **F32)

    # CFG against two separate U-Net calls of diffusers' pipeline: ε̂ = ε_u + s(ε_c − ε_u).
    g = _generator(2)
    m, scale = 5, 7.5
    x_t = torch.randn(m, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (m,), generator=g)
    labels = ["front", None, "back", "front", "side"]
    with torch.no_grad():
        cond_rows = torch.stack([emb.plain if v is None else
                                 reloaded_pipe.encode_prompt(PROMPT + VIEW_SUFFIXES[v], "cpu", 1, False)[0][0]
                                 for v in labels])
        eps_c = reloaded_pipe.unet(x_t, t, encoder_hidden_states=cond_rows).sample
        eps_u = reloaded_pipe.unet(x_t, t, encoder_hidden_states=uncond_ref.expand(m, -1, -1)).sample
    expected = eps_u + scale * (eps_c - eps_u)
    got = tiny_teacher.predict_noise(x_t, t, tiny_teacher.conditioning(emb, labels), scale)
    assert got.dtype == torch.float32 and got.shape == (m, 4, 8, 8)
    assert_close(got, expected, rtol=1e-4, atol=1e-4)  # s = 7.5 amplifies the 1e-5 differences


def test_predict_noise_chunks_into_one_call_per_max_batch(tiny_teacher, monkeypatch) -> None:
    emb = tiny_teacher.embed(PROMPT)
    g = _generator(3)
    m = 7
    x_t = torch.randn(m, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (m,), generator=g)
    cond = tiny_teacher.conditioning(emb, ["front", "side", "back", "overhead", None, "side", "front"])
    scale = 100.0
    whole = tiny_teacher.predict_noise(x_t, t, cond, scale)

    batches: list[int] = []
    forward = tiny_teacher.unet.forward

    def counting_forward(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(tiny_teacher.unet, "forward", counting_forward)
    monkeypatch.setattr(tiny_teacher, "max_batch", 3)
    chunked = tiny_teacher.predict_noise(x_t, t, cond, scale)
    assert batches == [6, 6, 2]  # [x; x] per chunk of ≤ 3 samples
    # Each branch may differ by float32 rounding δ ≈ 2e-6 between batch sizes; guidance turns that
    # into at most (1 + 2s)·δ.
    assert_close(chunked, whole, rtol=0, atol=(1 + 2 * scale) * 2e-6)

    # s = 1 is the conditional model alone: one half-size call, ε̂ = ε_c.
    batches.clear()
    monkeypatch.setattr(tiny_teacher, "max_batch", 32)
    plain = tiny_teacher.predict_noise(x_t, t, cond, 1.0)
    with torch.no_grad():
        eps_c = forward(x_t, t, encoder_hidden_states=cond.cond).sample
    assert batches == [m]
    assert_close(plain, eps_c, **F32)


def test_conditioning_select_and_view_embeddings(tiny_teacher) -> None:
    emb = tiny_teacher.embed(PROMPT, NEGATIVE)
    assert tiny_teacher.embed(PROMPT, NEGATIVE) is emb  # cached
    assert tiny_teacher.embed("  " + PROMPT + " ", NEGATIVE) is emb  # surrounding whitespace ignored
    assert tiny_teacher.embed(PROMPT, "") is not emb
    assert emb.texts["back"] == "a red cube, back view"
    variants = [emb.plain] + [emb.by_view[v] for v in ("front", "side", "back", "overhead")]
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            assert (variants[i] - variants[j]).abs().max() > 1e-4

    labels = ["front", "back", "side"]
    cond = tiny_teacher.conditioning(emb, labels)
    index = torch.arange(3).repeat_interleave(2)  # each render's cond for K = 2 draws
    picked = cond.select(index)
    assert len(picked) == 6
    for row, render in enumerate(index.tolist()):
        assert torch.equal(picked.cond[row], emb.by_view[labels[render]])
        assert torch.equal(picked.uncond[row], emb.uncond)

    flat = tiny_teacher.embed(PROMPT, NEGATIVE, view_dependent=False)
    assert flat.by_view == {}
    assert all(torch.equal(row, flat.plain) for row in tiny_teacher.conditioning(flat, labels).cond)
    with pytest.raises(ValueError, match="unknown view label"):
        tiny_teacher.conditioning(emb, ["upside-down"])


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_is_a_prompt_error(tiny_teacher, prompt: str) -> None:
    with pytest.raises(PromptError, match="prompt is empty"):
        tiny_teacher.embed(prompt)


def test_closed_vocabulary_lists_known_words(tiny_pixel_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "closed"
    shutil.copytree(tiny_pixel_path, folder)
    vocabulary = {"objects": ["cube", "sphere"], "colours": ["red", "blue"], "views": ["front", "side"]}
    (folder / VOCABULARY_FILE).write_text(json.dumps(vocabulary))
    teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(folder)), device="cpu")

    assert teacher.embed("A red cube, front view").prompt == "A red cube, front view"
    with pytest.raises(PromptError) as err:
        teacher.embed("a purple dragon")
    message = str(err.value)
    for word in ("purple", "dragon", "cube", "sphere", "red", "blue", "configs/sd21.yaml", "configs/sd15.yaml"):
        assert word in message
    with pytest.raises(PromptError, match="negative prompt.*blurry"):
        teacher.embed("a red cube", negative_prompt="blurry")
    with pytest.raises(PromptError, match="'a red' names no object.*Known objects: cube, sphere"):
        teacher.embed("a red")
    assert teacher.embed("a red cube", negative_prompt="blue").negative_prompt == "blue"  # no object needed
    # It learnt one object per image: two objects in one prompt would train neither.
    with pytest.raises(PromptError, match=r"'a red cube, a blue sphere' names 2 objects \(cube, sphere\).*one run per object"):
        teacher.embed("a red cube, a blue sphere")
    assert teacher.embed("a red cube, cube!").prompt == "a red cube, cube!"  # one object, said twice
    assert teacher.embed("a blue cube", negative_prompt="a red cube, a blue sphere").negative_prompt  # any number there
    # A symbol is a word it does not know, not punctuation that parsing drops.
    for prompt, symbol in (("a red \N{LARGE RED SQUARE} cube", "\N{LARGE RED SQUARE}"), ("a red cube \u2665", "\u2665"),
                           ("a red cube + a sphere", "+")):
        with pytest.raises(PromptError, match=f"unknown word\\(s\\): {re.escape(symbol)}"):
            teacher.embed(prompt)
    assert teacher.embed("A red cube, front view!?").prompt == "A red cube, front view!?"  # punctuation is fine


# -------------------------------------------------------------------------------- images
def test_encode_and_decode_match_the_vae(tiny_teacher, reloaded_pipe) -> None:
    vae, processor = reloaded_pipe.vae, reloaded_pipe.image_processor
    scale = vae.config.scaling_factor
    images = torch.rand(2, 3, 64, 64, generator=_generator(4))
    with torch.no_grad():
        expected = vae.encode(processor.preprocess(images)).latent_dist.mode() * scale
        latents = tiny_teacher.encode(images)
    assert latents.dtype == torch.float32 and latents.shape == (2, *tiny_teacher.latent_shape)
    assert_close(latents, expected, **F32)

    small = torch.rand(2, 3, 32, 32, generator=_generator(5))  # upsampled to the teacher's 64 px
    with torch.no_grad():
        expected_small = vae.encode(_resize_by_matrix(small, 64) * 2 - 1).latent_dist.mean * scale
    assert_close(tiny_teacher.encode(small), expected_small, **F32)

    with torch.no_grad():
        decoded_ref = processor.postprocess(vae.decode(latents / scale).sample, output_type="pt")
    assert_close(tiny_teacher.decode(latents), decoded_ref, **F32)


def test_pixel_teacher_encode_is_the_signed_image(tiny_pixel_teacher) -> None:
    teacher = tiny_pixel_teacher
    assert teacher.vae is None and teacher.image_size == 16 and teacher.latent_shape == (3, 16, 16)
    images = torch.rand(3, 3, 16, 16, generator=_generator(6))
    assert torch.equal(teacher.encode(images), images * 2 - 1)
    assert_close(teacher.decode(teacher.encode(images)), images, rtol=0, atol=1e-6)
    small = torch.rand(2, 3, 8, 8, generator=_generator(7))
    assert_close(teacher.encode(small), _resize_by_matrix(small, 16) * 2 - 1, **F32)
    big = torch.full((1, 3, 64, 64), 0.3)  # antialiased shrinking keeps a constant image constant
    assert_close(teacher.encode(big), torch.full((1, 3, 16, 16), -0.4), rtol=0, atol=1e-6)
    eps = teacher.predict_noise(teacher.encode(images), torch.tensor([5, 500, 995]),
                                teacher.conditioning(teacher.embed("a cube"), ["front"] * 3), 3.0)
    assert eps.shape == (3, 3, 16, 16) and torch.isfinite(eps).all()


def test_encode_gradient_matches_finite_differences(tiny_sd_path: Path, tiny_teacher) -> None:
    """Central differences in float64 (step 1e-4, error O(h²) ≈ 1e-8) on single pixels, through
    the resize (32 → 64 px) and the VAE encoder; the float32 teacher's gradient agrees to fp32 noise."""
    teacher64 = DiffusersTeacher.from_folder(tiny_sd_path, device="cpu", dtype=torch.float64)
    images = torch.rand(1, 3, 32, 32, generator=_generator(8), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, *teacher64.latent_shape, generator=_generator(9), dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (teacher64.encode(x) * weights).sum()

    (grad,) = torch.autograd.grad(loss(images), images)
    assert grad.abs().gt(0).float().mean() > 0.9
    h = 1e-4
    for pixel in [(0, 0, 0, 0), (0, 1, 13, 7), (0, 2, 31, 20)]:
        bump = torch.zeros_like(images)
        bump[pixel] = h
        with torch.no_grad():
            finite = (loss(images + bump) - loss(images - bump)) / (2 * h)
        assert_close(grad[pixel], finite, rtol=1e-5, atol=1e-9)

    images32 = images.detach().float().requires_grad_(True)
    (grad32,) = torch.autograd.grad((tiny_teacher.encode(images32) * weights.float()).sum(), images32)
    assert_close(grad32.double(), grad, rtol=1e-3, atol=1e-6)


# ------------------------------------------------------------------------------- schedule
def test_alphas_cumprod_is_the_scaled_linear_closed_form(tiny_teacher) -> None:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, dim=0)
    assert tiny_teacher.num_train_timesteps == 1000
    assert tiny_teacher.alphas_cumprod.dtype == torch.float32
    assert_close(tiny_teacher.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_model_output_to_noise_inverts_each_parameterisation(prediction_type: str) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = _generator(10)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    output = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    recovered = model_output_to_noise(output, x_t, scheduler.alphas_cumprod[t], prediction_type)
    assert_close(recovered, noise, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ missing weights
def test_missing_folders_say_what_is_missing(tmp_path: Path, tiny_sd_path: Path) -> None:
    with pytest.raises(TeacherWeightsError, match="does not exist") as err:
        resolve_teacher_path(str(tmp_path / "no" / "such" / "teacher"))
    assert str(tmp_path / "no" / "such" / "teacher") in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TeacherWeightsError, match="neither model_index.json nor unet/") as err:
        load_teacher(DiffusersTeacherConfig(pretrained=str(empty)), device="cpu")
    assert str(empty) in str(err.value)

    no_unet = tmp_path / "no_unet"
    shutil.copytree(tiny_sd_path, no_unet)
    shutil.rmtree(no_unet / "unet")
    with pytest.raises(TeacherWeightsError, match=r"is missing unet/"):
        load_teacher(DiffusersTeacherConfig(pretrained=str(no_unet)), device="cpu")
    shutil.copytree(tiny_sd_path / "unet", no_unet / "unet")
    shutil.rmtree(no_unet / "vae")  # model_index.json lists a VAE: not a pixel-space teacher
    with pytest.raises(TeacherWeightsError, match=r"is missing vae/ \(model_index.json lists a vae\)"):
        load_teacher(DiffusersTeacherConfig(pretrained=str(no_unet)), device="cpu")


def test_corrupted_and_pickle_only_folders_are_clear_errors(tmp_path: Path, tiny_sd_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_path, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(TeacherWeightsError, match="could not load the teacher's U-Net") as err:
        load_teacher(DiffusersTeacherConfig(pretrained=str(broken)), device="cpu")
    assert str(broken / "unet") in str(err.value)

    weights.rename(weights.with_suffix(".bin"))  # a name only: nothing is ever unpickled
    with pytest.raises(TeacherWeightsError, match="only pickled weights.*safetensors"):
        load_teacher(DiffusersTeacherConfig(pretrained=str(broken)), device="cpu")


def test_hf_repo_ids_are_looked_up_only_in_the_local_cache(tmp_path: Path, tiny_pixel_path: Path,
                                                           monkeypatch) -> None:
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    cache = tmp_path / "hf_home" / "hub"
    with pytest.raises(TeacherWeightsError) as err:
        load_teacher(DiffusersTeacherConfig(pretrained="carv3d-test/not-cached"), device="cpu")
    message = str(err.value)
    for needle in (str(cache), "HF_HOME", "hf download carv3d-test/not-cached",
                   "teacher.pretrained=/path/to/folder"):
        assert needle in message

    # The layout huggingface_hub writes: refs/main names the snapshot folder.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--carv3d-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_pixel_path, repo / "snapshots" / commit)
    assert resolve_teacher_path("carv3d-test/tiny") == repo / "snapshots" / commit
    teacher = load_teacher(DiffusersTeacherConfig(pretrained="carv3d-test/tiny"), device="cpu")
    assert teacher.latent_shape == (3, 16, 16)


def test_missing_embedded_teacher_says_how_to_build_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(loading, "embedded_teacher_candidates", lambda: [tmp_path / "assets" / "embedded_teacher"])
    with pytest.raises(TeacherWeightsError, match="not built yet") as err:
        resolve_teacher_path("embedded")
    assert "scripts/train_embedded_teacher.py" in str(err.value)
    assert str(tmp_path / "assets" / "embedded_teacher") in str(err.value)


# ------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_teacher_runs_in_fp16_and_agrees_with_fp32(tiny_sd_path: Path, tiny_teacher) -> None:
    """dtype=auto on CUDA is fp16; outputs are float32 and agree with the fp32 CPU teacher to fp16
    precision: relative error of the whole tensor below 1e-2 (fp16's step is 1e-3, accumulated over
    ~20 layers), and below (1 + 2s)·5e-3 with guidance s, which scales each branch's error by s."""
    teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(tiny_sd_path)), device="cuda")
    assert teacher.dtype == torch.float16 and teacher.unet.dtype == torch.float16
    assert teacher.alphas_cumprod.dtype == torch.float32 and teacher.alphas_cumprod.is_cuda

    def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.cpu() - b).norm() / b.norm())

    images = torch.rand(3, 3, 48, 48, generator=_generator(11))
    pixels = images.cuda().requires_grad_(True)
    x = teacher.encode(pixels)
    assert x.dtype == torch.float32 and x.is_cuda
    assert relative_error(x.detach(), tiny_teacher.encode(images)) < 1e-2
    (grad,) = torch.autograd.grad((x * x.detach()).sum(), pixels)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0

    labels = ["front", "side", "back"]
    t = torch.tensor([20, 500, 980])
    x_t = torch.randn(3, 4, 8, 8, generator=_generator(12))
    for scale in (1.0, 7.5):
        eps = teacher.predict_noise(x_t.cuda(), t.cuda(), teacher.conditioning(teacher.embed(PROMPT), labels), scale)
        reference = tiny_teacher.predict_noise(
            x_t, t, tiny_teacher.conditioning(tiny_teacher.embed(PROMPT), labels), scale)
        assert eps.dtype == torch.float32 and eps.is_cuda
        error = relative_error(eps, reference)
        print(f"fp16 vs fp32 relative error at s={scale}: {error:.2e}")
        assert error < (1e-2 if scale == 1.0 else (1 + 2 * scale) * 5e-3)


# ------------------------------------------------------------------ the teacher seam: branches, channels
def test_guided_prediction_is_the_guidance_of_the_branches(tiny_teacher):
    """predict_noise = ε_u + s·(ε_c − ε_u) of predict_noise_branches' two predictions (one call each)."""
    embedding = tiny_teacher.embed("a red cube")
    cond = tiny_teacher.conditioning(embedding, ["front", "side", "back"])
    x_t = torch.randn(3, *tiny_teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([50, 400, 900])
    uncond, conditional = tiny_teacher.predict_noise_branches(x_t, t, cond)
    guided = tiny_teacher.predict_noise(x_t, t, cond, 7.5)
    torch.testing.assert_close(guided, uncond + 7.5 * (conditional - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(uncond, conditional)  # the text changes the prediction
    torch.testing.assert_close(tiny_teacher.predict_noise(x_t, t, cond, 1.0), conditional)


def test_conditioning_carries_camera_poses_row_by_row(tiny_teacher):
    embedding = tiny_teacher.embed("a red cube")
    poses = torch.arange(2 * 16, dtype=torch.float32).view(2, 4, 4)
    cond = tiny_teacher.conditioning(embedding, ["front", "back"], poses)
    picked = cond.select(torch.tensor([1, 1, 0]))
    assert torch.equal(picked.cameras, poses[[1, 1, 0]])
    assert torch.equal(picked.cond, cond.cond[[1, 1, 0]])


def test_a_teacher_that_also_predicts_its_variance_returns_the_noise_half(tmp_path):
    """DeepFloyd IF's U-Net outputs 2·C channels (ε, then the variance): ε̂ keeps x's C channels,
    equal to the first C channels of the raw U-Net output."""
    from carv3d.testing.tiny_teachers import build_tiny_pixel_teacher

    folder = build_tiny_pixel_teacher(tmp_path / "if_like", seed=0, image_size=16, out_channels=6)
    teacher = load_teacher(DiffusersTeacherConfig(pretrained=str(folder)), device="cpu")
    assert teacher.unet.config.out_channels == 6 and teacher.latent_shape == (3, 16, 16)
    cond = teacher.conditioning(teacher.embed("a red cube"), ["front"])
    x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([300])
    eps = teacher.predict_noise(x_t, t, cond, 1.0)
    raw = teacher.unet(x_t, t, encoder_hidden_states=cond.cond).sample
    assert eps.shape == x_t.shape
    torch.testing.assert_close(eps, raw[:, :3])


def test_the_download_command_we_print_is_the_installed_huggingface_hub_cli() -> None:
    from importlib.metadata import entry_points

    from carv3d.teacher import folder

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("hf", "").startswith("huggingface_hub"), "huggingface_hub no longer installs `hf`"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for text in (loading._POINT_AT_WEIGHTS, folder._refetch_hint(), readme):
        assert "huggingface-cli" not in text
    assert "`hf download {repo}`" in loading._POINT_AT_WEIGHTS and "hf download stabilityai/" in readme
