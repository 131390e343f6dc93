"""No module of pcapvault is named like a module of the standard library: inside its package
`import select` would still mean the standard library's, but a reader (and a tool run from the
package's folder) could take one for the other."""

from __future__ import annotations

import sys
from pathlib import Path

import pcapvault


def test_no_module_shadows_the_standard_library() -> None:
    root = Path(pcapvault.__path__[0])
    names = {p.stem for p in root.rglob("*.py")} - {"__init__", "__main__"}
    assert sorted(names & set(sys.stdlib_module_names)) == []


def test_no_two_classes_share_a_name() -> None:
    """One name, one thing: a class name used in two modules (two `Stats`, two `Request`)
    makes a reader, and an import, take one for the other."""
    import ast
    from collections import defaultdict

    root = Path(pcapvault.__path__[0])
    where: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(path.relative_to(root)))
    assert {name: paths for name, paths in where.items() if len(paths) > 1} == {}


def test_no_bench_script_shadows_the_standard_library() -> None:
    """A script run from bench/ puts bench/ first on sys.path: a bench/compression.py would
    shadow the standard library's `compression` that index/zstdlib.py imports (Python 3.14)."""
    bench = Path(__file__).resolve().parent.parent / "bench"
    names = {p.stem for p in bench.glob("*.py")}
    stdlib = set(sys.stdlib_module_names) | {"compression"}  # new in 3.14
    assert sorted(names & stdlib) == []
