"""A frozen diffusers teacher: Stable Diffusion (latent) or a pixel-space conditional U-Net.

Both kinds share the components ``unet`` (UNet2DConditionModel), ``text_encoder`` (CLIPTextModel),
``tokenizer`` and ``scheduler`` (only its ᾱ_t table and prediction type are used); a latent teacher
adds ``vae`` (AutoencoderKL). Shapes, with f = 2^(#VAE blocks − 1) (8 for Stable Diffusion) and
S = :attr:`DiffusersTeacher.image_size`:

    images (N, 3, H, W) in [0, 1] ─encode→ x (N, C, S/f, S/f)    (f = 1, C = 3 without a VAE)
    text ─embed→ (L, D) per prompt variant,   L = tokenizer.model_max_length (77), D = text width
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
# Module paths, not `from diffusers import …`: the top-level import pulls in every model family.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from transformers import AutoTokenizer, CLIPTextModel

from carv3d.config import check_prompt
from carv3d.errors import ConfigError, TeacherWeightsError
from carv3d.log import logger
from carv3d.teacher.attention import attention_summary, use_math_attention_for_wide_heads
from carv3d.teacher.base import VIEW_SUFFIXES, Conditioning, PromptEmbedding, build_conditioning
from carv3d.teacher.fast import FastPaths, resolve_auto_compile
from carv3d.teacher.folder import inspect_teacher_folder
from carv3d.teacher.graphs import build_encode_call, build_unet_call
from carv3d.teacher.vocabulary import PromptVocabulary

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def model_output_to_noise(
    output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Turn a U-Net output into a noise prediction ε̂ (all float32).

    With x_t = √ᾱ·x₀ + √(1−ᾱ)·ε:
        epsilon:       ε̂ = output
        v_prediction:  v = √ᾱ·ε − √(1−ᾱ)·x₀  ⇒  ε̂ = √ᾱ·v + √(1−ᾱ)·x_t
        sample:        x̂₀ = output           ⇒  ε̂ = (x_t − √ᾱ·x̂₀) / √(1−ᾱ)

    The map is affine in ``output``, so classifier-free guidance may be applied before it.

    Args:
        output, x_t: (M, C, h, w).
        alpha_bar: (M,) ᾱ_t per sample.
    """
    if prediction_type == "epsilon":
        return output
    a = alpha_bar.view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1.0 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * output) / (1.0 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def _load_component(kind: str, loader: Any, folder: Path, subfolder: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` from the local folder only; load errors become TeacherWeightsError."""
    try:
        return loader.from_pretrained(folder, subfolder=subfolder, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:  # missing/unreadable files, bad JSON, shape mismatch
        raise TeacherWeightsError(_load_failure(kind, folder / subfolder, err)) from err
    except Exception as err:  # safetensors' SafetensorError (a truncated file) derives from Exception
        if type(err).__name__ != "SafetensorError":
            raise
        raise TeacherWeightsError(_load_failure(kind, folder / subfolder, err)) from err


def _load_failure(kind: str, where: Path, err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"could not load the teacher's {kind} from {where}: {first_line}. The folder looks "
            f"incomplete or corrupted: copy it again (or re-download it on a machine with internet).")


class DiffusersTeacher:
    """A frozen text-conditioned diffusers model behind the :class:`carv3d.teacher.base.Teacher` interface.

    The shared part of the two implementations: text embeddings, the U-Net and its guided or
    branch-wise noise predictions. :class:`LatentDiffusionTeacher` (with a VAE) and
    :class:`PixelDiffusionTeacher` (without) define :meth:`encode` and :meth:`decode`;
    :meth:`from_folder` returns the one the folder holds.

    All models are in ``eval()`` mode with ``requires_grad_(False)``; gradients flow only through
    :meth:`encode`'s input. Build one with :meth:`from_folder` (or :func:`carv3d.teacher.load_teacher`).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: Any,
        scheduler: Any,
        vae: Optional[AutoencoderKL] = None,
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        resolution: int = 0,
        max_batch: int = 32,
        vocabulary: Optional[PromptVocabulary] = None,
        name: str = "",
        fast: Optional[FastPaths] = None,
    ) -> None:
        """
        Args:
            unet, text_encoder, tokenizer, scheduler, vae: the components (vae=None: pixel space).
            device: where everything runs.
            dtype: model dtype; None = float16 on CUDA, float32 elsewhere.
            resolution: square image size for :meth:`encode`; 0 = native
                (``unet.config.sample_size · f``: 512 for SD 1.5 / 2.1-base).
            max_batch: most samples per U-Net call; CFG makes the U-Net batch twice this.
            vocabulary: a closed vocabulary that :meth:`embed` enforces, or None (any prompt).
            name: where the teacher came from, for messages.
            fast: CUDA fast paths (:mod:`carv3d.teacher.fast`); None = eager.
        """
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.name = name
        self.max_batch = int(max_batch)
        if self.max_batch < 1:
            raise ConfigError(f"teacher.max_batch is {max_batch}; it must be at least 1.")
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        for model in (unet, text_encoder, vae):
            if model is None:
                continue
            if model.dtype != self.dtype:  # from_folder loads in the right dtype; cast only otherwise
                model.to(dtype=self.dtype)
            model.to(self.device).eval().requires_grad_(False)
        if vae is not None and self.device.type == "cuda":  # not a switch: the faster kernel for the same sum
            use_math_attention_for_wide_heads(vae.encoder)
        self.fast = resolve_auto_compile(fast or FastPaths(), unet)
        self._unet_call = build_unet_call(unet, self.fast)  # applies channels_last to the U-Net
        if vae is not None:
            vae.to(memory_format=torch.channels_last if self.fast.vae_nhwc else torch.contiguous_format)
        self._encode_call = build_encode_call(vae, self.fast) if vae is not None else None
        self.tokenizer = tokenizer
        self.vocabulary = vocabulary
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise TeacherWeightsError(f"teacher {name}: unsupported prediction_type {self.prediction_type!r}")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(self.device, torch.float32)

        text_width, cross_width = int(text_encoder.config.hidden_size), int(unet.config.cross_attention_dim)
        if text_width != cross_width:
            raise TeacherWeightsError(f"teacher {name}: the text encoder makes {text_width}-wide embeddings but "
                                      f"the U-Net attends to {cross_width}; the components do not match.")
        channels = int(unet.config.in_channels)
        if vae is None:
            if channels != 3:
                raise TeacherWeightsError(
                    f"teacher {name} has no vae/ folder but its U-Net takes {channels} channels, so it is "
                    f"a latent model whose VAE is missing. Copy the vae/ folder too."
                )
            self.vae_scale_factor = 1
            self.scaling_factor, self.shift_factor = 1.0, 0.0
        else:
            if int(vae.config.latent_channels) != channels:
                raise TeacherWeightsError(f"teacher {name}: the VAE makes {vae.config.latent_channels}-channel "
                                          f"latents but the U-Net takes {channels}; the components do not match.")
            self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
            self.scaling_factor = float(vae.config.scaling_factor)
            self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        sample_size = unet.config.sample_size
        native = int(sample_size if isinstance(sample_size, int) else sample_size[0]) * self.vae_scale_factor
        self.image_size = int(resolution) or native
        if self.image_size % self.vae_scale_factor:
            raise ConfigError(f"teacher.resolution is {resolution}; this teacher needs a multiple of "
                              f"{self.vae_scale_factor} (its native size is {native}).")
        side = self.image_size // self.vae_scale_factor
        self.latent_shape: tuple[int, int, int] = (channels, side, side)
        self._embeddings: dict[tuple[str, str, bool], PromptEmbedding] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(
        cls,
        folder: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        dtype: Optional[torch.dtype] = None,
        resolution: int = 0,
        max_batch: int = 32,
        fast: Optional[FastPaths] = None,
    ) -> "DiffusersTeacher":
        """The folder's teacher (:class:`LatentDiffusionTeacher` when it has vae/, else
        :class:`PixelDiffusionTeacher`). Loads each component with ``from_pretrained(folder, subfolder=…, local_files_only=True,
        use_safetensors=True)``; never touches the network. See :mod:`carv3d.teacher.folder` for the layout.

        Raises:
            TeacherWeightsError: a missing, partial or corrupted folder.
        """
        info = inspect_teacher_folder(Path(folder))
        folder = info.path
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        low_mem = importlib.util.find_spec("accelerate") is not None  # diffusers needs accelerate for it
        common = dict(use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=low_mem)
        unet = _load_component("U-Net", UNet2DConditionModel, folder, "unet", variant=info.variants["unet"], **common)
        vae = None
        if info.has_vae:
            vae = _load_component("VAE", AutoencoderKL, folder, "vae", variant=info.variants["vae"], **common)
        text_encoder = _load_component("text encoder", CLIPTextModel, folder, "text_encoder",
                                       variant=info.variants["text_encoder"], use_safetensors=True)
        tokenizer = _load_component("tokenizer", AutoTokenizer, folder, "tokenizer")
        scheduler = _load_component("scheduler", DDPMScheduler, folder, "scheduler")
        vocabulary = PromptVocabulary.from_file(info.vocabulary_file) if info.vocabulary_file else None
        kind = LatentDiffusionTeacher if vae is not None else PixelDiffusionTeacher
        if cls is not DiffusersTeacher and cls is not kind:
            raise TeacherWeightsError(f"{folder} is a {'latent' if vae is not None else 'pixel-space'} teacher, "
                                      f"not a {cls.__name__}.")
        teacher = kind(unet, text_encoder, tokenizer, scheduler, vae=vae, device=device, dtype=dtype,
                      resolution=resolution, max_batch=max_batch, vocabulary=vocabulary, name=str(folder),
                      fast=fast)
        logger.info("teacher: %s (%s, %s on %s, images %d px → x %s, %s)", folder,
                    "latent" if vae is not None else "pixel space", str(dtype).replace("torch.", ""),
                    device, teacher.image_size, teacher.latent_shape, teacher.prediction_type)
        logger.info("teacher: fast paths %s; U-Net attention %s%s", teacher.fast.describe(), attention_summary(unet),
                    f"; VAE encoder attention {attention_summary(vae.encoder)}" if vae is not None else "")
        return teacher

    def with_fast_paths(self, fast: FastPaths) -> "DiffusersTeacher":
        """The same teacher (same modules, no reload) with other fast paths.

        For benchmarks that compare eager and fast calls without holding two copies of the weights.
        ``channels_last`` converts the shared modules in place; that changes memory layout only, so
        the original teacher stays correct (and stays eager).
        """
        other = copy.copy(self)
        other.fast = fast = resolve_auto_compile(fast, self.unet)
        other._unet_call = build_unet_call(self.unet, fast)
        if self.vae is not None:  # both ways: a benchmark's modes may differ in the VAE's layout alone
            self.vae.to(memory_format=torch.channels_last if fast.vae_nhwc else torch.contiguous_format)
        other._encode_call = build_encode_call(self.vae, fast) if self.vae is not None else None
        other._embeddings = dict(self._embeddings)
        logger.info("teacher: fast paths %s", fast.describe())
        return other

    # ------------------------------------------------------------------ text
    def embed(self, prompt: str, negative_prompt: str = "", view_dependent: bool = True) -> PromptEmbedding:
        """Text embeddings of ``prompt``, its view variants and ``negative_prompt``, cached.

        The prompt is embedded as is (the plain row) and, when ``view_dependent``, with each suffix of
        :data:`carv3d.teacher.base.VIEW_SUFFIXES`; the negative prompt ("" = unconditional) gives the
        CFG branch. Like diffusers' ``encode_prompt``: tokens padded to ``model_max_length``, the text
        encoder's last hidden state, (L, D) per text.

        Returns:
            The same object for the same (prompt, negative_prompt, view_dependent).

        Raises:
            PromptError: an empty prompt, or words outside a closed-vocabulary teacher's vocabulary.
        """
        prompt, negative_prompt = check_prompt(prompt), (negative_prompt or "").strip()
        key = (prompt, negative_prompt, bool(view_dependent))
        if key in self._embeddings:
            return self._embeddings[key]
        if self.vocabulary is not None:
            self.vocabulary.check(prompt, "prompt", self.name)
            self.vocabulary.check(negative_prompt, "negative prompt (teacher.negative_prompt)", self.name)
        texts = {"": prompt}
        if view_dependent:
            texts.update({label: prompt + suffix for label, suffix in VIEW_SUFFIXES.items()})
        hidden = self._encode_text(list(texts.values()) + [negative_prompt])
        rows = dict(zip(texts, hidden))
        embedding = PromptEmbedding(
            prompt=prompt, negative_prompt=negative_prompt, view_dependent=bool(view_dependent),
            plain=rows.pop(""), by_view=rows, uncond=hidden[-1], texts=texts,
        )
        self._embeddings[key] = embedding
        return embedding

    @torch.no_grad()
    def _encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """texts → (len(texts), L, D) in the teacher dtype."""
        # A tokenizer_config without model_max_length reports a huge sentinel: use the encoder's limit.
        max_length = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        for text in texts:
            if len(self.tokenizer(text).input_ids) > max_length:
                logger.warning("teacher: %r is longer than %d tokens and is truncated", text, max_length)
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt")
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def conditioning(self, embedding: PromptEmbedding, view_labels: Sequence[Optional[str]],
                     cameras: Optional[torch.Tensor] = None) -> Conditioning:
        """Per-sample conditioning: row n uses view ``view_labels[n]`` ("front", "side", "back",
        "overhead"; None = the plain prompt). cond, uncond: (N, L, D). A text-only U-Net ignores
        ``cameras``; they are kept on the conditioning for teachers that use them."""
        return build_conditioning(embedding, view_labels, cameras)

    # ------------------------------------------------------------------ images
    @property
    def _output_dtype(self) -> torch.dtype:
        """float32, or float64 for a float64 teacher (gradient checks)."""
        return torch.promote_types(self.dtype, torch.float32)

    def _resize_to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] → (N, 3, S, S) in [−1, 1] on the teacher's device (S = image_size),
        resized bilinearly (``align_corners=False``, antialiased when shrinking)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        size = self.image_size
        height, width = images.shape[-2:]
        if (height, width) != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=bool(height > size or width > size))
        return images.to(self.device) * 2.0 - 1.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] → x: (N, *latent_shape) float32, differentiably."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, *latent_shape) → images (N, 3, S, S) in [0, 1], float32 (for visualisation)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ noise
    @torch.no_grad()
    def predict_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float
    ) -> torch.Tensor:
        """Classifier-free-guided noise prediction in one batched U-Net call per chunk.

            ε̂ = ε_u + s · (ε_c − ε_u),   ε_c = ε(x_t, t, cond),  ε_u = ε(x_t, t, uncond)

        (diffusers' convention: s = 1 is the plain conditional model, s = 0 the unconditional one.
        threestudio writes ε_c + s'·(ε_c − ε_u); its s' = 100 is s = 101 here.) Both branches run in
        one U-Net call on the batch [x_t; x_t] with [uncond; cond], at most ``max_batch`` samples
        (2·max_batch rows) per call; s = 1 skips the unconditional half. With ``fast.cuda_graph`` each
        call shape is recorded once and replayed (:class:`carv3d.teacher.graphs.CapturedUNet`). The U-Net runs in the teacher
        dtype; guidance and the v/x₀ → ε conversion (:func:`model_output_to_noise`) in float32.

        Args:
            x_t: (M, C, h, w) noisy latents.
            t: (M,) integer timesteps in [0, num_train_timesteps).
            cond: M rows (see :meth:`Conditioning.select`).
            guidance_scale: s.

        Returns:
            ε̂: (M, C, h, w) float32 on the teacher's device (no gradient).
        """
        scale = float(guidance_scale)

        def guided(x: torch.Tensor, tt: torch.Tensor, rows: slice) -> torch.Tensor:
            if scale == 1.0:
                return self._unet_noise(x, tt, cond.cond[rows])
            eps_u, eps_c = self._unet_noise(torch.cat([x, x]), torch.cat([tt, tt]),
                                            torch.cat([cond.uncond[rows], cond.cond[rows]])).chunk(2)
            return eps_u + scale * (eps_c - eps_u)

        return self._in_chunks(x_t, t, cond, guided)[0]

    @torch.no_grad()
    def predict_noise_branches(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ε_u, ε_c)`` from the same batched call as :meth:`predict_noise`, before guidance, each
        (M, C, h, w) float32 and converted to ε like it (for guidances that use the two apart)."""

        def both(x: torch.Tensor, tt: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            eps_u, eps_c = self._unet_noise(torch.cat([x, x]), torch.cat([tt, tt]),
                                            torch.cat([cond.uncond[rows], cond.cond[rows]])).chunk(2)
            return eps_u, eps_c

        uncond, cond_ = self._in_chunks(x_t, t, cond, both)
        return uncond, cond_

    def _unet_noise(self, x: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """One U-Net call in the teacher dtype → float32, the first C channels (a model that also
        predicts its variance, such as DeepFloyd IF, outputs 2·C; the ε half comes first)."""
        out = self._unet_call(x.to(self.dtype), t, hidden.to(self.device, self.dtype)).to(self._output_dtype)
        channels = x.shape[1]
        return out if out.shape[1] == channels else out[:, :channels]

    def _in_chunks(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, fn) -> tuple[torch.Tensor, ...]:
        """Check shapes, run ``fn(x, t, rows)`` on ``max_batch`` rows at a time and convert each of its
        outputs from the model's prediction type to ε (:func:`model_output_to_noise`)."""
        m = x_t.shape[0]
        if x_t.dim() != 4 or x_t.shape[1] != self.latent_shape[0]:
            raise ValueError(f"x_t must be (M, {self.latent_shape[0]}, h, w), got {tuple(x_t.shape)}")
        t = t.to(self.device, torch.long).reshape(-1)
        if t.shape != (m,) or len(cond) != m:
            raise ValueError(f"t must be ({m},) and cond must have {m} rows, got {tuple(t.shape)} and {len(cond)}")
        x_t = x_t.detach().to(self.device, self._output_dtype)
        outs: Optional[tuple[torch.Tensor, ...]] = None
        for start in range(0, m, self.max_batch):
            rows = slice(start, start + self.max_batch)
            tt = t[rows]
            result = fn(x_t[rows], tt, rows)
            result = result if isinstance(result, tuple) else (result,)
            if outs is None:
                outs = tuple(torch.empty_like(x_t) for _ in result)
            alpha_bar = self.alphas_cumprod[tt].to(x_t.dtype)
            for out, value in zip(outs, result):
                out[rows] = model_output_to_noise(value, x_t[rows], alpha_bar, self.prediction_type)
        assert outs is not None
        return outs


class PixelDiffusionTeacher(DiffusersTeacher):
    """A pixel-space teacher (no VAE; the embedded teacher): x is the render itself in [−1, 1]."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1], resized to S × S → x = 2·img − 1: (N, 3, S, S) float32."""
        return self._resize_to_unit_range(images).to(self._output_dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class LatentDiffusionTeacher(DiffusersTeacher):
    """A latent teacher (Stable Diffusion): x is the VAE latent of the render.

    ``encode`` returns ``scaling_factor · (E(2·img − 1) − shift)`` with E the VAE encoder's posterior
    *mean*. threestudio draws ``latent_dist.sample()``; carv3d uses the mean so that encode is
    deterministic (the estimator reuses one x for K noise draws and backpropagates through the same
    x it scored). Stable Diffusion's posterior std is ~1e-3 of the latent scale, so the two differ
    negligibly.
    """

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1] → x: (N, *latent_shape) float32 (computed in the teacher dtype)."""
        pixels = self._resize_to_unit_range(images)
        assert self._encode_call is not None
        mean = self._encode_call(pixels.to(self.device, self.dtype))
        return ((mean - self.shift_factor) * self.scaling_factor).to(self._output_dtype)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        latents = x.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        pixels = self.vae.decode(latents).sample.float()
        return ((pixels + 1.0) / 2.0).clamp(0.0, 1.0)
