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
