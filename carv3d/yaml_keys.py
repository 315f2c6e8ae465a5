"""Repeated keys in a YAML file: PyYAML keeps the last of two equal keys without a word.

A second ``train:`` section in a config, or a second ``grid:`` in a sweep file, would silently
replace the first one's keys. Config and sweep files are both checked with :func:`repeated_key`,
on the composed node tree, before PyYAML constructs it (construction flattens ``<<`` merges into
the mapping, after which a merged key and the key that overrides it look like a repeat).
"""

from __future__ import annotations

from typing import Any, Optional

MERGE_TAG = "tag:yaml.org,2002:merge"


def repeated_key(node: Any) -> Optional[tuple[str, int, int]]:
    """The first key that a mapping of the composed YAML ``node`` repeats: (dotted key, its 1-based
    line, the first one's line), or None.

    A key that overrides one merged in with ``<<: *anchor`` is YAML's merge semantics, not a repeat;
    the merged mapping is checked on its own. Aliases are checked once, where their anchor is.

    >>> import yaml
    >>> repeated_key(yaml.compose("train:\\n  steps: 5\\nprompt: a cube\\ntrain:\\n  seed: 3\\n"))
    ('train', 4, 1)
    >>> repeated_key(yaml.compose("base: &b {steps: 5}\\ntrain:\\n  <<: *b\\n  steps: 6\\n")) is None
    True
    """
    import yaml

    visited: set[int] = set()

    def walk(n: Any, prefix: str) -> Optional[tuple[str, int, int]]:
        if id(n) in visited:  # an alias: its anchor's node, already checked
            return None
        visited.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in n.value:
                if key_node.tag == MERGE_TAG:  # `<<`: its mappings are checked as their own
                    found = walk(value_node, prefix)
                    if found:
                        return found
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                dotted = f"{prefix}{key}"
                if key is not None and key in seen:
                    return dotted, key_node.start_mark.line + 1, seen[key]
                if key is not None:
                    seen[key] = key_node.start_mark.line + 1
                found = walk(value_node, f"{dotted}.")
                if found:
                    return found
        elif isinstance(n, yaml.SequenceNode):
            for item in n.value:
                found = walk(item, prefix)
                if found:
                    return found
        return None

    return walk(node, "")
