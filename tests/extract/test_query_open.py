"""Both query strategies start from one opening of the dump set (extract/access.open_query):
the same permission checks, meta data and filter compilation, written once."""

from __future__ import annotations

import ast
from pathlib import Path

import pcapvault
from pcapvault.extract import access


def test_strategies_open_and_compile_through_open_query() -> None:
    root = Path(pcapvault.__path__[0]) / "extract"
    for name in ("flowplan.py", "hostquery.py"):
        tree = ast.parse((root / name).read_text())
        called = {getattr(n.func, "attr", getattr(n.func, "id", None))
                  for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "open_query" in called, name
        assert not called & {"compile_filter", "open_dumpset"}, name


def test_both_strategies_see_the_same_dump_set(tmp_path: Path) -> None:
    """The flow-table strategy's Source and the postings strategy's plan carry what
    open_query found: link type, snap length, precision and the same compiled program."""
    from extract_helpers import SYNTH_START, synthetic_dumpset

    from pcapvault.extract.flowplan import Source
    from pcapvault.extract.hostquery import plan
    from pcapvault.extract.request import Request

    root, _ = synthetic_dumpset(tmp_path / "ds")
    t = access.open_query(str(root), "host 10.0.1.3")
    src = Source(str(root), 0, "host 10.0.1.3")
    p = plan(Request([str(root)], SYNTH_START, SYNTH_START + 1800 * 10**9, "host 10.0.1.3"))
    try:
        assert p is not None
        want = (t.linktype, t.snaplen, t.nanosecond, t.filter.program)
        assert (src.linktype, src.snaplen, src.nanosecond, src.filter.program) == want
        assert (p.linktype, p.snaplen, p.nanosecond, p.filter.program) == want
        assert src.interface == t.interface
    finally:
        p.close()
