"""Sweep files as YAML whose every key and list item knows its line, so errors can say ``FILE:LINE``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carv3d.sweep.errors import SweepError
from carv3d.yaml_keys import repeated_key


def read_yaml_with_lines(path: Path) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """Parse ``path`` once; return the data and the 1-based line of every mapping key and list item.

    Lines are keyed by their path in the document: ``("grid", "train.seed")`` is the line of that
    key, ``("grid", "train.seed", 2)`` the line of its third value.
    """
    import yaml

    if path.is_dir():
        raise SweepError(f"sweep file '{path}' is a directory; pass a YAML file (examples live in configs/sweeps/).")
    if not path.is_file():
        raise SweepError(f"sweep file '{path}' does not exist. Examples live in configs/sweeps/.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SweepError(f"sweep file '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML.") from None
    except OSError as err:
        raise SweepError(f"sweep file '{path}' cannot be read ({err.strerror}).") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        repeated = repeated_key(node) if node is not None else None  # before construction flattens `<<` merges
        if repeated:
            key, line, first = repeated
            raise SweepError(f"{path}:{line}: '{key}' is set twice (first on line {first}); YAML keeps only the "
                             f"last, so the first one's values would be lost. Merge them into one.")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        context = ""
        if err.context and err.context_mark is not None:  # where the unclosed thing began
            context = f"{err.context} started at line {err.context_mark.line + 1}: "
        raise SweepError(f"{where}: the sweep file is not valid YAML ({context}{err.problem}). "
                         "Check the indentation, brackets and quoting there.") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: the sweep file is not valid YAML ({str(err).splitlines()[0]}).") from None
    finally:
        loader.dispose()

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
