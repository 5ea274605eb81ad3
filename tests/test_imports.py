"""No import cycle in the r1forge package: every module's imports, read with `ast`, form a directed acyclic graph.

Every `import r1forge...`, `from r1forge... import ...` and relative import counts, at module level and inside
functions alike: an import deferred into a function to dodge a cycle is still a cycle (the two modules still
need each other, only the failure moves to run time). Imports under `if TYPE_CHECKING:` never run and are left
out. `from package import name` points at the submodule `package.name` when there is one, else at the
package's `__init__`; a module's parent packages (which Python imports first) are not counted as its imports.
Imports by computed name (`importlib.import_module(variable)`, such as the CLI's command table) are not seen.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ImportEdge:
    """Module `source` imports module `target` at `file:line`, inside function `function` (None: module level)."""

    source: str
    target: str
    file: str
    line: int
    function: str | None

    def __str__(self) -> str:
        where = f"in {self.function}()" if self.function else "at module level"
        return f"{self.source} -> {self.target}  ({self.file}:{self.line}, {where})"


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file for every .py file under `package_dir` (a package's own name for __init__)."""
    names = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = file.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.stmt | ast.Call, str | None]]:
    """Every import statement (and `importlib.import_module("literal")` call) with its enclosing function's
    qualified name (`Class.method`), or None when it runs at import time (module level or a class body)."""
    found: list[tuple[ast.stmt | ast.Call, str | None]] = []

    def visit(node: ast.AST, scope: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.orelse:
                    visit_one(stmt, scope, in_function)
                continue
            visit_one(child, scope, in_function)

    def visit_one(child: ast.AST, scope: str, in_function: bool) -> None:
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            found.append((child, scope if in_function else None))
        elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
              and child.func.attr == "import_module" and child.args
              and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
            found.append((child, scope if in_function else None))
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = f"{scope}.{child.name}" if scope else child.name
            in_function = in_function or not isinstance(child, ast.ClassDef)
        visit(child, scope, in_function)

    visit(tree, "", False)
    return found


def import_graph(package_dir: Path) -> list[ImportEdge]:
    """Every import from one module of the package to another, resolved to dotted module names."""
    package = package_dir.name
    modules = module_names(package_dir)
    edges = []
    for source, file in modules.items():
        is_package = file.name == "__init__.py"
        tree = ast.parse(file.read_text(), filename=str(file))
        rel_file = str(file.relative_to(package_dir.parent))
        for node, function in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.Call):
                targets = [node.args[0].value]
            else:
                if node.level:  # relative: from the module's own package, one level up per extra dot
                    base = source.split(".") if is_package else source.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                submodules = [f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in modules]
                # `from pkg import sub` runs pkg/__init__ too; `from pkg import name` runs only pkg/__init__.
                targets = [origin, *submodules]
            for target in targets:
                while target and target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # `import pkg.mod.attr`-like names: the module that exists
                if target in modules and target != source and target.split(".")[0] == package:
                    edges.append(ImportEdge(source, target, rel_file, node.lineno, function))
    return edges


def find_cycles(edges: list[ImportEdge]) -> list[list[ImportEdge]]:
    """One cycle (as its edges, in order) through each strongly connected component of more than one module."""
    graph: dict[str, dict[str, ImportEdge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    # Tarjan's strongly connected components, iterative (no recursion limit on deep graphs).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Breadth-first from start back to start inside the component: the shortest cycle through it.
        previous: dict[str, ImportEdge] = {}
        frontier = [start]
        while frontier and start not in previous:
            nxt = []
            for node in frontier:
                for target, edge in sorted(graph[node].items()):
                    if target in members and target not in previous:
                        previous[target] = edge
                        nxt.append(target)
            frontier = nxt
        cycle, node = [], start
        while True:
            edge = previous[node]
            cycle.append(edge)
            node = edge.source
            if node == start:
                break
        cycles.append(cycle[::-1])
    return cycles


def describe_cycles(cycles: list[list[ImportEdge]]) -> str:
    return "\n".join(f"import cycle {i}:\n" + "\n".join(f"  {e}" for e in cycle)
                     for i, cycle in enumerate(cycles, start=1))


def test_r1forge_has_no_import_cycle():
    edges = import_graph(ROOT / "r1forge")
    assert len({e.source for e in edges}) > 50  # the walk did read the package
    cycles = find_cycles(edges)
    if cycles:
        pytest.fail(describe_cycles(cycles), pytrace=False)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_cycle_through_a_function_level_import_is_found(tmp_path):
    package = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from pkg.a.server import serve\n",
        "pkg/a/server.py": "class Server:\n    def start(self):\n        from .app import create_app\n        return create_app()\n",
        "pkg/a/app.py": "from pkg.a import server\n\ndef create_app():\n    return server\n",
        "pkg/b.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\n",
        "pkg/c.py": "from . import b\n",
    })
    cycles = find_cycles(import_graph(package))
    assert len(cycles) == 1, describe_cycles(cycles)
    text = describe_cycles(cycles)
    # app imports the package pkg.a (its __init__ runs) and the submodule server; server imports app in serve().
    assert {(e.source, e.target) for e in cycles[0]} <= {
        ("pkg.a", "pkg.a.server"), ("pkg.a.server", "pkg.a.app"), ("pkg.a.app", "pkg.a"), ("pkg.a.app", "pkg.a.server")}
    assert "pkg/a/server.py:3, in Server.start()" in text and "at module level" in text
    assert "pkg.b" not in text and "pkg.c" not in text  # the TYPE_CHECKING import never runs


@pytest.mark.parametrize("source, expected", [
    ("from .. import d\n", "pkg.d"),
    ("from ..d import thing\n", "pkg.d"),
    ("from . import e\n", "pkg.sub.e"),
    ("import pkg.d\n", "pkg.d"),
    ("import importlib\nimportlib.import_module('pkg.d')\n", "pkg.d"),
])
def test_relative_and_absolute_imports_resolve(tmp_path, source, expected):
    package = _write(tmp_path, {"pkg/__init__.py": "", "pkg/d.py": "", "pkg/sub/__init__.py": "",
                                "pkg/sub/e.py": "", "pkg/sub/m.py": source})
    targets = {e.target for e in import_graph(package) if e.source == "pkg.sub.m"}
    assert expected in targets
