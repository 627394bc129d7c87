"""No import cycles in boxvm, between packages or between modules.

The imports are read with ``ast`` (nothing is executed). Every import counts: at module level,
inside a function (a late import hides a cycle, it does not remove it) and under
``TYPE_CHECKING`` (a type annotation is a dependency as much as a call is).

Nodes of the package graph: each subpackage (``boxvm.engine``, ``boxvm.disks``, ``boxvm.build``,
...), each top-level module on its own (``boxvm.errors``, ``boxvm.runtime``, ...) and ``boxvm``
itself (its ``__init__``, the public facade). Top-level modules are not grouped: most are leaves
that every package uses (errors, paths, options) and one is the top (runtime); as one node they
would close a cycle with every package for no reason of design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Module imports that close a cycle the code still has, each to be removed by the work named.
# The graphs below are checked without these edges, so any other cycle fails the tests; once
# an edge is gone, test_every_exception_is_still_needed asks for its line to be deleted.
KNOWN_CYCLES: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.walk(tree):  # every level: module, function, TYPE_CHECKING block
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (``from p import m`` is module ``p.m`` if
    there is one, else ``p``)."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def package_of(module: str) -> str:
    """``boxvm.engine.qemu`` -> ``boxvm.engine``; top-level modules and ``boxvm`` stay themselves."""
    return ".".join(module.split(".")[:2])


def package_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, deps in modules.items():
        own = package_of(name)
        graph.setdefault(own, set()).update(package_of(d) for d in deps if package_of(d) != own)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _explain(components: list[list[str]], modules: dict[str, set[str]]) -> str:
    lines = []
    for component in components:
        lines.append(" <-> ".join(component))
        for a, deps in sorted(modules.items()):
            for b in sorted(deps):
                if (package_of(a) in component and package_of(b) in component and package_of(a) != package_of(b)) or (
                    a in component and b in component
                ):
                    lines.append(f"    {a} imports {b}")
    return "\n".join(lines) + (
        "\nMove what both sides need into a module (or package) both import, or pass it in; "
        "never hide the import inside a function."
    )


def _without_known(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in deps if (a, b) not in KNOWN_CYCLES} for a, deps in modules.items()}


@pytest.fixture(scope="module")
def modules() -> dict[str, set[str]]:
    return module_graph(REPO, "boxvm")


def test_no_cycle_between_packages(modules: dict[str, set[str]]) -> None:
    kept = _without_known(modules)
    found = cycles(package_graph(kept))
    assert not found, "import cycle between packages:\n" + _explain(found, kept)


def test_no_cycle_between_modules(modules: dict[str, set[str]]) -> None:
    kept = _without_known(modules)
    found = cycles(kept)
    assert not found, "import cycle between modules:\n" + _explain(found, kept)


def test_every_exception_is_still_needed(modules: dict[str, set[str]]) -> None:
    for (a, b), why in KNOWN_CYCLES.items():
        assert b in modules.get(a, set()), f"{a} no longer imports {b} ({why}): delete it from KNOWN_CYCLES"
        closes = [c for c in cycles(modules) if a in c and b in c]
        closes += [c for c in cycles(package_graph(modules)) if package_of(a) in c and package_of(b) in c]
        assert closes, f"{a} -> {b} closes no cycle any more ({why}): delete it from KNOWN_CYCLES"


def test_build_tools_stand_below_guest_and_images(modules: dict[str, set[str]]) -> None:
    packages = package_graph(modules)
    assert {"boxvm.guest", "boxvm.images", "boxvm.disks", "boxvm.engine", "boxvm.store"}.isdisjoint(
        packages["boxvm.build"]
    )
    assert "boxvm.build" in packages["boxvm.guest"] and "boxvm.build" in packages["boxvm.images"]
    assert "boxvm.images" not in packages["boxvm.guest"] and "boxvm.guest" not in packages["boxvm.images"]


def test_the_walk_finds_late_type_only_and_relative_imports(tmp_path: Path) -> None:
    """The checks can fail: a cycle made only of imports that are not executed at import time."""
    pkg = tmp_path / "p"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import y\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("from . import b\nimport p.a\n")
    graph = module_graph(tmp_path, "p")
    assert graph["p.a.x"] == {"p.b"} and graph["p.b"] == {"p.a.x"} and graph["p.c"] == {"p.b", "p.a"}
    assert cycles(graph) == [["p.a.x", "p.b"]]
    assert cycles(package_graph(graph)) == [["p.a", "p.b"]]
