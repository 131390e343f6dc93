"""The one writev loop (extract/outfile.py): buffers and iovec tables, partial writes."""

from __future__ import annotations

import ast
import os
import random
from pathlib import Path

import pytest

import pcapvault
from pcapvault.extract import outfile


def test_writev_all_resumes_inside_partly_written_buffers(tmp_path: Path, monkeypatch) -> None:
    """Buffers of every kind (bytes, bytearray, memoryview, empty), written a few bytes at a
    time by a stingy writev, arrive whole and in order."""
    rng = random.Random(3)
    bufs = [os.urandom(rng.randrange(0, 300)) for _ in range(2500)]
    bufs = [b if i % 3 == 0 else bytearray(b) if i % 3 == 1 else memoryview(b)
            for i, b in enumerate(bufs)]
    want = b"".join(bytes(b) for b in bufs)
    real = os.writev

    def stingy(fd: int, chunk: list) -> int:
        assert len(chunk) <= outfile.IOV_MAX
        return real(fd, [b"".join(bytes(b) for b in chunk)[: rng.randrange(1, 700)]])

    monkeypatch.setattr(outfile.os, "writev", stingy)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        outfile.writev_all(fd, list(bufs))
    finally:
        os.close(fd)
    assert out.read_bytes() == want


def test_a_write_of_nothing_is_an_error_not_a_loop(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(outfile.os, "writev", lambda fd, chunk: 0)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(outfile.OutputError, match="nothing was written"):
            outfile.writev_all(fd, [b"abc"])
    finally:
        os.close(fd)


def test_one_writev_loop() -> None:
    """writev is called in outfile.py only: buffers and iovec tables share its loop."""
    root = Path(pcapvault.__path__[0])
    calls = sorted({str(p.relative_to(root)) for p in root.rglob("*.py")
                    for node in ast.walk(ast.parse(p.read_text()))
                    if isinstance(node, ast.Call)
                    and getattr(node.func, "attr", getattr(node.func, "id", ""))
                    in ("writev", "_libc_writev")})
    assert calls == ["extract/outfile.py"]
