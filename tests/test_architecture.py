"""The house's import rules: no import cycle inside carv3d, no forbidden arrow, no script importing another.

The walker reads every module under carv3d/ with :mod:`ast` — imports at module level and inside
functions alike, except those under ``if TYPE_CHECKING:`` — and builds the graph of carv3d-internal
imports. An edge goes to the module actually named: ``import carv3d.a.b`` and ``from carv3d.a import
b`` (b a submodule) point at ``carv3d.a.b``; ``from carv3d.a import name`` (name not a submodule)
points at ``carv3d.a``. A package's ``__init__`` importing its own submodules is how packages work and
is left out of the cycle search (an import of ``carv3d.a.b`` runs ``carv3d.a`` first anyway).

Today's violations are listed in KNOWN_VIOLATIONS. The test fails on a violation that is not listed
*and* on a listed one that no longer exists, so the list can only shrink: delete an entry in the
commit that removes it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Rule:
    """``importers`` (minus ``exempt``) must not import ``forbidden`` (minus ``allowed``).

    Each entry names a module or a package; a package covers all its submodules (``carv3d.export``
    covers ``carv3d.export.pipeline``, not ``carv3d.exporter``).
    """

    why: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()


# The rules of the house (shared/DESIGN.md, "Layout" and "Rules of the house"). docs/ARCHITECTURE.md
# states the same rules in words: change the two together.
RULES: tuple[Rule, ...] = (
    Rule("the estimator knows nothing about 3D: it imports nothing from carv3d outside carv3d.estimator",
         importers=("carv3d.estimator",), forbidden=("carv3d",), allowed=("carv3d.estimator",)),
    Rule("a teacher knows nothing about scenes, rendering, export, the world or the training loop",
         importers=("carv3d.teacher",),
         forbidden=("carv3d.scene", "carv3d.render", "carv3d.export", "carv3d.world", "carv3d.train", "carv3d.step",
                    "carv3d.outputs")),
    Rule("a scene (and its renderer) knows nothing about diffusion",
         importers=("carv3d.scene", "carv3d.render"), forbidden=("carv3d.teacher",)),
    Rule("nothing imports upward into the CLI layer",
         importers=("carv3d",), exempt=("carv3d.cli", "carv3d.commands"), forbidden=("carv3d.cli", "carv3d.commands")),
    Rule("test-only builders are for tests and scripts, never for the library",
         importers=("carv3d",), exempt=("carv3d.testing",), forbidden=("carv3d.testing",)),
    Rule("library modules (export, world, variance) do not reach back into run-level code: the training loop, "
         "its outputs, run directories, checkpoints, a scene loaded from a run, sweeps (a command loads the run and "
         "passes the objects)",
         importers=("carv3d.export", "carv3d.world", "carv3d.variance"),
         forbidden=("carv3d.train", "carv3d.outputs", "carv3d.run_dir", "carv3d.checkpoint", "carv3d.saved_scene",
                    "carv3d.sweep")),
)
# Renderer backends that `import carv3d.cameras` must not load (checked in a fresh interpreter).
RENDERER_BACKENDS = ("nerfacc", "tinycudann", "gsplat")

# Violations of today's tree, each ("cycle", a, b): the import a → b lies on a cycle, or
# ("arrow", a, b): a → b breaks a rule above.
KNOWN_VIOLATIONS: frozenset[tuple[str, str, str]] = frozenset({
})


# --------------------------------------------------------------------------------------------- the walker
def module_files(package_dir: Path, package: Optional[str] = None) -> dict[str, Path]:
    """Every module of the package at ``package_dir``: dotted name → file (a package is its __init__.py)."""
    package = package or package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    """All import statements of a module, at any depth, except the bodies of ``if TYPE_CHECKING:``."""

    def __init__(self) -> None:
        self.imports: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.imports.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.imports.append(node)


def import_statements(path: Path) -> list[ast.Import | ast.ImportFrom]:
    collector = _ImportCollector()
    collector.visit(ast.parse(path.read_text(), filename=str(path)))
    return collector.imports


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _known_module(name: str, modules: Mapping[str, Path]) -> Optional[str]:
    """``name`` if it is a module of the package, else its longest prefix that is (None: outside)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imported_modules(module: str, statement: ast.Import | ast.ImportFrom, modules: Mapping[str, Path]) -> list[str]:
    """The package-internal modules one import statement of ``module`` names (see the module docstring)."""
    if isinstance(statement, ast.Import):
        targets = [_known_module(alias.name, modules) for alias in statement.names]
        return [t for t in targets if t is not None]
    if statement.level:  # relative: from the module's package (a package's __init__ is its own package)
        package = module if modules[module].name == "__init__.py" else module.rpartition(".")[0]
        anchor = package.split(".")[: len(package.split(".")) - (statement.level - 1)]
        base = ".".join([*anchor, *([statement.module] if statement.module else [])])
    else:
        base = statement.module or ""
    targets = []
    for alias in statement.names:
        submodule = f"{base}.{alias.name}"
        targets.append(submodule if submodule in modules else _known_module(base, modules))
    return [t for t in targets if t is not None]


def import_graph(modules: Mapping[str, Path]) -> dict[str, dict[str, int]]:
    """module → {imported module: line of its first import}; package-internal imports only."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for statement in import_statements(path):
            for target in imported_modules(module, statement, modules):
                if target != module:
                    edges.setdefault(target, statement.lineno)
    return graph


def _strongly_connected(graph: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """Tarjan's algorithm (iterative): node → the id of its strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    component: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component[member] = index[node]
                    if member == node:
                        break
    return component


def cycle_graph(graph: Mapping[str, Mapping[str, int]]) -> dict[str, list[str]]:
    """The graph the cycle search sees: without a package's imports of its own submodules."""
    return {module: [t for t in targets if not t.startswith(module + ".")] for module, targets in graph.items()}


def _path(graph: Mapping[str, Iterable[str]], start: str, goal: str) -> list[str]:
    """A shortest path start → … → goal (breadth first)."""
    previous: dict[str, Optional[str]] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            break
        for child in graph[node]:
            if child not in previous:
                previous[child] = node
                queue.append(child)
    path, node = [], goal
    while node is not None:
        path.append(node)
        node = previous[node]
    return path[::-1]


def violations(graph: Mapping[str, Mapping[str, int]], rules: Iterable[Rule]) -> dict[tuple[str, str, str], str]:
    """Every cycle edge and forbidden arrow of ``graph``: (kind, importer, imported) → why."""
    found: dict[tuple[str, str, str], str] = {}
    edges = cycle_graph(graph)
    component = _strongly_connected(edges)
    for module, targets in edges.items():
        for target in targets:
            if component[module] == component[target]:
                cycle = [module, *_path(edges, target, module)]
                found[("cycle", module, target)] = "import cycle " + " -> ".join(cycle)
    for rule in rules:
        for module, targets in graph.items():
            if not _within(module, rule.importers) or _within(module, rule.exempt):
                continue
            for target in targets:
                if _within(target, rule.forbidden) and not _within(target, rule.allowed):
                    found[("arrow", module, target)] = rule.why
    return found


def compare_with_known(found: Mapping[tuple[str, str, str], str], known: Iterable[tuple[str, str, str]],
                       graph: Mapping[str, Mapping[str, int]], modules: Mapping[str, Path],
                       root: Path) -> list[str]:
    """Problems: a violation that is not known, or a known one that is gone (delete it from the list)."""
    known = set(known)
    problems = []
    for key in sorted(set(found) - known):
        kind, module, target = key
        where = f"{modules[module].relative_to(root)}:{graph[module][target]}"
        problems.append(f"new {kind}: {module} -> {target} ({where}): {found[key]}")
    for key in sorted(known - set(found)):
        problems.append(f"fixed, so delete it from KNOWN_VIOLATIONS: {key}")
    return problems


# ---------------------------------------------------------------------------------------------- the tests
def test_carv3d_has_no_new_import_cycle_or_forbidden_arrow():
    modules = module_files(ROOT / "carv3d")
    assert len(modules) > 50 and "carv3d.cameras" in modules  # the walker found the package
    graph = import_graph(modules)
    problems = compare_with_known(violations(graph, RULES), KNOWN_VIOLATIONS, graph, modules, ROOT)
    assert not problems, "\n".join(problems)


def test_known_violations_name_real_modules():
    modules = module_files(ROOT / "carv3d")
    for kind, module, target in KNOWN_VIOLATIONS:
        assert kind in ("cycle", "arrow") and module in modules and target in modules, (kind, module, target)


def test_importing_cameras_loads_no_renderer_backend():
    code = ("import sys, carv3d.cameras; "
            f"print(','.join(m for m in {RENDERER_BACKENDS!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import carv3d.cameras loaded {proc.stdout.strip()}"


def test_scripts_do_not_import_each_other():
    scripts = sorted((ROOT / "scripts").glob("*.py"))
    names = {path.stem for path in scripts}
    offenders = []
    for path in scripts:
        for statement in import_statements(path):
            if isinstance(statement, ast.Import):
                imported = [alias.name for alias in statement.names]
            else:
                imported = [] if statement.level else [statement.module or ""]
            offenders += [f"scripts/{path.name}:{statement.lineno} imports {name}" for name in imported
                          if name.split(".")[0] in names - {path.stem}]
    assert not offenders, "scripts call package functions, not each other:\n" + "\n".join(offenders)


# ------------------------------------------------------------------------------ the walker, on a toy package
TOY = {
    "__init__.py": "from toy.core import helper\nfrom toy import ui\n",  # a package importing its submodules
    "core.py": "def helper():\n    from toy.ui import show  # inside a function: still an arrow\n    return show\n",
    "ui.py": "from toy import core\n\ndef show():\n    return core\n",  # closes the cycle core -> ui -> core
    "typed.py": ("from typing import TYPE_CHECKING\nimport typing\nif TYPE_CHECKING:\n    import toy.ui\n"
                 "if typing.TYPE_CHECKING:\n    from toy import ui\nelse:\n    from . import core\n"),
    "sub/__init__.py": "from .leaf import VALUE\n",
    "sub/leaf.py": "from toy.sub import other\nfrom ..core import helper\nVALUE = 1\n",
    "sub/other.py": "import toy.sub.leaf\nfrom toy.sub import VALUE  # a name of the package, not a submodule\n",
}
TOY_RULES = (Rule("core is the bottom layer", importers=("toy.core",), forbidden=("toy.ui",)),
             Rule("sub stands alone", importers=("toy.sub",), forbidden=("toy",), allowed=("toy.sub",)))


@pytest.fixture
def toy(tmp_path):
    for name, text in TOY.items():
        path = tmp_path / "toy" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    modules = module_files(tmp_path / "toy")
    return modules, import_graph(modules)


def test_walker_resolves_imports_to_the_modules_named(toy):
    modules, graph = toy
    assert set(modules) == {"toy", "toy.core", "toy.ui", "toy.typed", "toy.sub", "toy.sub.leaf", "toy.sub.other"}
    assert graph == {
        "toy": {"toy.core": 1, "toy.ui": 2},
        "toy.core": {"toy.ui": 2},
        "toy.ui": {"toy.core": 1},
        "toy.typed": {"toy.core": 8},  # the TYPE_CHECKING imports are left out, the else branch is not
        "toy.sub": {"toy.sub.leaf": 1},
        "toy.sub.leaf": {"toy.sub.other": 1, "toy.core": 2},
        "toy.sub.other": {"toy.sub.leaf": 1, "toy.sub": 2},
    }


def test_walker_finds_cycles_and_forbidden_arrows(toy):
    modules, graph = toy
    found = violations(graph, TOY_RULES)
    assert set(found) == {
        ("cycle", "toy.core", "toy.ui"), ("cycle", "toy.ui", "toy.core"),
        ("cycle", "toy.sub.leaf", "toy.sub.other"), ("cycle", "toy.sub.other", "toy.sub.leaf"),
        ("arrow", "toy.core", "toy.ui"), ("arrow", "toy.sub.leaf", "toy.core"),
    }  # not toy -> toy.core -> toy.ui -> toy, nor toy.sub -> toy.sub.leaf -> toy.sub.other -> toy.sub
    assert found[("cycle", "toy.core", "toy.ui")] == "import cycle toy.core -> toy.ui -> toy.core"
    assert found[("arrow", "toy.core", "toy.ui")] == "core is the bottom layer"


def test_known_violations_must_exist_and_new_ones_fail(toy, tmp_path):
    modules, graph = toy
    found = violations(graph, TOY_RULES)
    assert compare_with_known(found, found, graph, modules, tmp_path) == []
    stale = ("arrow", "toy.ui", "toy.core")
    problems = compare_with_known(found, {*found, stale} - {("arrow", "toy.core", "toy.ui")}, graph, modules, tmp_path)
    assert problems == ["new arrow: toy.core -> toy.ui (toy/core.py:2): core is the bottom layer",
                        f"fixed, so delete it from KNOWN_VIOLATIONS: {stale}"]
