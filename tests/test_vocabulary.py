"""The closed vocabulary of the embedded teacher: view phrases accepted, a prompt must name an object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carv3d.errors import PromptError
from carv3d.teacher.base import VIEW_SUFFIXES
from carv3d.teacher.vocabulary import VOCABULARY_FILE, PromptVocabulary

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "assets" / "embedded_teacher" / VOCABULARY_FILE


def _vocabulary(tmp_path: Path, data: dict) -> PromptVocabulary:
    path = tmp_path / VOCABULARY_FILE
    path.write_text(json.dumps(data))
    return PromptVocabulary.from_file(path)


@pytest.fixture
def small(tmp_path: Path) -> PromptVocabulary:
    return _vocabulary(tmp_path, {"objects": ["cube", "sphere"], "colours": ["red", "blue"], "views": list(VIEW_SUFFIXES)})


@pytest.mark.parametrize("suffix", list(VIEW_SUFFIXES.values()))
def test_every_view_suffix_the_teacher_appends_is_accepted(small: PromptVocabulary, suffix: str) -> None:
    assert small.unknown_words("a red cube" + suffix) == []
    small.check("A red cube" + suffix)  # no error


@pytest.mark.skipif(not EMBEDDED.is_file(), reason="the embedded teacher is not built")
@pytest.mark.parametrize("text", ["a red cube, front view", "an orange cube, overhead view", "A blue duck, back view"])
def test_the_embedded_teacher_accepts_its_training_prompts(text: str) -> None:
    vocabulary = PromptVocabulary.from_file(EMBEDDED)
    assert vocabulary.unknown_words(text) == []
    vocabulary.check(text)
    assert vocabulary.named_objects(text) == [text.split(",")[0].split()[-1]]


@pytest.mark.parametrize("text", ["a red", "red", "a blue, front view"])
def test_a_prompt_without_an_object_is_refused_with_the_known_objects(small: PromptVocabulary, text: str) -> None:
    with pytest.raises(PromptError) as err:
        small.check(text, "prompt", "/teachers/closed")
    message = str(err.value)
    assert "names no object" in message and "Known objects: cube, sphere." in message
    assert "/teachers/closed" in message and "'a red cube'" in message


def test_a_negative_prompt_needs_no_object(small: PromptVocabulary) -> None:
    small.check("blue", "negative prompt (teacher.negative_prompt)")
    small.check("", "negative prompt (teacher.negative_prompt)")
    with pytest.raises(PromptError, match="names no object"):
        small.check("blue", "negative prompt (teacher.negative_prompt)", needs_object=True)


def test_unknown_words_are_still_named_and_objects_may_be_phrases(tmp_path: Path) -> None:
    vocabulary = _vocabulary(tmp_path, {"objects": ["teddy bear"], "colours": ["red"]})
    vocabulary.check("a red teddy bear, side view")
    assert vocabulary.named_objects("a red bear") == []
    with pytest.raises(PromptError, match="names no object"):
        vocabulary.check("a red bear")
    with pytest.raises(PromptError, match="unknown word.*: teapot"):
        vocabulary.check("a red teapot")


def test_a_file_without_objects_does_not_require_one(tmp_path: Path) -> None:
    vocabulary = _vocabulary(tmp_path, {"words": ["red", "shiny"]})
    vocabulary.check("a red")
    assert vocabulary.objects == ()
