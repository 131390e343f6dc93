"""Both query strategies start from one opening of the dump set (extract/access.open_query):
the same permission checks, meta data and filter compilation, written once."""

from __future__ import annotations

import ast
from pathlib import Path

import pcapvault
from pcapvault.extract import access


def test_strategies_open_and_compile_through_open_query() -> None:
    """One way to open a dump set for a query: the flow-table plan's Source calls open_query,
    the postings plan is given what it opened; neither opens or compiles on its own."""
    root = Path(pcapvault.__path__[0]) / "extract"
    for name in ("flowplan.py", "postingsplan.py"):
        tree = ast.parse((root / name).read_text())
        called = {getattr(n.func, "attr", getattr(n.func, "id", None))
                  for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert ("open_query" in called) == (name == "flowplan.py"), name
        assert not called & {"compile_filter", "open_dumpset"}, name


def test_both_strategies_see_the_same_dump_set(tmp_path: Path) -> None:
    """The flow-table strategy's Source and the postings strategy that RequestRun puts in its
    place carry what open_query found: link type, snap length, precision, interface and the
    same compiled program."""
    from extract_helpers import SYNTH_START, synthetic_dumpset

    from pcapvault.extract.engine import RequestRun
    from pcapvault.extract.flowplan import Source, Stats
    from pcapvault.extract.postingsplan import PostingsSource
    from pcapvault.extract.request import Request

    root, _ = synthetic_dumpset(tmp_path / "ds")
    t = access.open_query(str(root), "host 10.0.1.3")
    src = Source(str(root), 0, "host 10.0.1.3")
    req = Request([str(root)], SYNTH_START, SYNTH_START + 1800 * 10**9, "host 10.0.1.3")
    p = RequestRun(req, [src], Stats(), lambda m: None).sources[0]
    assert isinstance(p, PostingsSource)
    want = (t.linktype, t.snaplen, t.nanosecond, t.interface, t.filter.program)
    for s in (src, p):
        assert (s.linktype, s.snaplen, s.nanosecond, s.interface, s.filter.program) == want
        assert (s.path, s.number) == (str(root), 0)
