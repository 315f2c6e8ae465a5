"""The teacher interface: what the training loop and the estimator may ask of a frozen diffusion model.

A teacher maps a prompt to text embeddings once (:meth:`Teacher.embed`, cached), maps renders to
its diffusion variable ``x`` (:meth:`Teacher.encode`: a VAE latent for Stable Diffusion, the image
itself in [−1, 1] for a pixel-space teacher) and predicts the noise in ``x_t`` with classifier-free
guidance (:meth:`Teacher.predict_noise`). Its forward process is

    x_t = √ᾱ_t · x + √(1 − ᾱ_t) · ε,    ε ~ N(0, I),    t ∈ {0, …, T − 1}

with ``ᾱ_t = Teacher.alphas_cumprod[t]``. Nothing here knows about NeRFs or renderers.

View-dependent prompting (DreamFusion / threestudio): the camera's view label picks one of the
prompts ``"<prompt>, front view"``, ``", side view"``, ``", back view"``, ``", overhead view"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, runtime_checkable

import torch

# View label (carv3d.cameras.VIEW_LABELS) → prompt suffix.
VIEW_SUFFIXES: dict[str, str] = {
    "front": ", front view",
    "side": ", side view",
    "back": ", back view",
    "overhead": ", overhead view",
}


@dataclass(frozen=True, eq=False)
class PromptEmbedding:
    """Text embeddings of one prompt, its view-suffixed variants and the negative prompt.

    Attributes:
        prompt: the prompt as given (stripped).
        negative_prompt: the negative prompt ("" = the unconditional embedding).
        view_dependent: whether :meth:`Teacher.conditioning` uses the per-view embeddings.
        plain: (L, D) embedding of ``prompt``.
        by_view: label → (L, D) embedding of ``prompt + VIEW_SUFFIXES[label]`` (empty when not
            view-dependent).
        uncond: (L, D) embedding of ``negative_prompt``, the "unconditional" branch of CFG.
        texts: label → the exact text that was embedded ("" for the plain prompt).
    """

    prompt: str
    negative_prompt: str
    view_dependent: bool
    plain: torch.Tensor
    by_view: dict[str, torch.Tensor]
    uncond: torch.Tensor
    texts: dict[str, str] = field(default_factory=dict)

    def for_view(self, label: Optional[str]) -> torch.Tensor:
        """(L, D) embedding for a view label; ``None``/"" or a view-independent embedding → ``plain``."""
        if not self.view_dependent or not label:
            return self.plain
        if label not in self.by_view:
            raise ValueError(f"unknown view label {label!r}; expected one of {sorted(self.by_view)} or None")
        return self.by_view[label]


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Per-sample conditioning for a batch of noise predictions.

    Attributes:
        cond: (N, L, D) conditional embeddings, one row per sample.
        uncond: (N, L, D) unconditional (negative-prompt) embeddings.
        cameras: (N, 4, 4) camera-to-world of each sample's render, for teachers conditioned on
            the pose (multi-view teachers such as MVDream); None when the teacher does not use it.
        groups: (N,) long, rows with the same value are views of one set that must be scored
            together (a multi-view teacher's frames); None = every row on its own.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    cameras: Optional[torch.Tensor] = None
    groups: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.cond.shape != self.uncond.shape or self.cond.dim() != 3:
            raise ValueError(f"cond and uncond must both be (N, L, D), got {tuple(self.cond.shape)} "
                             f"and {tuple(self.uncond.shape)}")

    def __len__(self) -> int:
        return self.cond.shape[0]

    def select(self, index: torch.Tensor) -> "Conditioning":
        """Gather rows: ``out.cond[m] = self.cond[index[m]]``.

        Args:
            index: (M,) long, e.g. ``torch.arange(R).repeat_interleave(K)`` to repeat each render's
                conditioning for its K noise draws.
        """
        index = index.to(self.cond.device)

        def rows(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else tensor.index_select(0, index.to(tensor.device))

        return Conditioning(self.cond.index_select(0, index), self.uncond.index_select(0, index),
                            rows(self.cameras), rows(self.groups))


def build_conditioning(embedding: PromptEmbedding, view_labels: Sequence[Optional[str]],
                       cameras: Optional[torch.Tensor] = None, groups: Optional[torch.Tensor] = None) -> Conditioning:
    """Stack the embedding of each sample's view: ``cond[n] = embedding.for_view(view_labels[n])``;
    ``cameras`` (N, 4, 4) and ``groups`` (N,) ride along for teachers that use them.

    Returns:
        Conditioning with cond, uncond: (len(view_labels), L, D).
    """
    n = len(view_labels)
    if n == 0:
        raise ValueError("view_labels is empty; pass one label (or None) per sample")
    cond = torch.stack([embedding.for_view(label) for label in view_labels])
    uncond = embedding.uncond.unsqueeze(0).expand(n, -1, -1).contiguous()
    return Conditioning(cond, uncond, cameras, groups)


@runtime_checkable
class Teacher(Protocol):
    """A frozen diffusion teacher (see the module docstring for the forward process).

    Attributes:
        num_train_timesteps: T, the number of discrete training timesteps.
        alphas_cumprod: (T,) float32 ᾱ_t on ``device``.
        device: where the models and all returned tensors live.
        dtype: the models' dtype (fp16 on CUDA, fp32 on CPU by default).
        latent_shape: (C, h, w) of :meth:`encode`'s output.
        image_size: the square size :meth:`encode` resizes images to.
        max_batch: the most samples per U-Net call (the CFG batch is twice this).

    Implementations: :class:`carv3d.teacher.diffusers_teacher.LatentDiffusionTeacher` (Stable
    Diffusion: a VAE latent) and :class:`~carv3d.teacher.diffusers_teacher.PixelDiffusionTeacher`
    (the embedded teacher: the image itself), both ``teacher.type: diffusers``.
    """

    num_train_timesteps: int
    alphas_cumprod: torch.Tensor
    device: torch.device
    dtype: torch.dtype
    latent_shape: tuple[int, int, int]
    image_size: int
    max_batch: int

    def embed(self, prompt: str, negative_prompt: str = "", view_dependent: bool = True) -> PromptEmbedding:
        """Text embeddings of the prompt, its view variants and the negative prompt (cached)."""
        ...

    def conditioning(self, embedding: PromptEmbedding, view_labels: Sequence[Optional[str]],
                     cameras: Optional[torch.Tensor] = None) -> Conditioning:
        """Per-sample conditioning for N renders: (N, L, D) text rows from the view labels, and the
        renders' (N, 4, 4) camera-to-world poses for a teacher conditioned on them."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) in [0, 1] → x: (N, *latent_shape) float32, differentiable."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, *latent_shape) → images (N, 3, image_size, image_size) in [0, 1] (no gradient)."""
        ...

    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        """Guided ε̂(x_t, t): (M, *latent_shape) float32, ``ε_u + s·(ε_c − ε_u)``, no gradient.

        The result has x_t's channels whatever the network outputs: a model that also predicts
        its variance (DeepFloyd IF: 2·C channels) returns the ε half."""
        ...

    def predict_noise_branches(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε_u, ε_c)``, the unguided and conditional predictions, each like :meth:`predict_noise`'s."""
        ...
