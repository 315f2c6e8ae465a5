"""Find teacher weights on this machine and load them. carv3d never downloads weights.

``teacher.pretrained`` is one of

- ``embedded``: the small teacher that ships with carv3d, ``assets/embedded_teacher`` next to the
  package (built by ``scripts/train_embedded_teacher.py``);
- a folder in the diffusers layout (see :mod:`carv3d.teacher.folder`);
- a Hugging Face repo id such as ``stabilityai/stable-diffusion-2-1-base``, looked up only in the
  local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``), as with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import logging

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

import carv3d
from carv3d.errors import ConfigError, TeacherWeightsError, UserError
from carv3d.teacher.base import Teacher
from carv3d.teacher.diffusers_teacher import DiffusersTeacher
from carv3d.teacher.fast import prepare_compile_cache, resolve_fast_paths
from carv3d.teacher.vocabulary import VOCABULARY_FILE, PromptVocabulary
from carv3d.devices import resolve_device
from carv3d.log import logger, quiet_dependencies

EMBEDDED = "embedded"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_POINT_AT_WEIGHTS = (
    "To point carv3d at weights: set teacher.pretrained=/path/to/folder (a diffusers folder with unet/, "
    "vae/, text_encoder/, tokenizer/, scheduler/), or put the repo into the local Hugging Face cache: on a "
    "machine with internet run `hf download {repo}` and copy its cache entry "
    "(models--{flat}) into {cache}, or set HF_HOME / HF_HUB_CACHE to a cache that has it."
)


def embedded_teacher_candidates() -> list[Path]:
    """Where the embedded teacher may live: inside the package, then at the repository root."""
    package = Path(carv3d.__file__).resolve().parent
    return [package / "assets" / "embedded_teacher", package.parent / "assets" / "embedded_teacher"]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment now (not at import time).

    Same precedence as huggingface_hub: ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``,
    ``XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``.
    """
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _looks_like_path(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith((".", "~")) or "\\" in text or text.count("/") > 1
            or text.endswith("/"))


def resolve_teacher_path(pretrained: str) -> Path:
    """Turn ``teacher.pretrained`` into a local folder, without touching the network.

    Raises:
        TeacherWeightsError: saying where it looked and how to point carv3d at weights.
    """
    name = (pretrained or "").strip()
    if not name:
        raise TeacherWeightsError("teacher.pretrained is empty; use 'embedded', a folder, or a Hugging Face repo id.")
    if name == EMBEDDED:
        for candidate in embedded_teacher_candidates():
            if candidate.is_dir():
                return candidate
        looked = " and ".join(str(c) for c in embedded_teacher_candidates())
        raise TeacherWeightsError(
            f"the embedded teacher is not built yet: no folder at {looked}. Build it with "
            f"`python scripts/train_embedded_teacher.py` (see its --help), or point teacher.pretrained at "
            f"Stable Diffusion weights (e.g. --config configs/sd21.yaml with the weights in a local folder "
            f"or the local Hugging Face cache)."
        )
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherWeightsError(f"teacher.pretrained={name} is a file; it must be a diffusers folder.")
        if not ((path / "model_index.json").is_file() or (path / "unet").is_dir()):
            raise TeacherWeightsError(
                f"teacher folder {path.resolve()} has neither model_index.json nor unet/, so it is not a "
                f"diffusers teacher. It should hold unet/, text_encoder/, tokenizer/, scheduler/ (and vae/ "
                f"for Stable Diffusion), as written by DiffusionPipeline.save_pretrained."
            )
        return path.resolve()
    cache = hf_cache_dir()
    if _looks_like_path(name):
        raise TeacherWeightsError(f"teacher folder {path} does not exist. "
                                  + _POINT_AT_WEIGHTS.format(repo="<repo>", flat="<owner>--<name>", cache=cache))
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise TeacherWeightsError(
            f"teacher.pretrained={name!r} is neither an existing folder nor a valid Hugging Face repo id "
            f"(owner/name). Use 'embedded', a folder, or a repo id."
        ) from None
    try:
        snapshot = Path(snapshot_download(name, cache_dir=cache, local_files_only=True))
    except Exception as err:  # LocalEntryNotFoundError and friends: not in the cache
        hf_home = os.environ.get("HF_HOME", "unset")
        raise TeacherWeightsError(
            f"the Hugging Face repo '{name}' is not in the local cache: looked in {cache} (HF_HOME={hf_home}) "
            f"and found no snapshot, and there is no folder named {name} under {Path.cwd()}. carv3d never "
            f"downloads weights. "
            + _POINT_AT_WEIGHTS.format(repo=name, flat=name.replace("/", "--"), cache=cache)
        ) from err
    logger.info("teacher: %s found in the local Hugging Face cache at %s", name, snapshot)
    return snapshot


def closed_vocabulary(pretrained: str) -> tuple[Optional[PromptVocabulary], str]:
    """The :class:`~carv3d.teacher.vocabulary.PromptVocabulary` of the teacher ``pretrained`` names (or
    None) and the teacher's folder.

    None when the teacher has no vocabulary file (Stable Diffusion: any prompt) or its weights are
    not on this machine (e.g. they live on a sweep's Ray workers): then the run checks its prompt
    when it loads the teacher. Used where prompts are checked before any run (sweeps, ``carv3d doctor``).
    """
    try:
        folder = resolve_teacher_path(pretrained)
    except UserError as err:
        logger.debug("prompts not checked up front for teacher %r (%s)", pretrained, err)
        return None, pretrained
    vocabulary_file = folder / VOCABULARY_FILE
    return (PromptVocabulary.from_file(vocabulary_file) if vocabulary_file.is_file() else None), str(folder)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → float16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"teacher.dtype is '{name}'; expected one of: auto, {', '.join(DTYPES)}.")
    if device.type == "cpu" and name == "float16":
        logger.warning("teacher: float16 on CPU is slow and poorly supported; consider teacher.dtype=float32")
    return DTYPES[name]


# teacher.type → loader; each takes (teacher_cfg, device) and returns a carv3d.teacher.base.Teacher.
TEACHERS: dict[str, Callable[[Any, torch.device], Any]] = {}


def load_teacher(teacher_cfg: Any, device: Union[str, torch.device] = "auto") -> Teacher:
    """The one teacher factory: the implementation ``teacher_cfg.type`` names, loaded on ``device``.

    Raises:
        TeacherWeightsError: weights not found, incomplete or corrupted.
    """
    device = resolve_device(device, option="teacher device")
    if logger.getEffectiveLevel() > logging.DEBUG:
        quiet_dependencies()  # transformers/diffusers chatter (loading bars, optional backends)
    return TEACHERS[str(teacher_cfg.type)](teacher_cfg, device)


def load_diffusers_teacher(teacher_cfg: Any, device: torch.device) -> DiffusersTeacher:
    """``teacher.type: diffusers`` (a :class:`carv3d.config.DiffusersTeacherConfig` node).

    Uses ``pretrained`` (where), ``dtype`` (auto: fp16 on CUDA, fp32 on CPU), ``resolution`` and
    ``max_batch``, and the fast paths ``cuda_graph``, ``channels_last``, ``compile`` (CUDA only,
    see :mod:`carv3d.teacher.fast`); ``guidance_scale``, ``negative_prompt`` and
    ``view_dependent_prompting`` are for the caller of ``embed`` / ``predict_noise``.
    """
    folder = resolve_teacher_path(str(teacher_cfg.pretrained))
    fast = resolve_fast_paths(teacher_cfg, device)
    prepare_compile_cache(fast, teacher_cfg)
    return DiffusersTeacher.from_folder(
        folder, device=device, dtype=resolve_dtype(str(teacher_cfg.dtype), device),
        resolution=int(teacher_cfg.resolution), max_batch=int(teacher_cfg.max_batch), fast=fast,
    )


TEACHERS["diffusers"] = load_diffusers_teacher
