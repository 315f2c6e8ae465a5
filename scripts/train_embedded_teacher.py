#!/usr/bin/env python
"""Train carv3d's embedded teacher: a small pixel-space text-to-image diffusion model of the world.

The world (:mod:`carv3d.world`) is rendered from random cameras; each image gets the prompt
``"a {colour} {object}, {view} view"`` with the view word from carv3d's one rule
(:func:`carv3d.cameras.view_label`). The model is a diffusers ``UNet2DConditionModel`` on
32 × 32 RGB in [−1, 1] with a small ``CLIPTextModel`` trained jointly from scratch, v-prediction on
DDPM's linear schedule (β from 1e-4 to 0.02 over T = 1000 steps):

    x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε,   v = √ᾱ_t ε − √(1 − ᾱ_t) x₀,
    loss = E ‖v_θ(x_t, t, E(prompt)) − v‖²,   t ~ U{0, …, T−1}.

The noise prediction carv3d uses is ``ε̂ = √(1 − ᾱ) x_t + √ᾱ v̂`` (so ``ε̂ − ε = √ᾱ (v̂ − v)``), and
``x̂₀ = √ᾱ x_t − √(1 − ᾱ) v̂``. v-prediction rather than ε: at large t an ε-network must output
``x_t / √(1 − ᾱ)`` almost exactly and carries x̂₀ only in a small correction, while a v-network predicts
x̂₀ directly there; score distillation samples t up to 0.98 T, where that precision matters.

Prompts are dropped to "" with probability 0.1 (the unconditional branch of classifier-free
guidance, ``ε̂ = ε_u + s (ε_c − ε_u)``) and lose their view suffix with probability 0.1 (so plain
prompts work too). The text reaches the U-Net twice: through cross-attention at 8 and 4 px and,
pooled by attention, added to the timestep embedding (diffusers' ``addition_embed_type="text"``),
which scales and shifts every ResNet block (``resnet_time_scale_shift="scale_shift"``): the view
word conditions the whole network, not only a few attention layers.

World renders are traced once, before training, as material weights (see
:mod:`carv3d.world.raytrace`) and recoloured on the fly, so every batch draws fresh colours.
The weights kept are an exponential moving average ``θ̄ ← d θ̄ + (1 − d) θ`` of the trained ones.

Outputs (a diffusers folder that carv3d loads like Stable Diffusion, minus the VAE): unet/,
text_encoder/ (safetensors), tokenizer/, scheduler/, model_index.json, carv3d_vocabulary.json,
MODEL_CARD.md, samples.png (DDIM samples next to ground truth) and train_log.json (losses,
denoising errors, timings, the command). The folder is built under a temporary name and renamed at
the end, so an interrupted run leaves no half-written teacher.

Examples:
    python scripts/train_embedded_teacher.py --preset cpu                 # ~2 min smoke test → runs/
    python scripts/train_embedded_teacher.py --preset cuda --output assets/embedded_teacher
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import struct
import sys
import time
import types
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runs from a checkout without `pip install -e .` (the GPU machine)
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

Tensor = torch.Tensor
RESOLUTION = 32
MAX_TOKENS = 16  # text positions; the longest prompt ("an orange mushroom, overhead view") uses 8
P_UNCOND, P_NO_VIEW = 0.1, 0.1
EVAL_TIMESTEPS = (200, 500, 800)
SAMPLE_GUIDANCE = 2.0
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS, projection_dim=64)
UNET_CONFIG = dict(
    sample_size=RESOLUTION, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 24, 48, 96),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_CONFIG["hidden_size"], attention_head_dim=4, norm_num_groups=8,
    addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift",
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        prediction_type="v_prediction", clip_sample=True, timestep_spacing="trailing")


@dataclass(frozen=True)
class Preset:
    """Everything that differs between the CPU smoke test and the GPU run."""

    renders_per_object: int  # training cameras per object (colours are drawn per batch)
    eval_renders_per_object: int  # fresh cameras for the final denoising errors
    supersample: int  # s × s rays per pixel
    trace_steps: int
    render_chunk: int  # cameras per render call
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    ema_decay: float
    log_every: int
    max_train_seconds: float  # safety net: stop early (and say so) if the steps take longer
    sample_rows: str  # "all": every object × (front, back); "few": four rows
    sample_columns: int
    sample_ddim_steps: int


PRESETS: dict[str, Preset] = {
    "cpu": Preset(renders_per_object=16, eval_renders_per_object=4, supersample=1, trace_steps=40, render_chunk=64,
                  batch_size=16, steps=40, lr=1e-3, warmup_steps=10, ema_decay=0.9, log_every=10,
                  max_train_seconds=45.0, sample_rows="few", sample_columns=2, sample_ddim_steps=6),
    "cuda": Preset(renders_per_object=8192, eval_renders_per_object=64, supersample=2, trace_steps=64,
                   render_chunk=2048, batch_size=1024, steps=4000, lr=1e-3, warmup_steps=300, ema_decay=0.999,
                   log_every=250, max_train_seconds=400.0, sample_rows="all", sample_columns=8, sample_ddim_steps=25),
}


# ------------------------------------------------------------------------------------------- imports
def import_world() -> types.ModuleType:
    """Import :mod:`carv3d.world`, also where nerfacc is not installed.

    carv3d.world needs only torch, but it imports ``carv3d.render.{cameras,rays,shading}``, and the
    package ``carv3d.render`` imports nerfacc in its ``__init__``. Without nerfacc, ``carv3d.render``
    is registered as a bare package (its submodules import normally; nothing else of it is used).
    """
    try:
        import carv3d.render  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "nerfacc":
            raise
        spec = importlib.util.find_spec("carv3d.render")
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType("carv3d.render")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["carv3d.render"] = package
        print("[teacher] nerfacc is not installed: using carv3d.render's submodules without its __init__")
    import carv3d.world as world

    return world


# ---------------------------------------------------------------------------------------------- data
@dataclass
class WorldImages:
    """Traced renders, not yet coloured. weights (N, M, R, R) and coverage (N, 1, R, R) in float16;
    objects, views (N,) indices into OBJECT_NAMES and VIEW_LABELS."""

    weights: Tensor
    coverage: Tensor
    objects: Tensor
    views: Tensor


def render_images(world: types.ModuleType, per_object: int, seed: int, preset: Preset, device: torch.device) -> WorldImages:
    """Trace ``per_object`` view-balanced cameras (seeded, drawn on CPU) of every object."""
    from carv3d.cameras import VIEW_LABELS

    generator = torch.Generator().manual_seed(seed)
    weights, coverage, objects, views = [], [], [], []
    for index, name in enumerate(world.OBJECT_NAMES):
        cameras, labels = world.sample_world_cameras(per_object, generator)
        for start in range(0, per_object, preset.render_chunk):
            chunk = cameras[start:start + preset.render_chunk].to(device)
            part = world.render_materials(name, chunk, RESOLUTION, RESOLUTION, preset.supersample, preset.trace_steps)
            weights.append(part.weights.half())
            coverage.append(part.coverage.half())
        objects.append(torch.full((per_object,), index, dtype=torch.long))
        views.append(torch.tensor([VIEW_LABELS.index(label) for label in labels]))
    return WorldImages(torch.cat(weights), torch.cat(coverage), torch.cat(objects).to(device), torch.cat(views).to(device))


class PromptTable:
    """Every training prompt, tokenized once (rows on ``device``).

    Row ``(c · O + o) · (V + 1) + v`` is colour c, object o and view v (``v = V``: no view suffix);
    the last row is the empty prompt "".
    """

    def __init__(self, world: types.ModuleType, tokenizer: Any, device: torch.device):
        from carv3d.cameras import VIEW_LABELS

        self.n_objects, self.n_views = len(world.OBJECT_NAMES), len(VIEW_LABELS)
        self.texts = [world.format_prompt(c, o, v) for c in world.COLOUR_NAMES for o in world.OBJECT_NAMES
                      for v in (*VIEW_LABELS, None)] + [""]
        self.empty = len(self.texts) - 1
        self.no_view = self.n_views
        tokens = tokenizer(self.texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        self.ids = tokens.input_ids.to(device)  # (P, L)

    def index(self, colour: Tensor, obj: Tensor, view: Tensor) -> Tensor:
        return (colour * self.n_objects + obj) * (self.n_views + 1) + view


def colour_images(images: WorldImages, index: Tensor, colour: Tensor, palette: Tensor) -> Tensor:
    """x₀ in [−1, 1], (B, 3, R, R), for images ``index`` painted in palette rows ``colour``."""
    from carv3d.world.raytrace import compose_rgb

    rgb = compose_rgb(images.weights[index].float(), images.coverage[index].float(), palette[colour])
    return rgb * 2.0 - 1.0


# --------------------------------------------------------------------------------------------- model
def build_models(tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """A fresh U-Net and text encoder, initialised from ``seed`` (the global RNG is left as it was)."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    return unet, text_encoder


def lr_at(step: int, preset: Preset, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5% of the peak as ``progress`` goes
    from the end of the warm-up to 1."""
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    warm = preset.warmup_steps / preset.steps
    fraction = min(1.0, max(0.0, (progress - warm) / max(1e-9, 1.0 - warm)))
    return preset.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * fraction)))


def train(unet: Any, text_encoder: Any, images: WorldImages, table: PromptTable, palette: Tensor,
          alphas_cumprod: Tensor, preset: Preset, seed: int, device: torch.device) -> dict[str, Any]:
    """The training loop (formulas in the module docstring); leaves the EMA weights in the models."""
    cuda = device.type == "cuda"
    unet.to(device).train()
    text_encoder.to(device).train()
    if cuda:
        unet.to(memory_format=torch.channels_last)
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=preset.lr, betas=(0.9, 0.99), weight_decay=0.01,
                                  **({"fused": True} if cuda else {}))
    ema = [p.detach().clone().float() for p in params]
    generator = torch.Generator(device).manual_seed(seed + 1)
    n_images, batch = images.objects.shape[0], preset.batch_size
    losses: list[list[float]] = []
    running, count = torch.zeros((), device=device), 0
    start, stopped_early, step = time.perf_counter(), False, 0
    for step in range(preset.steps):
        # The schedule runs on whichever ends first, the steps or the time budget (only a slow machine
        # hits the latter; then the run stops early with the learning rate annealed, and says so).
        progress = max(step / preset.steps, (time.perf_counter() - start) / preset.max_train_seconds)
        if progress >= 1.0:
            stopped_early = True
            print(f"[teacher] WARNING: the {preset.max_train_seconds:.0f} s budget ran out at step {step}", flush=True)
            break
        lr = lr_at(step, preset, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(n_images, (batch,), generator=generator, device=device)
        colour = torch.randint(palette.shape[0], (batch,), generator=generator, device=device)
        x0 = colour_images(images, index, colour, palette)
        u = torch.rand(batch, generator=generator, device=device)
        view = torch.where(u < P_UNCOND + P_NO_VIEW, torch.full_like(index, table.no_view), images.views[index])
        prompt = torch.where(u < P_UNCOND, torch.full_like(index, table.empty),
                             table.index(colour, images.objects[index], view))
        t = torch.randint(alphas_cumprod.shape[0], (batch,), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        target = a.sqrt() * noise - (1.0 - a).sqrt() * x0  # v
        if cuda:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            hidden = text_encoder(table.ids[prompt])[0]
            prediction = unet(x_t, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(preset.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in params],
                                 1.0 - decay)
        running += loss.detach()
        count += 1
        if (step + 1) % preset.log_every == 0 or step + 1 == preset.steps:
            mean_loss = float(running) / count  # the only host sync of the loop
            running.zero_()
            count = 0
            elapsed = time.perf_counter() - start
            losses.append([step + 1, mean_loss])
            rate = (step + 1) / elapsed
            print(f"[teacher] step {step + 1}/{preset.steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                  f"{rate * batch:.0f} img/s  {elapsed:.0f} s  eta {(preset.steps - step - 1) / rate:.0f} s", flush=True)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.to(memory_format=torch.contiguous_format)  # safetensors stores contiguous tensors only
    unet.eval()
    text_encoder.eval()
    return {"losses": losses, "steps_done": step + (0 if stopped_early else 1), "stopped_early": stopped_early,
            "train_seconds": time.perf_counter() - start, "final_loss": losses[-1][1] if losses else float("nan")}


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict_noise(unet: Any, text_encoder: Any, x_t: Tensor, t: Tensor, ids: Tensor, alphas_cumprod: Tensor,
                  chunk: int = 256) -> Tensor:
    """ε̂ = √(1 − ᾱ) x_t + √ᾱ v_θ(x_t, t, E(ids)) in float32, in chunks."""
    out = []
    for s in range(0, x_t.shape[0], chunk):
        hidden = text_encoder(ids[s:s + chunk])[0]
        out.append(unet(x_t[s:s + chunk], t[s:s + chunk], encoder_hidden_states=hidden).sample.float())
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return (1.0 - a).sqrt() * x_t + a.sqrt() * torch.cat(out)


@torch.no_grad()
def denoising_report(world: types.ModuleType, unet: Any, text_encoder: Any, images: WorldImages, table: PromptTable,
                     palette: Tensor, alphas_cumprod: Tensor, seed: int) -> dict[str, Any]:
    """Mean squared ε error on fresh images at t ∈ EVAL_TIMESTEPS: the teacher with the right prompt,
    with a wrong object, and (front/back images of objects whose front differs from their back) with
    the opposite view; against the best constant predictors: ε̂ = 0 (error E ε² ≈ 1) and the best
    constant image c = mean x₀, ε̂ = (x_t − √ᾱ c) / √(1 − ᾱ)."""
    from carv3d.cameras import VIEW_LABELS

    device = images.objects.device
    generator = torch.Generator(device).manual_seed(seed + 2)
    n = images.objects.shape[0]
    colour = torch.arange(n, device=device) % palette.shape[0]
    x0 = colour_images(images, torch.arange(n, device=device), colour, palette)
    right = table.index(colour, images.objects, images.views)
    shift = torch.randint(1, table.n_objects, (n,), generator=generator, device=device)
    wrong_object = table.index(colour, (images.objects + shift) % table.n_objects, images.views)
    front, back = VIEW_LABELS.index("front"), VIEW_LABELS.index("back")
    asymmetric = torch.tensor([world.OBJECTS[o].front_differs_from_back for o in world.OBJECT_NAMES], device=device)
    pick = asymmetric[images.objects] & ((images.views == front) | (images.views == back))
    flipped = torch.where(images.views == front, torch.full_like(images.views, back), torch.full_like(images.views, front))
    wrong_view = table.index(colour, images.objects, flipped)
    report: dict[str, Any] = {"n_images": n, "n_front_back_asymmetric": int(pick.sum())}
    for step in EVAL_TIMESTEPS:
        t = torch.full((n,), step, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        a = alphas_cumprod[step]
        x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise
        mse = lambda eps_hat, rows=slice(None): float(((eps_hat - noise[rows]) ** 2).mean())  # noqa: E731
        eps_right = predict_noise(unet, text_encoder, x_t, t, table.ids[right], alphas_cumprod)
        eps_const = (x_t - a.sqrt() * x0.mean(0, keepdim=True)) / (1.0 - a).sqrt()
        report[f"t{step}"] = {
            "teacher": mse(eps_right),
            "constant_zero_noise": mse(torch.zeros_like(noise)),
            "constant_mean_image": mse(eps_const),
            "wrong_object_prompt": mse(predict_noise(unet, text_encoder, x_t, t, table.ids[wrong_object], alphas_cumprod)),
            "front_back_right_view": mse(eps_right[pick], pick),
            "front_back_opposite_view": mse(predict_noise(unet, text_encoder, x_t[pick], t[pick], table.ids[wrong_view[pick]],
                                                                alphas_cumprod), pick),
        }
    return report


@torch.no_grad()
def ddim_samples(unet: Any, text_encoder: Any, ids: Tensor, empty_ids: Tensor, alphas_cumprod: Tensor, n_steps: int,
                 guidance: float, generator: torch.Generator) -> Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance on "trailing" timesteps
    ``t_i = T − i·T/n − 1``; ids (B, L) → images (B, 3, R, R) in [0, 1]. Each step:

        v̂ = v_u + s (v_c − v_u),   x̂₀ = clip(√ᾱ x_t − √(1−ᾱ) v̂, −1, 1),   ε̂ = (x_t − √ᾱ x̂₀) / √(1−ᾱ),
        x_{t'} = √ᾱ' x̂₀ + √(1−ᾱ') ε̂.

    ε̂ is recomputed from the clipped x̂₀ (diffusers' DDIM keeps the unclipped one, which lets guided
    samples drift over many steps).
    """
    total = alphas_cumprod.shape[0]
    steps = [round(total - i * total / n_steps) - 1 for i in range(n_steps)]
    device = ids.device
    x = torch.randn((ids.shape[0], 3, RESOLUTION, RESOLUTION), generator=generator, device=device)
    x0 = x
    hidden = text_encoder(torch.cat([empty_ids.expand_as(ids), ids]))[0]
    for i, t in enumerate(steps):
        both = unet(torch.cat([x, x]), torch.tensor(t, device=device), encoder_hidden_states=hidden).sample.float()
        v_u, v_c = both.chunk(2)
        v = v_u + guidance * (v_c - v_u)
        a = alphas_cumprod[t]
        x0 = (a.sqrt() * x - (1 - a).sqrt() * v).clamp(-1.0, 1.0)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        a_next = alphas_cumprod[steps[i + 1]] if i + 1 < len(steps) else torch.ones((), device=device)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return ((x0 + 1.0) / 2.0).clamp(0.0, 1.0)


def sample_grid(world: types.ModuleType, unet: Any, text_encoder: Any, table: PromptTable, alphas_cumprod: Tensor,
                preset: Preset, seed: int, device: torch.device) -> tuple[Tensor, list[str]]:
    """Rows: (ground truth at the view's reference camera, then DDIM samples) for each row prompt."""
    names = world.OBJECT_NAMES if preset.sample_rows == "all" else ("cube", "house", "snowman", "duck")
    rows, prompts = [], []
    generator = torch.Generator(device).manual_seed(seed + 3)
    for i, name in enumerate(names):
        colour = world.COLOUR_NAMES[i % len(world.COLOUR_NAMES)]
        for view in ("front", "back"):
            text = world.format_prompt(colour, name, view)
            ids = table.ids[table.texts.index(text)].expand(preset.sample_columns, -1)
            samples = ddim_samples(unet, text_encoder, ids, table.ids[table.empty], alphas_cumprod,
                                   preset.sample_ddim_steps, SAMPLE_GUIDANCE, generator)
            truth = world.render_world(name, colour, world.reference_cameras(view, 1, device), RESOLUTION, RESOLUTION,
                                       supersample=2).rgb
            rows.append(torch.cat([truth, samples]).cpu())
            prompts.append(text)
    return torch.stack(rows), prompts


def write_png(path: Path, grid: Tensor, scale: int = 2, gap: int = 2) -> None:
    """Write a (rows, cols, 3, R, R) image grid in [0, 1] as an 8-bit PNG (zlib only, no image library)."""
    from carv3d.io import atomic_path

    n_rows, n_cols, _, h, w = grid.shape
    canvas = torch.full((3, n_rows * (h + gap) + gap, n_cols * (w + gap) + gap), 0.75)
    for r in range(n_rows):
        for c in range(n_cols):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            canvas[:, y:y + h, x:x + w] = grid[r, c]
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    pixels = (canvas.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].numpy().tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


# ------------------------------------------------------------------------------------------- writing
def model_card(world: types.ModuleType, info: dict[str, Any], prompts: list[str]) -> str:
    """MODEL_CARD.md: world, data, model, training, results, the exact command and the sample grid."""
    from carv3d.world.raytrace import AMBIENT, BOUND_RADIUS, LIGHT_DIRECTION, VIEW_PROBABILITIES, WorldCameraRanges

    cams, pre, ev = WorldCameraRanges(), info["preset"], info["denoising"]
    objects = "\n".join(f"| {k.name} | {k.description} | {'yes' if k.symmetric_about_y else 'no'} | "
                        f"{'yes' if k.front_differs_from_back else 'no'} |" for k in world.OBJECTS.values())
    colours = ", ".join(f"{n} {tuple(round(v, 2) for v in rgb)}" for n, rgb in world.COLOURS.items())
    errors = "\n".join(
        f"| {t} | {ev[f't{t}']['teacher']:.4f} | {ev[f't{t}']['constant_mean_image']:.4f} | "
        f"{ev[f't{t}']['constant_zero_noise']:.3f} | {ev[f't{t}']['wrong_object_prompt']:.4f} | "
        f"{ev[f't{t}']['front_back_right_view']:.4f} | {ev[f't{t}']['front_back_opposite_view']:.4f} |"
        for t in EVAL_TIMESTEPS)
    rows = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
    train = info["training"]
    early = " (stopped early by the time budget)" if train["stopped_early"] else ""
    return f"""# carv3d embedded teacher

A small pixel-space text-to-image diffusion model of carv3d's procedural world, for score
distillation on a CPU. Diffusers layout without a VAE: `unet/` (UNet2DConditionModel),
`text_encoder/` (CLIPTextModel), `tokenizer/` (CLIPTokenizer, one token per word), `scheduler/`
(DDPMScheduler), safetensors weights (EMA). carv3d loads it with `teacher.pretrained=embedded`
(or this folder's path) through the same code as Stable Diffusion.

## World
Objects are analytic signed distance functions (`carv3d/world/objects.py`) in carv3d's pose: +Y up,
front towards +Z (azimuth 0 looks at the front); all inside a ball of radius {world.OBJECT_RADIUS}.

| object | shape | same from every azimuth | front differs from back |
|---|---|---|---|
{objects}

Colours (albedo): {colours}. Features (doors, windows, eyes, noses, beak, cushion) are dark
(0.08, 0.08, 0.1); the mushroom's stem and gills cream (0.96, 0.91, 0.78).
Renders: sphere tracing (`carv3d/world/raytrace.py`, marching inside a ball of radius {BOUND_RADIUS}),
{pre['supersample']}×{pre['supersample']} rays per pixel, {pre['trace_steps']} steps, Lambertian shading
`c = a·(k + (1−k)·max(0, n·l))` with k = {AMBIENT} and one light fixed in the world towards
{LIGHT_DIRECTION} (normalised; the front is lit), white background, {RESOLUTION}×{RESOLUTION} px.

## Data
Cameras look at the origin: distance U{cams.distance}, fovy U{cams.fovy}°, elevation in
{cams.elevation}°. The view word is drawn first, with probabilities {VIEW_PROBABILITIES}, then the camera
uniformly in its region; words follow carv3d's rule (`carv3d.cameras.view_label`): overhead
above {cams.overhead_elevation}° elevation, else front for |azimuth| < {cams.front_half_angle}°,
back for |azimuth| > {180 - cams.front_half_angle}°, side otherwise. {pre['renders_per_object']} cameras per
object ({info['data']['n_train_images']} traced images), recoloured in a random colour every time one is drawn.
Prompt: `"a {{colour}} {{object}}, {{view}} view"` ("an" before vowels); with probability {P_UNCOND}
the empty prompt "" (classifier-free guidance), with probability {P_NO_VIEW} no view suffix.

## Model
U-Net: {info['model']['unet_parameters'] / 1e6:.2f} M parameters, block channels
{list(UNET_CONFIG['block_out_channels'])}, one ResNet per level, cross-attention at 8 and 4 px,
the pooled text added to the timestep embedding (`addition_embed_type="text"`, scale-shift ResNets).
Text encoder: CLIPTextModel trained jointly from scratch, {TEXT_CONFIG['num_hidden_layers']} layers,
width {TEXT_CONFIG['hidden_size']}, {MAX_TOKENS} positions ({info['model']['text_parameters'] / 1e6:.2f} M parameters).
Schedule: linear β 1e-4…0.02, T = 1000, v-prediction (ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂).

## Training
{train['steps_done']} steps{early} of batch {pre['batch_size']}, AdamW (lr {pre['lr']}, betas (0.9, 0.99),
weight decay 0.01, {pre['warmup_steps']} warm-up steps, cosine to 5%), gradient clip 1.0, EMA decay
{pre['ema_decay']}, {'bf16 autocast, ' if info['device'].startswith('cuda') else ''}seed {info['seed']}, on {info['device_name']}.
Data {info['timings']['render_seconds']:.0f} s, training {train['train_seconds']:.0f} s, total
{info['timings']['total_seconds']:.0f} s. Final training loss (v-MSE, mean of the last {pre['log_every']} steps):
{train['final_loss']:.4f}.

Command:

    {info['command']}

## Denoising error on fresh world images
Mean squared error of the predicted noise on {ev['n_images']} images from unseen cameras (EMA weights,
no guidance). Baselines: the best constant image (the mean image, ε̂ = (x_t − √ᾱ·c)/√(1−ᾱ)) and ε̂ = 0.
The last two columns: front and back images of objects whose front differs from their back
({ev['n_front_back_asymmetric']} images) with the right view word and with the opposite one.

| t | teacher | constant image | ε̂ = 0 | wrong object | right view | opposite view |
|---|---|---|---|---|---|---|
{errors}

## Samples
`samples.png`: one row per prompt; the first column is the ground truth at the view's reference
camera (elevation 15°, distance 1.55, fovy 50°), then DDIM samples ({pre['sample_ddim_steps']} steps,
guidance {SAMPLE_GUIDANCE}, η = 0). Rows:

{rows}

## Limits
A closed vocabulary: {len(world.OBJECT_NAMES)} objects, {len(world.COLOUR_NAMES)} colours, 4 view words; any other word is
refused by carv3d with the list of known words. {RESOLUTION} px only. It knows this world's lighting and
camera distances; renders far outside them (very close cameras, other lights) are off its data.
"""


def write_folder(stage: Path, world: types.ModuleType, unet: Any, text_encoder: Any, info: dict[str, Any],
                 grid: Tensor, prompts: list[str]) -> None:
    """Everything except tokenizer/ (written first, because the models are built from it)."""
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    from carv3d.io import atomic_write_text

    unet.save_pretrained(stage / "unet", safe_serialization=True)
    text_encoder.save_pretrained(stage / "text_encoder", safe_serialization=True)
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(stage / "scheduler")
    import diffusers

    index = {"_class_name": "Carv3dPixelTeacher", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}
    atomic_write_text(stage / "model_index.json", json.dumps(index, indent=2) + "\n")
    atomic_write_text(stage / "carv3d_vocabulary.json", json.dumps(world.vocabulary(), indent=2) + "\n")
    write_png(stage / "samples.png", grid)
    atomic_write_text(stage / "MODEL_CARD.md", model_card(world, info, prompts))
    atomic_write_text(stage / "train_log.json", json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[-1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="cpu: a ~2-minute smoke test; cuda: the real teacher (about 8 minutes on one H200)")
    parser.add_argument("--output", type=Path, default=None,
                        help="output folder (default: runs/embedded_teacher_cpu for cpu, assets/embedded_teacher for cuda)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    parser.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--renders-per-object", type=int, default=None, help="override the preset's camera count")
    parser.add_argument("--max-train-seconds", type=float, default=None, help="override the preset's time budget")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    preset = PRESETS[args.preset]
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "renders_per_object": args.renders_per_object,
                 "max_train_seconds": args.max_train_seconds}
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    default_out = REPO_ROOT / ("assets/embedded_teacher" if args.preset == "cuda" else "runs/embedded_teacher_cpu")
    out = (args.output or default_out).resolve()
    if out.exists() and not args.overwrite:
        print(f"[teacher] error: {out} exists; pass --overwrite to replace it or choose another --output", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.preset == "cuda" and device.type != "cuda":
        print("[teacher] warning: the cuda preset on a CPU will take hours; use --preset cpu for a smoke test", flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    world = import_world()
    import diffusers
    import transformers
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    from carv3d.teacher.tokenizer import write_word_level_clip_tokenizer

    stage = out.parent / f".{out.name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    tokenizer = write_word_level_clip_tokenizer(world.tokenizer_words(), stage / "tokenizer", model_max_length=MAX_TOKENS)
    unet, text_encoder = build_models(tokenizer, args.seed)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"[teacher] preset {args.preset} on {device} ({device_name}); U-Net {n_unet / 1e6:.2f} M, "
          f"text encoder {n_text / 1e6:.2f} M parameters; {preset}", flush=True)

    t0 = time.perf_counter()
    images = render_images(world, preset.renders_per_object, args.seed, preset, device)
    eval_images = render_images(world, preset.eval_renders_per_object, args.seed + 1000, preset, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    render_seconds = time.perf_counter() - t0
    print(f"[teacher] traced {images.objects.shape[0]} + {eval_images.objects.shape[0]} world images in "
          f"{render_seconds:.1f} s", flush=True)

    table = PromptTable(world, tokenizer, device)
    palette = world.colour_rgb(world.COLOUR_NAMES, device)
    alphas_cumprod = DDPMScheduler(**SCHEDULER_CONFIG).alphas_cumprod.to(device, torch.float32)
    training = train(unet, text_encoder, images, table, palette, alphas_cumprod, preset, args.seed, device)
    denoising = denoising_report(world, unet, text_encoder, eval_images, table, palette, alphas_cumprod, args.seed)
    for t in EVAL_TIMESTEPS:
        print(f"[teacher] t={t}: " + ", ".join(f"{k} {v:.4f}" for k, v in denoising[f"t{t}"].items()), flush=True)
    grid, prompts = sample_grid(world, unet, text_encoder, table, alphas_cumprod, preset, args.seed, device)

    arguments = sys.argv[1:] if argv is None else argv
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/train_embedded_teacher.py", *arguments])
    info = {
        "command": command, "preset_name": args.preset, "preset": asdict(preset), "seed": args.seed,
        "device": str(device), "device_name": device_name,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "model": {"unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
                  "text_encoder": TEXT_CONFIG, "scheduler": SCHEDULER_CONFIG,
                  "unet_parameters": n_unet, "text_parameters": n_text},
        "data": {"n_train_images": int(images.objects.shape[0]), "n_eval_images": int(eval_images.objects.shape[0]),
                 "resolution": RESOLUTION, "p_uncond": P_UNCOND, "p_no_view": P_NO_VIEW},
        "training": training, "denoising": denoising, "sample_prompts": prompts,
        "timings": {"render_seconds": render_seconds},
    }
    info["timings"]["total_seconds"] = time.perf_counter() - t_start
    write_folder(stage, world, unet.float(), text_encoder.float(), info, grid, prompts)
    if out.exists():
        shutil.rmtree(out)
    os.replace(stage, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[teacher] wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
