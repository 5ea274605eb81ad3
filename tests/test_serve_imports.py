"""serve/ and engine/ import one way: no cycle among their modules (imports inside functions count, since they
are how a cycle hides), and no module imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import r1forge

ROOT = Path(r1forge.__file__).parent
PACKAGES = ("serve", "engine")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, (ast.Import, ast.ImportFrom))]


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in _imports(path):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import module`
                targets += [f"{node.module}.{a.name}" for a in node.names]
            graph[module] |= {t for t in targets if t in files and t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_serve_and_engine_have_no_import_cycle() -> None:
    graph = _graph()
    assert "r1forge.serve.app" in graph["r1forge.serve.server"]  # the walk sees imports at all
    assert "r1forge.serve.server" not in graph["r1forge.serve.app"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_private_names_imported_across_modules() -> None:
    offenders = [f"{_module_name(p)} imports {node.module}.{a.name}"
                 for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") for node in _imports(p)
                 if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("r1forge")
                 for a in node.names if a.name.startswith("_")]
    assert offenders == []
