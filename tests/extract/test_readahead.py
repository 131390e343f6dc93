"""The one read-ahead mechanism (extract/readahead.py), used by both query strategies."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
import time
from pathlib import Path

import pcapvault
from pcapvault.extract import readahead


def test_readahead_needs_no_numpy() -> None:
    """records.py announces its reads with it, and must not import numpy."""
    code = ("import sys, pcapvault.extract.readahead as r, pcapvault.extract.records; "
            "r.Prefetcher().submit('/nonexistent', [0], [10]); "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_announced_waits_for_the_announcements(tmp_path: Path, monkeypatch) -> None:
    """A reader waiting with announced() starts once every range of its file is announced,
    not before: slow fadvise calls (a full device queue) hold it back."""
    f = tmp_path / "f"
    f.write_bytes(b"x")
    calls: list[int] = []
    gate = threading.Event()

    def slow_fadvise(fd: int, off: int, ln: int, advice: int) -> None:
        gate.wait()
        calls.append(off)

    monkeypatch.setattr(readahead.os, "posix_fadvise", slow_fadvise)
    pf = readahead.Prefetcher()
    jobs = [pf.submit(f, list(range(0, 200 * 4096, 4096)), [100] * 200) for _ in range(2)]
    waited = threading.Thread(target=pf.announced, args=(jobs[0],))
    waited.start()
    time.sleep(0.2)
    assert waited.is_alive()
    gate.set()
    waited.join(5)
    assert not waited.is_alive()
    assert len(calls) >= 200 - readahead.BATCH_RANGES
    pf.done(jobs[0])
    pf.announced(jobs[1])
    pf.close()


def test_announced_returns_at_the_bound(tmp_path: Path) -> None:
    """A job larger than the look-ahead bound cannot be announced whole: the reader is let go
    once the bound is reached, instead of waiting for itself."""
    f = tmp_path / "f"
    f.write_bytes(b"x")
    pf = readahead.Prefetcher(lookahead=1 << 20)
    job = pf.submit(f, list(range(0, 64 << 20, 1 << 20)), [1 << 20] * 64)
    done = threading.Thread(target=pf.announced, args=(job,))
    done.start()
    done.join(5)
    assert not done.is_alive()
    pf.close()


def test_one_read_ahead_mechanism() -> None:
    """posix_fadvise is called in readahead.py only."""
    root = Path(pcapvault.__path__[0])
    where = sorted({str(p.relative_to(root)) for p in root.rglob("*.py")
                    for node in ast.walk(ast.parse(p.read_text()))
                    if isinstance(node, ast.Attribute) and node.attr == "posix_fadvise"})
    assert where == ["extract/readahead.py"]
