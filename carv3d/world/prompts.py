"""Prompts of the embedded world: ``"a red cube"`` or ``"a red cube, front view"``.

The grammar is ``[a|an] <colour> <object>[, <view> view]`` with the words of
:data:`carv3d.world.objects.COLOURS`, :data:`carv3d.world.objects.OBJECTS` and the view words of
:data:`carv3d.cameras.VIEW_LABELS`; the view suffix is exactly the one carv3d's teachers append
(:data:`carv3d.teacher.base.VIEW_SUFFIXES`: ``", front view"``). Words are case-insensitive and
punctuation is ignored when parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from carv3d.errors import PromptError
from carv3d.cameras import VIEW_LABELS
from carv3d.world.objects import COLOUR_NAMES, OBJECT_NAMES

ARTICLES = ("a", "an")
VIEW_WORD = "view"
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class WorldPrompt:
    """A parsed prompt. ``view`` is None for a prompt without a view suffix."""

    colour: str
    object: str
    view: Optional[str] = None

    @property
    def text(self) -> str:
        return format_prompt(self.colour, self.object, self.view)


def article(word: str) -> str:
    """``an`` before a vowel sound (``an orange cube``), else ``a``."""
    return "an" if word[:1] in "aeiou" else "a"


def format_prompt(colour: str, object_name: str, view: Optional[str] = None, article_word: Optional[str] = None) -> str:
    """``format_prompt("red", "cube", "front")`` → ``"a red cube, front view"``; no view, no suffix."""
    text = f"{article_word or article(colour)} {colour} {object_name}"
    return f"{text}, {view} {VIEW_WORD}" if view else text


def vocabulary() -> dict[str, list[str]]:
    """The closed vocabulary, as written to ``carv3d_vocabulary.json``."""
    return {"objects": list(OBJECT_NAMES), "colours": list(COLOUR_NAMES), "views": list(VIEW_LABELS)}


def tokenizer_words() -> list[str]:
    """Every word a training prompt uses; each becomes one token of the teacher's tokenizer."""
    return [*ARTICLES, ",", VIEW_WORD, *COLOUR_NAMES, *OBJECT_NAMES, *VIEW_LABELS]


def _known_words_message() -> str:
    return (f"Known objects: {', '.join(OBJECT_NAMES)}. Known colours: {', '.join(COLOUR_NAMES)}. "
            f"Views (optional): {', '.join(VIEW_LABELS)}. Example: 'a red cube' or 'a red cube, front view'.")


def parse_prompt(text: str) -> WorldPrompt:
    """Parse ``"a red cube"`` / ``"A red cube, front view"`` into (colour, object, view).

    Raises:
        PromptError: empty text, unknown words (the message lists the objects and colours), or known
            words in the wrong order.
    """
    words = _WORD.findall((text or "").lower())
    if not words:
        raise PromptError(f"the prompt is empty. {_known_words_message()}")
    known = set(ARTICLES) | {VIEW_WORD} | set(COLOUR_NAMES) | set(OBJECT_NAMES) | set(VIEW_LABELS)
    unknown = list(dict.fromkeys(w for w in words if w not in known))
    if unknown:
        raise PromptError(f"the prompt {text!r} has word(s) the embedded world does not know: "
                          f"{', '.join(unknown)}. {_known_words_message()}")
    if words[0] in ARTICLES:
        words = words[1:]
    view: Optional[str] = None
    if len(words) == 4 and words[2] in VIEW_LABELS and words[3] == VIEW_WORD:
        view, words = words[2], words[:2]
    if len(words) != 2 or words[0] not in COLOUR_NAMES or words[1] not in OBJECT_NAMES:
        raise PromptError(f"the prompt {text!r} is not of the form '[a] <colour> <object>[, <view> view]'. "
                          f"{_known_words_message()}")
    return WorldPrompt(colour=words[0], object=words[1], view=view)
