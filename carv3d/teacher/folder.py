"""Check a diffusers teacher folder before loading it, so that a partial copy is a clear error.

A teacher folder has the layout that ``DiffusionPipeline.save_pretrained`` writes::

    model_index.json        (optional for carv3d)
    unet/          config.json + diffusion_pytorch_model[.fp16].safetensors
    vae/           config.json + diffusion_pytorch_model[.fp16].safetensors   (latent teachers only)
    text_encoder/  config.json + model[.fp16].safetensors
    tokenizer/     tokenizer.json, or vocab.json + merges.txt
    scheduler/     scheduler_config.json
    carv3d_vocabulary.json  (optional: closed-vocabulary teachers)

Only safetensors weights are accepted (they are data; pickled ``.bin`` files can run code).
Sharded weights (``*.safetensors.index.json``) are fine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from carv3d.errors import TeacherWeightsError
from carv3d.teacher.vocabulary import VOCABULARY_FILE

REQUIRED_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class TeacherFolder:
    """What :func:`inspect_teacher_folder` found.

    Attributes:
        path: the folder.
        has_vae: True for a latent (Stable Diffusion) teacher, False for a pixel-space one.
        variants: model subfolder → diffusers/transformers weight variant (None, or "fp16" when only
            ``*.fp16.safetensors`` files are present).
        vocabulary_file: ``carv3d_vocabulary.json`` when the teacher has a closed vocabulary.
    """

    path: Path
    has_vae: bool
    variants: dict[str, Optional[str]] = field(default_factory=dict)
    vocabulary_file: Optional[Path] = None


def _layout_hint() -> str:
    return ("A teacher folder holds unet/, text_encoder/, tokenizer/, scheduler/ and, for latent "
            "teachers such as Stable Diffusion, vae/ (the layout of DiffusionPipeline.save_pretrained).")


def _refetch_hint() -> str:
    return ("The copy looks incomplete or corrupted: copy the folder again, or on a machine with internet "
            "run `hf download <repo>` and copy the cache entry into this machine's "
            "Hugging Face cache.")


def _weights_variant(sub: Path, stem: str) -> Optional[str]:
    """The variant to load from ``sub`` (None or "fp16"); raises when there are no safetensors weights."""
    names = {p.name for p in sub.iterdir() if p.is_file()}  # is_file() is False for broken cache links
    for variant, infix in ((None, ""), ("fp16", ".fp16")):  # diffusers/transformers variant naming
        if f"{stem}{infix}.safetensors" in names or f"{stem}.safetensors.index{infix}.json" in names:
            return variant
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise TeacherWeightsError(
            f"{sub} has only pickled weights ({', '.join(pickles)}); carv3d loads safetensors weights "
            f"only, because pickles can run code when loaded. Get the .safetensors files of the same "
            f"model (most Hugging Face repos have them: `hf download <repo> --include "
            f"'*.safetensors' '*.json' '*.txt'`)."
        )
    raise TeacherWeightsError(f"{sub} has no weights file ({stem}.safetensors). {_refetch_hint()}")


def inspect_teacher_folder(folder: Path) -> TeacherFolder:
    """Check that ``folder`` is a complete diffusers teacher and say which kind it is.

    Raises:
        TeacherWeightsError: naming the folder and exactly what is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TeacherWeightsError(f"teacher folder {folder} does not exist. {_layout_hint()}")
    index_file = folder / "model_index.json"
    listed_vae = False
    if index_file.is_file():
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise TeacherWeightsError(f"{index_file} is not valid JSON ({err}). {_refetch_hint()}") from None
        vae_entry = index.get("vae") if isinstance(index, dict) else None
        listed_vae = isinstance(vae_entry, list) and vae_entry[:1] != [None]
    required = REQUIRED_SUBFOLDERS + (("vae",) if listed_vae else ())
    missing = [name + "/" for name in required if not (folder / name).is_dir()]
    if missing:
        why = " (model_index.json lists a vae)" if listed_vae and "vae/" in missing else ""
        raise TeacherWeightsError(
            f"teacher folder {folder} is missing {', '.join(missing)}{why}. {_layout_hint()} {_refetch_hint()}"
        )
    has_vae = (folder / "vae").is_dir()
    variants: dict[str, Optional[str]] = {}
    for name, stem in WEIGHT_STEMS.items():
        sub = folder / name
        if not sub.is_dir():
            continue
        if not (sub / "config.json").is_file():
            raise TeacherWeightsError(f"{sub} has no config.json. {_refetch_hint()}")
        variants[name] = _weights_variant(sub, stem)
    tokenizer = folder / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file()
            or ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file())):
        raise TeacherWeightsError(f"{tokenizer} has neither tokenizer.json nor vocab.json + merges.txt. {_refetch_hint()}")
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise TeacherWeightsError(f"{folder / 'scheduler'} has no scheduler_config.json. {_refetch_hint()}")
    vocabulary = folder / VOCABULARY_FILE
    return TeacherFolder(folder, has_vae, variants, vocabulary if vocabulary.is_file() else None)
