"""Tiny random teachers with the real folder layouts, built offline in about a second.

They are for tests and for fast end-to-end runs of the training loop on a CPU: the weights are
random (seeded), so what they "see" is meaningless, but every tensor flows through the same
diffusers classes, files and loading code as Stable Diffusion's.

- :func:`build_tiny_stable_diffusion`: a latent teacher, a real ``StableDiffusionPipeline`` saved
  with ``save_pretrained`` (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``, safetensors). 64×64 images ↔ (4, 8, 8) latents.
- :func:`build_tiny_pixel_teacher`: a pixel-space teacher, the same folders without ``vae/`` (the
  embedded teacher's layout). (3, s, s) images are the diffusion variable.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from carv3d.teacher.tokenizer import write_word_level_clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# Words that are single tokens in the tiny tokenizer; any other text falls back to byte tokens.
TINY_WORDS: tuple[str, ...] = (
    "a", ",", "red", "green", "blue", "yellow", "white", "black",
    "sphere", "cube", "torus", "cone", "cylinder", "house", "snowman",
    "front", "side", "back", "overhead", "view",
)
TEXT_HIDDEN = 32  # text-embedding width = the U-Net's cross_attention_dim
# configs/sd21.yaml's scene scaled to a CPU check with the tiny SD folder (the benchmark scripts'
# --tiny): a few seconds per step on 2 cores.
TINY_SD_SCENE_OVERRIDES = [
    "render.width=32", "render.height=32", "render.samples_per_ray=16", "scene.grid.n_levels=8",
    "scene.grid.log2_hashmap_size=14", "teacher.resolution=0", "teacher.guidance_scale=7.5",
]
# configs/gaussians_sd21.yaml's scene scaled the same way: its render is the teacher's native size
# (512² for SD, whose VAE downsamples by 8), so the tiny teacher's native 64² (latents 8²), i.e. 512 / 8,
# with 200 instead of 5,000 initial Gaussians (the torch rasteriser on a CPU).
TINY_SD_RENDER_SCALE = 8  # SD's 512² images ↔ the tiny teacher's 64²
TINY_SD_GAUSSIAN_OVERRIDES = [
    "render.width=64", "render.height=64", "scene.n_points=200", "teacher.resolution=0", "teacher.guidance_scale=7.5",
]
# The end-of-run outputs of a tiny run (bench_speed --full-run-steps --tiny): small sheets, 2 frames, a 32³ mesh.
TINY_RUN_OUTPUT_OVERRIDES = ["train.val_resolution=32", "train.turntable_frames=2", "export.resolution=32"]


def make_tiny_scheduler() -> DDPMScheduler:
    """Stable Diffusion's training schedule: ``scaled_linear`` betas 0.00085–0.012, 1000 steps, ε-prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )


def make_tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 5-layer CLIP text encoder of width 32 over the tokenizer's vocabulary (random weights)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def make_tiny_unet(channels: int, sample_size: int, out_channels: Optional[int] = None) -> UNet2DConditionModel:
    """A two-level conditional U-Net (block channels 32, 64; cross-attention at the coarse level).
    ``out_channels`` = 2·channels makes a model that also predicts its variance (DeepFloyd IF's layout)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=out_channels or channels, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8, norm_num_groups=32,
    ).eval()


def make_tiny_vae() -> AutoencoderKL:
    """A four-block KL autoencoder that downsamples by 8 like Stable Diffusion's (tiny channels)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=64,
    ).eval()


def make_tiny_stable_diffusion_pipeline(seed: int = 0, words: Sequence[str] = TINY_WORDS) -> "StableDiffusionPipeline":
    """The in-memory tiny pipeline; the same ``seed`` gives bit-identical weights.

    Models are created in a fixed order under ``torch.manual_seed(seed)`` inside ``fork_rng``, so the
    caller's global random state is left untouched.
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_word_level_clip_tokenizer(words, tmp)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_tiny_unet(channels=4, sample_size=8)
        vae = make_tiny_vae()
        text_encoder = make_tiny_text_encoder(tokenizer)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_stable_diffusion(directory: Union[str, Path], seed: int = 0) -> Path:
    """Save the tiny Stable-Diffusion-shaped pipeline to ``directory`` (safetensors) and return it.

    Shapes: images (N, 3, 64, 64) ↔ latents (N, 4, 8, 8); text embeddings (N, 77, 32).
    """
    directory = Path(directory)
    make_tiny_stable_diffusion_pipeline(seed).save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_pixel_teacher(
    directory: Union[str, Path], seed: int = 0, image_size: int = 16, words: Sequence[str] = TINY_WORDS,
    out_channels: Optional[int] = None,
) -> Path:
    """Save a tiny pixel-space teacher (``unet/`` on 3 channels, no ``vae/``) and return the folder.
    ``out_channels=6``: the U-Net also predicts its variance, as DeepFloyd IF's does.

    Shapes: images (N, 3, image_size, image_size) are the diffusion variable; text (N, 77, 32).
    """
    directory = Path(directory)
    tokenizer = write_word_level_clip_tokenizer(words, directory / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = make_tiny_unet(channels=3, sample_size=image_size, out_channels=out_channels)
        text_encoder = make_tiny_text_encoder(tokenizer)
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    make_tiny_scheduler().save_pretrained(directory / "scheduler")
    return directory
