"""Imports go one way: down the layers of docs/architecture.md, with no circle.

Every ``import tunesmith...`` / ``from tunesmith...`` in src/ counts, at module level and inside
functions alike: an import moved into a function still ties the two modules together.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Lowest first. A module may import its own layer or a lower one; the circle check below keeps imports
# inside one layer acyclic. A package name covers every module under it, save "tunesmith" itself (its __init__).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("tunesmith", "tunesmith.output", "tunesmith.errors", "tunesmith.atomic")),
    ("config", ("tunesmith.config",)),
    ("run directory", ("tunesmith.run",)),
    ("models", ("tunesmith.models",)),
    ("data", ("tunesmith.data",)),
    ("compute", ("tunesmith.attention", "tunesmith.loss", "tunesmith.inference", "tunesmith.rewards")),
    ("train", ("tunesmith.train",)),
    ("serve", ("tunesmith.serve",)),
    ("evaluate, export", ("tunesmith.evaluate", "tunesmith.export")),
    ("runs, quickstart", ("tunesmith.runs", "tunesmith.quickstart")),
    ("ui, cli", ("tunesmith.ui", "tunesmith.cli")),
]

# Imports of tunesmith modules inside functions, outside cli.py (whose command table imports each command's
# module only when that command runs): each defers a heavy third-party library and says so on its line.
# Three do today (the callable evaluate package, `train --help`, the packed-attention hook); a few more may
# earn their place the same way, a return to dodging circles may not.
MAX_DEFERRED = 6


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str
    path: Path  # relative to src/
    line: int
    deferred: bool  # inside a function
    text: str  # the statement's source lines, for its reason


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def collect_imports(src: Path) -> tuple[set[str], list[Import]]:
    """Every module under ``src`` and every import of one of them by another."""
    files = {module_name(p, src): p for p in sorted(src.rglob("*.py"))}
    found = []
    for name, path in files.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        in_functions = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for node in ast.walk(fn)}
        for node in ast.walk(tree):
            for target in _targets(node, package):
                imported = _owner(target, files)
                if imported and imported != name:
                    found.append(Import(name, imported, path.relative_to(src), node.lineno, id(node) in in_functions,
                                        "\n".join(lines[node.lineno - 1:node.end_lineno])))
    return set(files), found


def _targets(node: ast.AST, package: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from tunesmith.data import textfiles` imports a module; `from tunesmith.config import Config` a name.
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _owner(target: str, modules) -> str | None:
    """The module a dotted import target lives in (the longest module name it starts with)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or (prefix != "tunesmith" and within(module, prefix))]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return max(matches)[1]


def wrong_way(imports: list[Import]) -> list[str]:
    found = set()
    for imp in imports:
        low, high = layer_of(imp.importer), layer_of(imp.imported)
        if high > low:
            found.add(f"{imp.path.as_posix()}:{imp.line} {imp.importer} ({LAYERS[low][0]}) imports {imp.imported} ({LAYERS[high][0]})")
    return sorted(found)


def circles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    graph = {m: sorted({i.imported for i in imports if i.importer == m}) for m in modules}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(modules):
        if node not in index:
            visit(node)
    return sorted(groups)


def deferred(imports: list[Import]) -> list[Import]:
    """Function-level tunesmith imports outside the CLI's command table, one per statement."""
    seen = {}
    for imp in imports:
        if imp.deferred and imp.importer != "tunesmith.cli":
            seen[(imp.path, imp.line)] = imp
    return list(seen.values())


# ---------------------------------------------------------------- the tree as it is


@pytest.fixture(scope="module")
def graph():
    return collect_imports(SRC)


def test_no_import_runs_up_the_layers(graph):
    assert wrong_way(graph[1]) == []


def test_no_circles(graph):
    assert circles(*graph) == []


def test_nothing_below_train_imports_train(graph):
    below = ("tunesmith.run", "tunesmith.models", "tunesmith.data", "tunesmith.evaluate", "tunesmith.serve",
             "tunesmith.export", "tunesmith.loss", "tunesmith.attention", "tunesmith.inference")
    into_train = [f"{i.path.as_posix()}:{i.line} {i.importer} -> {i.imported}" for i in graph[1]
                  if within(i.imported, "tunesmith.train") and any(within(i.importer, b) for b in below)]
    assert into_train == []


def test_deferred_imports_are_few_and_give_their_reason(graph):
    late = deferred(graph[1])
    assert len(late) <= MAX_DEFERRED, [f"{i.path.as_posix()}:{i.line}" for i in late]
    assert [f"{i.path.as_posix()}:{i.line}" for i in late if "#" not in i.text] == []


def test_every_module_has_a_layer(graph):
    for module in graph[0]:
        layer_of(module)


def test_the_architecture_page_lists_these_layers():
    """docs/architecture.md names the same layers in the same order (its numbered list)."""
    page = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\d+\. \*\*(.+?)\*\*", page, flags=re.M)
    assert listed == [name for name, _ in LAYERS]


# ---------------------------------------------------------------- the checks catch what they claim


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "tunesmith" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_a_planted_wrong_way_import_is_named(tmp_path):
    src = _tree(tmp_path, {"__init__.py": "", "errors.py": "", "data/__init__.py": "",
                           "models/__init__.py": "", "models/load.py": "def f():\n    from tunesmith.data import x\n",
                           "data/x.py": "from tunesmith.errors import E\n"})
    assert wrong_way(collect_imports(src)[1]) == [  # the package's __init__ runs too
        "tunesmith/models/load.py:2 tunesmith.models.load (models) imports tunesmith.data (data)",
        "tunesmith/models/load.py:2 tunesmith.models.load (models) imports tunesmith.data.x (data)"]


def test_a_planted_circle_is_found(tmp_path):
    src = _tree(tmp_path, {"__init__.py": "", "data/__init__.py": "",
                           "data/a.py": "from tunesmith.data.b import y\n",
                           "data/b.py": "def g():\n    from tunesmith.data import a  # deferred\n"})
    modules, imports = collect_imports(src)
    assert circles(modules, imports) == [["tunesmith.data.a", "tunesmith.data.b"]]
    assert [(i.importer, i.line) for i in deferred(imports)] == [("tunesmith.data.b", 2)]
