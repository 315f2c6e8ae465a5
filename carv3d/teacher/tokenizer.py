"""A CLIP tokenizer with a small hand-written vocabulary, built offline.

CLIP tokenizes with byte-level BPE: a word is lower-cased, split into bytes, each byte is shown as
one printable unicode character (GPT-2's ``bytes_to_unicode`` table), the last one carries the
end-of-word marker ``</w>``, and merges from ``merges.txt`` are applied in rank order until none
applies. A merge ``a b`` may only produce a token that is in ``vocab.json``.

To make every given word a *single* token regardless of how merge ranks interleave between words,
the vocabulary holds every contiguous substring of every word, and the merges hold every split of
every substring: for a word ``w`` of length L (in byte characters) and ``0 <= i < k < j <= L``

    merge  (w[i:k], w[k:j] + end(j))  →  w[i:j] + end(j),    end(j) = "</w>" if j == L else ""

Whatever state BPE is in, the symbols of ``w`` partition it into substrings, any two neighbours
form a substring with a merge of its own, so BPE only stops at one token. Any other text still
tokenizes (the 256 byte characters, with and without ``</w>``, are in the vocabulary), just into
several tokens. Sizes: 512 + O(ΣL²) tokens and O(ΣL³) merges — a few thousand for 30 short words.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

from transformers import CLIPTokenizer

END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the other 68 (control characters, space, …) map to
    ``chr(256 + n)`` in byte order, so that no token contains whitespace.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _byte_chars(word: str) -> list[str]:
    table = bytes_to_unicode()
    return [table[b] for b in word.encode("utf-8")]


def word_level_vocab_and_merges(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary (token → id) and ranked merges that make each of ``words`` one token.

    Ids: the 256 byte characters, then the same with ``</w>``, then the multi-character substrings
    of the words in order of first appearance (shorter first), then ``<|startoftext|>`` and
    ``<|endoftext|>`` (CLIP's own layout).
    """
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    tokens: list[str] = alphabet + [c + END_OF_WORD for c in alphabet]
    seen = set(tokens)
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    chars_of = [_byte_chars(w.lower()) for w in dict.fromkeys(words)]
    max_len = max((len(c) for c in chars_of), default=0)
    for length in range(2, max_len + 1):  # shorter substrings first (any order would work)
        for chars in chars_of:
            n = len(chars)
            for i in range(0, n - length + 1):
                j = i + length
                end = END_OF_WORD if j == n else ""
                token = "".join(chars[i:j]) + end
                if token not in seen:
                    seen.add(token)
                    tokens.append(token)
                for k in range(i + 1, j):
                    pair = ("".join(chars[i:k]), "".join(chars[k:j]) + end)
                    if pair not in seen_merges:
                        seen_merges.add(pair)
                        merges.append(pair)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_word_level_clip_tokenizer(
    words: Sequence[str], directory: Union[str, Path], model_max_length: int = 77
) -> CLIPTokenizer:
    """Write a CLIP tokenizer in which each of ``words`` is exactly one token.

    Writes ``vocab.json`` and ``merges.txt`` (see the module docstring for the construction), loads
    them with ``CLIPTokenizer.from_pretrained`` and saves the result with ``save_pretrained`` into
    ``directory`` (adding ``tokenizer.json`` and ``tokenizer_config.json``), so the folder loads like
    any Stable Diffusion ``tokenizer/`` folder.

    Args:
        words: the words that must be single tokens, e.g. colours, objects, view words, "a", ",".
            Each must be one CLIP pre-token: a run of letters, a single digit, or a run of
            punctuation (CLIP splits "t-shirt" into three pre-tokens).
        directory: the output folder (created).
        model_max_length: the padded prompt length (77 in Stable Diffusion).

    Returns:
        The tokenizer, loaded back from ``directory``.

    Raises:
        ValueError: a word is empty or does not come out as a single token.
    """
    if any(not w or w.strip() != w for w in words):
        raise ValueError(f"words must be non-empty and without surrounding whitespace, got {list(words)!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = word_level_vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(
        directory, model_max_length=model_max_length, local_files_only=True
    )
    not_single = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if not_single:
        raise ValueError(
            f"these words do not tokenize to one CLIP token (CLIP splits on punctuation, digits and "
            f"spaces): {not_single!r}"
        )
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory, local_files_only=True)
