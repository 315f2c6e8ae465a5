"""Every Python file of the project compiles without warnings (Python 3.12 prints a SyntaxWarning
for an invalid escape such as "\\m" in a docstring with formulas: such docstrings are raw strings)."""

from __future__ import annotations

import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_source_file_compiles_without_warnings():
    files = sorted(p for folder in ("carv3d", "scripts", "tests") for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 100
    problems = []
    for path in files:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # invalid escapes: DeprecationWarning (3.11), SyntaxWarning (3.12+)
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
        problems += [f"{path.relative_to(REPO)}:{w.lineno}: {w.message}" for w in caught]
    assert not problems, "\n".join(problems)
