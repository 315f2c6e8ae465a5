"""Config and sweep files as YAML: read, parsed and checked once, every fault a one-line error.

:func:`read_yaml_file` is the one reader of both kinds of file. Its errors say ``FILE:LINE:COL``
and why (a tab in the indentation, an unclosed bracket), name a key set twice (:func:`repeated_key`:
PyYAML keeps the last of two equal keys without a word, so a second ``train:`` section in a config,
or a second ``grid:`` in a sweep file, would silently replace the first one's keys), and refuse a
folder or a file that is not UTF-8 text.
"""

from __future__ import annotations

from pathlib import Path
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


def read_yaml_file(path: Path, what: str, examples: str, error: type[Exception]) -> tuple[Any, Any]:
    """Parse ``path``; return its data and its composed node tree (None for an empty file), whose
    nodes know their lines. ``what`` names the file in messages (``"config file"``), ``examples``
    says where good ones live, and every fault is raised as ``error`` with one line.

    Repeats are looked for on the composed tree, before PyYAML constructs it: construction flattens
    ``<<`` merges into the mapping, after which a merged key and the key that overrides it (YAML's
    merge semantics) would look like a repeat.
    """
    import yaml

    if path.is_dir():
        raise error(f"{what} '{path}' is a directory; pass a YAML file ({examples}).")
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist ({examples}).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: {what} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML.") from None
    except OSError as err:
        raise error(f"{what} '{path}' cannot be read ({err.strerror}).") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        repeated = repeated_key(node) if node is not None else None
        if repeated:
            key, line, first = repeated
            raise error(f"{path}:{line}: '{key}' is set twice (first on line {first}); YAML keeps only the last, "
                        f"so the first one's values would be lost. Merge them into one.")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = ""
        if err.context and err.context_mark is not None:  # where the unclosed thing began
            context = f"{err.context} started at line {err.context_mark.line + 1}: "
        tabs = " YAML indents with spaces, not tabs." if "\\t" in str(err.problem) else ""
        raise error(f"{where}: {what} is not valid YAML ({context}{err.problem}). "
                    f"Check the indentation, brackets and quoting there.{tabs}") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: {what} is not valid YAML ({str(err).splitlines()[0]}).") from None
    finally:
        loader.dispose()
    return data, node
