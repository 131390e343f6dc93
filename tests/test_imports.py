"""The module graph has no import cycle, counting imports inside functions too.

import-linter's contracts (pyproject.toml, run by `lint-imports` in CI) state the layers of
packages; this test holds the finer rule: no two modules of pcapvault reach each other, so
every module can be read, tested and moved after the ones it builds on.
"""

from __future__ import annotations

import grimp
import pytest


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or not (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, set[str]]:
    g = grimp.build_graph("pcapvault", include_external_packages=False)
    mods = {m for m in g.modules if m.count(".") >= 2}  # not the packages' __init__
    return {m: g.find_modules_directly_imported_by(m) & mods for m in mods}


def test_no_module_import_cycle(modules):
    assert strongly_connected(modules) == []


def test_imports_inside_functions_count(modules):
    """The graph sees an import made only inside a function (the service imports the engine
    inside a method)."""
    assert "pcapvault.extract.engine" in modules["pcapvault.extract.service.server"]


# The command lines (npcapextract, npcapflows) and their entry points may use the service's
# client; nothing else of extract may reach into the service package (the engine's hook is
# output.SharedBuffers). npcapserve (server/, a layer above) shares the service's policy.
SERVICE_USERS = {"pcapvault.extract.cli", "pcapvault.extract.__main__",
                 "pcapvault.extract.prestart", "pcapvault.extract.npcapflows"}


def test_the_engine_knows_nothing_of_the_service(modules):
    service = "pcapvault.extract.service"
    users = {m for m, imported in modules.items()
             if m.startswith("pcapvault.extract") and not m.startswith(service + ".")
             and any(i == service or i.startswith(service + ".") for i in imported)}
    assert users <= SERVICE_USERS
    assert users  # the check looks at the right package


def test_the_cycle_finder_finds_cycles():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_test_module_imports_another():
    """Shared pieces live in the helper modules of tests/, not in test modules."""
    import ast
    from pathlib import Path

    found = []
    for path in Path(__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[-1].startswith("test_")]
    assert found == []
