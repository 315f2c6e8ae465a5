"""Closed-vocabulary teachers: which words a prompt may use, and a helpful error when it doesn't.

A teacher folder may hold ``carv3d_vocabulary.json`` (the embedded teacher's training script writes
it), a mapping of word groups to lists of words or short phrases, for example::

    {"objects": ["cube", "sphere", ...], "colours": ["red", ...], "views": ["front", ...]}

Every group that is a list of strings adds its words to the known set. A prompt is accepted when
each of its words, lower-cased and ignoring punctuation and :data:`STOP_WORDS`, is known.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from carv3d.errors import PromptError, TeacherWeightsError

VOCABULARY_FILE = "carv3d_vocabulary.json"
STOP_WORDS = frozenset({"a", "an", "the", "of"})
_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits; punctuation separates words


def prompt_words(text: str) -> list[str]:
    """The lower-cased words of a prompt: ``"A red cube, front view"`` → ``[a, red, cube, front, view]``."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class PromptVocabulary:
    """The words a closed-vocabulary teacher was trained on.

    Attributes:
        groups: group name → its entries, as in the file ("objects", "colours", "views", …).
        words: every known word (entries split into words), plus :data:`STOP_WORDS`.
    """

    groups: dict[str, tuple[str, ...]]
    words: frozenset[str]

    @classmethod
    def from_file(cls, path: Path) -> "PromptVocabulary":
        """Read ``carv3d_vocabulary.json``; a malformed file is a :class:`TeacherWeightsError`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise TeacherWeightsError(
                f"the teacher's vocabulary file {path} cannot be read ({err}). Rebuild the teacher folder "
                f"or delete the file to allow any prompt."
            ) from None
        if not isinstance(data, dict):
            raise TeacherWeightsError(f"the teacher's vocabulary file {path} must hold a JSON object of word lists.")
        groups = {
            str(name): tuple(str(entry) for entry in entries)
            for name, entries in data.items()
            if isinstance(entries, list) and all(isinstance(entry, str) for entry in entries)
        }
        words = {word for entries in groups.values() for entry in entries for word in prompt_words(entry)}
        return cls(groups=groups, words=frozenset(words | STOP_WORDS))

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not known, in order of appearance, without repeats."""
        return list(dict.fromkeys(w for w in prompt_words(text) if w not in self.words))

    def check(self, text: str, what: str = "prompt", where: str = "") -> None:
        """Raise :class:`PromptError` listing the known objects and colours if ``text`` has unknown words."""
        unknown = self.unknown_words(text)
        if not unknown:
            return
        objects = self.groups.get("objects", ())
        colours = self.groups.get("colours", self.groups.get("colors", ()))
        known = [f"Known objects: {', '.join(objects)}." if objects else "",
                 f"Known colours: {', '.join(colours)}." if colours else ""]
        others = {k: v for k, v in self.groups.items() if k not in ("objects", "colours", "colors")}
        if others:
            known.append("Other known words: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in others.items()) + ".")
        example = f" Example: 'a {colours[0]} {objects[0]}'." if objects and colours else ""
        teacher = f"the teacher at {where}" if where else "this teacher"
        raise PromptError(
            f"{teacher} understands only a small closed vocabulary, and the {what} {text!r} has unknown "
            f"word(s): {', '.join(unknown)}. {' '.join(k for k in known if k)}{example} For open-vocabulary "
            f"prompts use Stable Diffusion weights: --config configs/sd21.yaml (or configs/sd15.yaml)."
        )
