"""Sweep files as YAML whose every key and list item knows its line, so errors can say ``FILE:LINE``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carv3d.sweep.errors import SweepError
from carv3d.yaml_file import read_yaml_file


def read_yaml_with_lines(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse ``path`` once; return the data and the 1-based line of every mapping key and list item.

    Lines are keyed by their path in the document: ``("grid", "train.seed")`` is the line of that
    key, ``("grid", "train.seed", 2)`` the line of its third value.
    """
    import yaml

    data, node = read_yaml_file(path, "sweep file", "examples live in configs/sweeps/", SweepError)
    lines: dict[tuple[Any, ...], int] = {}

    def walk(n: Any, prefix: tuple[Any, ...]) -> None:
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = (prefix + (key_node.value,))
                lines[key] = key_node.start_mark.line + 1  # merged keys come first: an explicit one's line wins
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[prefix + (i,)] = item.start_mark.line + 1
                walk(item, prefix + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


class Located:
    """Formats messages as ``FILE:LINE: ...`` from the document paths of :func:`read_yaml_with_lines`."""

    def __init__(self, path: Path, lines: dict[tuple[Any, ...], int]):
        self.path = path
        self.lines = lines

    def at(self, *doc_path: Any) -> str:
        while doc_path and doc_path not in self.lines:
            doc_path = doc_path[:-1]
        line = self.lines.get(doc_path)
        return f"{self.path}:{line}" if line else str(self.path)

    def error(self, doc_path: tuple[Any, ...], message: str) -> SweepError:
        return SweepError(f"{self.at(*doc_path)}: {message}")
