"""Which attention kernels a teacher's models run.

diffusers runs attention through ``F.scaled_dot_product_attention`` (``AttnProcessor2_0``) on
torch ≥ 2, which picks a fused kernel by the head's width; :func:`attention_summary` reports which
processors a model uses so the startup log shows it. A head wider than the fused kernels cover
(:data:`FUSED_ATTENTION_MAX_HEAD_DIM`; the VAE encoder's 512-channel one) gets SDPA's math kernel
(:class:`MathSDPAttnProcessor`, set by :func:`use_math_attention_for_wide_heads`; the teacher does
so on CUDA, where it is the faster kernel for the same sum).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

import torch


def attention_summary(model: Optional[torch.nn.Module]) -> str:
    """Which attention processors a diffusers model uses, e.g. ``"AttnProcessor2_0 ×16 (SDPA)"``."""
    if model is None:
        return "no attention layers"
    # attn_processors is a ModelMixin property; a submodule (the VAE's encoder) is walked instead
    processors = list(getattr(model, "attn_processors", {}).values()) or [
        module.processor for module in model.modules() if hasattr(module, "processor") and hasattr(module, "set_processor")]
    if not processors:
        return "no attention layers"
    counts = Counter(type(p).__name__ for p in processors)
    parts = [f"{name} ×{n}" + (" (SDPA)" if "2_0" in name else " (SDPA, math kernel)" if "SDPA" in name.upper() else "")
             for name, n in sorted(counts.items())]
    return ", ".join(parts)


# Fused attention kernels cover heads of at most this many channels (FlashAttention-2's limit; the
# cuDNN kernels' too). A wider head falls to the memory-efficient kernel's generic variant.
FUSED_ATTENTION_MAX_HEAD_DIM = 256


class MathSDPAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with ``scaled_dot_product_attention`` held to its math kernel.

    For attention with one very wide head: the VAE's mid-block attends over all 64×64 latent
    positions with a single 512-channel head. No fused kernel covers 512 channels, so SDPA picks the
    memory-efficient kernel's generic variant, whose backward took 6.1 ms of an H100 step
    (docs/profile_h100.json: ``fmha_cutlassB_..._k65536``); the math kernel computes the same sums as
    two plain matrix products around a softmax (4096 × 4096 scores, 32 MB in fp16). Measured on one
    H100, the encoder's forward + backward at 512² went from 25.2 to 21.3 ms
    (docs/bench_vae_attention_h100.json). ``sdpa_kernel`` is traced by Dynamo, so the choice holds
    inside ``torch.compile`` too.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._inner = AttnProcessor2_0()

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The parameters are spelled out: diffusers passes a processor only the keywords it names.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return self._inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def wide_head_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """diffusers ``Attention`` layers of ``model`` whose heads are wider than
    :data:`FUSED_ATTENTION_MAX_HEAD_DIM` channels (no fused kernel serves them)."""
    layers = []
    for module in model.modules():
        heads = getattr(module, "heads", None)
        inner = getattr(module, "inner_dim", None)
        if type(module).__name__ == "Attention" and heads and inner and inner // heads > FUSED_ATTENTION_MAX_HEAD_DIM:
            layers.append(module)
    return layers


def use_math_attention_for_wide_heads(model: torch.nn.Module) -> int:
    """Give each of ``model``'s :func:`wide_head_attention_layers` a :class:`MathSDPAttnProcessor`
    (when it runs diffusers' default ``AttnProcessor2_0``); returns how many it changed."""
    changed = 0
    for layer in wide_head_attention_layers(model):
        if type(layer.processor).__name__ == "AttnProcessor2_0":
            layer.set_processor(MathSDPAttnProcessor())
            changed += 1
    return changed
