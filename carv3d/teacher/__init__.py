"""Frozen diffusion teachers behind one small interface (see :mod:`carv3d.teacher.base`).

    teacher = load_teacher(cfg.teacher, device)              # teacher.type's implementation (diffusers:
                                                             # Stable Diffusion or the embedded teacher)
    emb = teacher.embed("a red cube", negative_prompt="")    # cached text embeddings (+ view variants)
    x = teacher.encode(rgb)                                  # (N, 3, H, W) in [0, 1] → (N, C, h, w)
    cond = teacher.conditioning(emb, ["front", "side"]).select(index)
    eps = teacher.predict_noise(x_t, t, cond, guidance_scale=7.5)   # ε_u + s(ε_c − ε_u)
"""

from carv3d.teacher.base import VIEW_SUFFIXES, Conditioning, PromptEmbedding, Teacher, build_conditioning
from carv3d.teacher.diffusers_teacher import (DiffusersTeacher, LatentDiffusionTeacher, PixelDiffusionTeacher,
                                              model_output_to_noise)
from carv3d.teacher.folder import TeacherFolder, inspect_teacher_folder
from carv3d.teacher.loading import TEACHERS, hf_cache_dir, load_teacher, resolve_dtype, resolve_teacher_path
from carv3d.teacher.tokenizer import write_word_level_clip_tokenizer
from carv3d.teacher.vocabulary import VOCABULARY_FILE, PromptVocabulary

__all__ = [
    "Conditioning",
    "DiffusersTeacher",
    "LatentDiffusionTeacher",
    "PixelDiffusionTeacher",
    "TEACHERS",
    "PromptEmbedding",
    "PromptVocabulary",
    "Teacher",
    "TeacherFolder",
    "VIEW_SUFFIXES",
    "VOCABULARY_FILE",
    "build_conditioning",
    "hf_cache_dir",
    "inspect_teacher_folder",
    "load_teacher",
    "model_output_to_noise",
    "resolve_dtype",
    "resolve_teacher_path",
    "write_word_level_clip_tokenizer",
]
