"""Closed-vocabulary teachers: which words a prompt may use, and a helpful error when it doesn't.

A teacher folder may hold ``carv3d_vocabulary.json`` (the embedded teacher's training script writes
it), a mapping of word groups to lists of words or short phrases, for example::

    {"objects": ["cube", "sphere", ...], "colours": ["red", ...], "views": ["front", ...]}

Every group that is a list of strings adds its words to the known set, and so do the words of the view
suffixes the teacher itself appends (:data:`carv3d.teacher.base.VIEW_SUFFIXES`: ``", front view"``):
a teacher used view-dependently was trained on them, so ``"a red cube, front view"`` is accepted. A
prompt is accepted when each of its words, lower-cased and ignoring punctuation and
:data:`STOP_WORDS`, is known and, when the file has an ``"objects"`` group, it names exactly one
object (``"a red"`` is refused with the list of objects, ``"a red cube, a blue sphere"`` because the
teacher learnt one object per image). Symbols (emoji, ``♥``, ``+``) are words it does not know, not
punctuation: ``"a red 🟥 cube"`` would otherwise train ``"a red cube"`` without a word. A negative
prompt needs no object and may name several.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from carv3d.errors import PromptError, TeacherWeightsError
from carv3d.teacher.base import VIEW_SUFFIXES

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
        words: every known word (entries split into words), the words of the view suffixes
            (:data:`VIEW_SUFFIXES`), plus :data:`STOP_WORDS`.
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
        words |= {word for suffix in VIEW_SUFFIXES.values() for word in prompt_words(suffix)}
        return cls(groups=groups, words=frozenset(words | STOP_WORDS))

    @property
    def objects(self) -> tuple[str, ...]:
        """The ``"objects"`` group (empty when the file does not name objects)."""
        return self.groups.get("objects", ())

    def named_objects(self, text: str) -> list[str]:
        """The object words (or phrases) of the vocabulary that ``text`` names, in vocabulary order."""
        words = prompt_words(text)
        found = []
        for entry in self.objects:
            parts = prompt_words(entry)
            if parts and any(words[i:i + len(parts)] == parts for i in range(len(words) - len(parts) + 1)):
                found.append(entry)
        return found

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` that are not known, then its symbols (Unicode category S: emoji, ``♥``,
        ``+``), in order of appearance, without repeats."""
        unknown = [w for w in prompt_words(text) if w not in self.words]
        symbols = [c for c in text if unicodedata.category(c).startswith("S")]
        return list(dict.fromkeys(unknown + symbols))

    def check(self, text: str, what: str = "prompt", where: str = "", needs_object: Optional[bool] = None) -> None:
        """Raise :class:`PromptError` listing the known objects and colours if ``text`` has unknown
        words, or (``needs_object``; default: when ``what`` is ``"prompt"``, not for a negative prompt)
        names none of the vocabulary's objects, or more than one."""
        unknown = self.unknown_words(text)
        if needs_object is None:
            needs_object = what == "prompt"
        named = self.named_objects(text)
        missing_object = bool(needs_object and self.objects and text.strip() and not named)
        several_objects = needs_object and len(named) > 1
        if not unknown and not missing_object and not several_objects:
            return
        objects = self.groups.get("objects", ())
        colours = self.groups.get("colours", self.groups.get("colors", ()))
        known = [f"Known objects: {', '.join(objects)}." if objects else "",
                 f"Known colours: {', '.join(colours)}." if colours else ""]
        others = {k: v for k, v in self.groups.items() if k not in ("objects", "colours", "colors")}
        if others:
            known.append("Other known words: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in others.items()) + ".")
        views = self.groups.get("views", ())
        view = f" or 'a {colours[0]} {objects[0]}{VIEW_SUFFIXES.get(views[0], '')}'" if views and objects and colours else ""
        example = f" Example: 'a {colours[0]} {objects[0]}'{view}." if objects and colours else ""
        teacher = f"the teacher at {where}" if where else "this teacher"
        if not unknown and several_objects:
            raise PromptError(
                f"the {what} {text!r} names {len(named)} objects ({', '.join(named)}); {teacher} learnt one object "
                f"per image, so a prompt names one: train one run per object.{example}"
            )
        if not unknown:
            raise PromptError(
                f"the {what} {text!r} names no object {teacher} knows; a prompt needs one. "
                f"{' '.join(k for k in known if k)}{example}"
            )
        raise PromptError(
            f"{teacher} understands only a small closed vocabulary, and the {what} {text!r} has unknown "
            f"word(s): {', '.join(unknown)}. {' '.join(k for k in known if k)}{example} For open-vocabulary "
            f"prompts use Stable Diffusion weights: --config configs/sd21.yaml (or configs/sd15.yaml)."
        )
