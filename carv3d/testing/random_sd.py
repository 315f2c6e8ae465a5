"""Random-weight teachers with Stable Diffusion's published shapes, for speed measurements.

Speed depends on shapes, not on weight values, and real weights cannot be downloaded on the
benchmark machines. These builders make the published SD 2.1-base / SD 1.5 architectures with
random weights (seeded) and save them with ``save_pretrained`` in the diffusers layout, so the
benchmark loads them through carv3d's normal teacher loading (``teacher.pretrained=<folder>``).

Published configs restated (stabilityai/stable-diffusion-2-1-base, runwayml/stable-diffusion-v1-5):

- U-Net: sample_size 64, 4 → 4 channels, blocks (320, 640, 1280, 1280), 2 layers per block,
  CrossAttnDownBlock2D ×3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D ×3.
  SD 2.1-base: cross_attention_dim 1024, attention_head_dim (5, 10, 20, 20), linear projections.
  SD 1.5: cross_attention_dim 768, attention_head_dim 8, conv projections.
- VAE (both): AutoencoderKL, blocks (128, 256, 512, 512), 4 down / 4 up, 2 layers per block,
  latent_channels 4, scaling_factor 0.18215, sample_size 512 (512² images ↔ 64² latents).
- Text encoder: SD 2.1: CLIP ViT-H/14 text tower cut to 23 layers (hidden 1024, 16 heads, MLP 4096,
  gelu, projection 512). SD 1.5: CLIP ViT-L/14 (hidden 768, 12 layers, 12 heads, MLP 3072, quick_gelu).
  The tokenizer is carv3d's small byte-level CLIP tokenizer (its vocabulary size only changes the
  embedding table, which is off the training step's path).
- Scheduler: DDPM, scaled_linear betas 0.00085–0.012, 1000 steps. SD 2.1-base and SD 1.5 are
  ε-prediction models (the 768-px SD 2.1 is the v-prediction one); the conversion to ε is an
  elementwise affine map, so the prediction type does not matter for speed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Union

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import CLIPTextConfig, CLIPTextModel

from carv3d.testing.tiny_teachers import TINY_WORDS
from carv3d.teacher.tokenizer import write_word_level_clip_tokenizer

SCALES = ("sd21", "sd15")

_UNET = {
    "sd21": dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sd15": dict(cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
}
_TEXT = {
    "sd21": dict(hidden_size=1024, num_hidden_layers=23, num_attention_heads=16, intermediate_size=4096,
                 projection_dim=512, hidden_act="gelu"),
    "sd15": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 projection_dim=768, hidden_act="quick_gelu"),
}


def make_unet(scale: str) -> UNet2DConditionModel:
    """The SD U-Net of ``scale`` (random weights from torch's global generator)."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        **_UNET[scale],
    )


def make_vae() -> AutoencoderKL:
    """SD's KL autoencoder (the same for SD 1.5 and 2.1)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
    )


def make_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def build_random_stable_diffusion(
    directory: Union[str, Path], scale: str = "sd21", seed: int = 0, device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Save a random-weight Stable Diffusion of ``scale`` ("sd21" or "sd15") to ``directory``.

    Models are initialised on ``device`` (a GPU makes the ~1.3 B parameters in seconds) and saved
    in ``dtype`` (fp16 halves the files: ≈ 2.6 GB for sd21). The caller's global RNG is untouched.

    Returns:
        ``directory``, a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
        ``scheduler/``) that ``teacher.pretrained`` accepts.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    directory = Path(directory)
    device = torch.device(device)
    tokenizer = write_word_level_clip_tokenizer(TINY_WORDS, directory / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **_TEXT[scale],
    )
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        for name, make in (("unet", lambda: make_unet(scale)), ("vae", make_vae),
                           ("text_encoder", lambda: CLIPTextModel(text_config))):
            model = make().to(dtype).eval().cpu()  # safetensors writes host memory
            model.save_pretrained(directory / name, safe_serialization=True)
            del model
    make_scheduler().save_pretrained(directory / "scheduler")
    return directory


def temporary_random_stable_diffusion(scale: str = "sd21", **kwargs) -> tuple[tempfile.TemporaryDirectory, Path]:
    """Build into a fresh temporary folder; keep the returned TemporaryDirectory alive while in use."""
    tmp = tempfile.TemporaryDirectory(prefix=f"carv3d-{scale}-")
    return tmp, build_random_stable_diffusion(Path(tmp.name) / scale, scale=scale, **kwargs)
