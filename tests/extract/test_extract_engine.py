"""The extraction engine's machinery: read-ahead bounds, writes of numpy-built iovecs (with
partial writes), flow decisions through colliding hashes, YES rows written unconfirmed, and
planning that never changes the result."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    NS,
    build_dumpset,
    read_pcap_records,
    synthetic_traffic,
    tcpdump_select,
)

from pcapvault.extract import engine, flowmatch, readahead
from pcapvault.extract.cli import main
from pcapvault.extract.outfile import writev_table
from pcapvault.extract.output import Pieces
from pcapvault.index.indexfile import read_index
from pcapvault.index.libpcap import Filter, compile_filter

START = 1763737200 * NS + 987_654_321


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("eng") / "ds"
    d = build_dumpset(root, synthetic_traffic(1500, START, seed=23, span_s=1500), per_file=200)
    return root, [sf.pcap for sf in d.files()]


def extract(root: Path, out: Path, expr: str) -> list:
    if out.exists():
        out.unlink()
    b, e = f"{START // NS - 1}", f"{START // NS + 3600}"
    try:
        main(["-t", str(root), "-b", b, "-e", e, "-f", expr, "-o", str(out)])
    except SystemExit as x:
        assert x.code in (0, 1)
    return read_pcap_records(out.read_bytes()) if out.exists() else []


def test_job_pieces_cover_the_ranges():
    starts = np.array([0, 10 << 20, 50 << 20], np.int64)
    lens = np.array([100, 9 << 20, 1], np.int64)
    job = readahead.Job(Path("/x"), starts.tolist(), lens.tolist())
    pieces = list(zip(job.starts, job.lens, strict=True))
    assert all(ln <= readahead.PIECE_BYTES for _, ln in pieces)
    covered = [(s, s + ln) for s, ln in pieces]
    assert covered[0] == (0, 100) and covered[-1] == (50 << 20, (50 << 20) + 1)
    assert sum(lens) == job.total == int(job.ends[-1])
    # the pieces of the long range are contiguous and in order
    mid = covered[1:-1]
    assert mid[0][0] == 10 << 20 and mid[-1][1] == (19 << 20)
    assert all(a[1] == b[0] for a, b in zip(mid, mid[1:], strict=False))


def test_prefetch_stays_within_its_lookahead(monkeypatch, tmp_path):
    """Announced minus read never exceeds the bound (plus one piece), every range is announced
    in order unless the reader got there first, and close() ends the thread."""
    f = tmp_path / "f"
    f.write_bytes(b"x")
    calls: list[tuple[int, int]] = []
    consumed = [0]
    worst = [0]

    def fake_fadvise(fd: int, off: int, ln: int, advice: int) -> None:
        calls.append((off, ln))
        worst[0] = max(worst[0], sum(c[1] for c in calls) - consumed[0])

    monkeypatch.setattr(readahead.os, "posix_fadvise", fake_fadvise)
    pf = readahead.Prefetcher(lookahead=8 << 20)
    starts = np.arange(0, 64 << 20, 1 << 20, dtype=np.int64)
    lens = np.full(len(starts), 1 << 20, np.int64)
    job = pf.submit(f, starts.tolist(), lens.tolist())
    for _ in range(64):
        time.sleep(0.002)
        consumed[0] += 1 << 20
        pf.consumed(job, 1 << 20)
    pf.done(job)
    pf.close()
    pf._thread.join(2)
    assert not pf._thread.is_alive()
    assert worst[0] <= (8 << 20) + readahead.PIECE_BYTES
    offs = [c[0] for c in calls]
    assert offs == sorted(offs) and len(set(offs)) == len(offs)


def test_pieces_survive_partial_writes(tmp_path, monkeypatch):
    """writev may take part of what it is given (a socket's send timeout, a signal): the rest
    follows, from inside the piece where it stopped, intact."""
    from pcapvault.extract import outfile

    rng = np.random.default_rng(5)
    buf = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    offs = np.sort(rng.choice(len(buf) - 70_000, 3000, replace=False)).astype(np.int64)
    lens = rng.integers(0, 900, len(offs)).astype(np.int64)
    want = b"".join(bytes(buf[o : o + n]) for o, n in zip(offs, lens, strict=True))
    calls = [0]

    def stingy_writev(fd: int, iov_addr: int, count: int) -> int:
        """Write at most a few KiB of what the iovec array asks for."""
        calls[0] += 1
        pairs = (ctypes.c_uint64 * (2 * count)).from_address(iov_addr)
        budget = int(rng.integers(1, 5000))
        done = 0
        for i in range(count):
            n = min(pairs[2 * i + 1], budget - done)
            if n <= 0:
                break
            done += os.write(fd, ctypes.string_at(pairs[2 * i], n))
        return done

    monkeypatch.setattr(outfile, "_libc_writev", stingy_writev)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    pieces = Pieces.of(buf, offs, lens)
    assert len(pieces) == len(want)
    try:
        writev_table(fd, pieces.iov)
    finally:
        os.close(fd)
    assert out.read_bytes() == want
    assert calls[0] > len(want) // 5000


def test_decisions_survive_hash_collisions(ds, monkeypatch):
    """With every row hashing alike, each level verifies rows against their representative
    and decides the others alone: the decisions stay exactly the same."""
    _, files = ds
    flows = [read_index(Path(str(p) + ".idx"), packets=False).flows for p in files]
    for expr in ("host 10.0.1.3", "tcp port 443", "vlan 100", "udp"):
        flt = compile_filter(expr)
        want = [flowmatch.FlowMatcher(flt).decide(f) for f in flows]
        with monkeypatch.context() as m:
            m.setattr(flowmatch, "_hash_columns", lambda cols: np.zeros(cols.shape[1], np.uint64))
            fm = flowmatch.FlowMatcher(flt)
            got = [fm.decide(f) for f in flows]
        assert all(np.array_equal(w, g) for w, g in zip(want, got, strict=True)), expr


def test_yes_rows_are_written_unconfirmed_and_equal_tcpdump(ds, tmp_path, monkeypatch):
    """Only the packets of rows the index cannot decide run the filter; those of YES rows are
    written as they are, and the output is still exactly tcpdump's."""
    root, files = ds
    calls = []
    real_match, real_confirm = Filter.match_many, engine._Plan._confirm
    confirming = [False]

    def counting(self, buf, offs, *a, **k):  # noqa: ANN001, ANN202
        if confirming[0]:  # not the flow decisions' own checks
            calls.append(len(offs))
        return real_match(self, buf, offs, *a, **k)

    def confirm(self, *a):  # noqa: ANN001, ANN202
        confirming[0] = True
        try:
            return real_confirm(self, *a)
        finally:
            confirming[0] = False

    monkeypatch.setattr(Filter, "match_many", counting)
    monkeypatch.setattr(engine._Plan, "_confirm", confirm)
    # "or icmp": an accepting path without an address keeps the host rows in the engine
    # (plain host filters are planned from the postings, tests/extract/test_postingsplan.py)
    for expr in ("tcp", "host 10.0.1.3 or icmp", "tcp[13] & 2 != 0"):
        calls.clear()
        got = extract(root, tmp_path / "o.pcap", expr)
        assert got == tcpdump_select(files, expr) and got, expr
        fm = flowmatch.FlowMatcher(compile_filter(expr))
        dec = np.concatenate([
            fm.decide(idx.flows)[idx.flow]
            for idx in (read_index(Path(str(p) + ".idx")) for p in files)
        ])
        assert sum(calls) == int((dec == flowmatch.MAYBE).sum()), expr
        if expr == "tcp":
            assert sum(calls) < len(got) // 5  # most are written unconfirmed


@pytest.mark.parametrize("chunk,split,ahead", [(4096, 8192, 1), (1 << 20, 1 << 16, 3)])
def test_tiny_chunks_and_lookahead_change_nothing(ds, tmp_path, monkeypatch, chunk, split,
                                                  ahead):
    """Chunk, range and look-ahead sizes only change how the reads are cut."""
    root, files = ds
    expected = {e: tcpdump_select(files, e) for e in ("", "host 10.0.1.3", "not udp")}
    monkeypatch.setattr(engine, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(engine, "SPLIT_BYTES", split)
    monkeypatch.setattr(engine, "AHEAD_FILES", ahead)
    monkeypatch.setattr(engine, "AHEAD_BYTES", chunk)
    for expr, want in expected.items():
        assert extract(root, tmp_path / "o.pcap", expr) == want, expr


def test_pcapng_and_slices_through_pieces(ds, tmp_path):
    """pcapng blocks and sliced records are assembled from three and two pieces per packet."""
    root, files = ds
    out = tmp_path / "o.pcapng"
    b, e = f"{START // NS - 1}", f"{START // NS + 3600}"
    with pytest.raises(SystemExit) as x:
        main(["-t", str(root), "-b", b, "-e", e, "-f", "udp", "--pcapng", "-s", "21", "-o",
              str(out)])
    assert x.value.code == 0
    data = out.read_bytes()
    want = [(t, w, d[:21]) for t, w, d in tcpdump_select(files, "udp")]
    # walk the EPBs: type 6, total length, interface, ts high/low, caplen, wirelen, data, total
    pos, got = 0, []
    while pos < len(data):
        btype, total = np.frombuffer(data, "<u4", 2, pos)
        if btype == 6:
            _, hi, lo, cap, wire = np.frombuffer(data, "<u4", 5, pos + 8)
            got.append(((int(hi) << 32) | int(lo), int(wire),
                        data[pos + 28 : pos + 28 + int(cap)]))
        assert int(np.frombuffer(data, "<u4", 1, pos + int(total) - 4)[0]) == total
        pos += int(total)
    assert got == want and got
    os.unlink(out)


@pytest.mark.parametrize("direct_ok", [True, False])
def test_dense_reads_bypass_the_page_cache_where_possible(ds, tmp_path, monkeypatch, direct_ok):
    """Dense selections not in the page cache are read with O_DIRECT (sparse or cached ones
    never are); where the filesystem refuses O_DIRECT the page-cache path gives the same
    result."""
    root, files = ds
    opened: list[Path] = []
    real = engine.open_direct

    def spy(path: Path) -> int | None:
        opened.append(path)
        return real(path) if direct_ok else None

    monkeypatch.setattr(engine, "open_direct", spy)
    expr = "host 192.168.1.1 and udp"
    assert extract(root, tmp_path / "o.pcap", expr) == tcpdump_select(files, expr)
    assert opened == []
    monkeypatch.setattr(engine, "DIRECT_MIN_BYTES", 0)  # the test files are small
    monkeypatch.setattr(engine, "CHUNK_BYTES", 8192)  # several direct chunks per file
    assert extract(root, tmp_path / "o.pcap", "") == tcpdump_select(files, "")
    assert opened == [], "just written, hence cached: copied from the page cache"
    monkeypatch.setattr(engine, "cached", lambda *a: False)
    for expr in ("", "not udp"):
        opened.clear()
        assert extract(root, tmp_path / "o.pcap", expr) == tcpdump_select(files, expr)
        assert len(opened) == len(files), expr


@pytest.mark.parametrize(
    "expr", ["", "tcp", "host 10.0.1.3", "vlan 100", "tcp[13] & 2 != 0", "ip6 and udp",
             "len > 500", "not (host 10.0.1.3 or port 80)"],
)
def test_every_file_read_directly_equals_tcpdump(ds, tmp_path, monkeypatch, expr):
    """O_DIRECT for every file, however sparse, in chunks of a few records, over a window that
    cuts files at both ends: still tcpdump's selection."""
    root, files = ds
    monkeypatch.setattr(engine, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(engine, "DENSE_SHARE", 1 << 40)
    monkeypatch.setattr(engine, "cached", lambda *a: False)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 3000)
    b, e = START + 200 * NS + 17, START + 1100 * NS + 3
    out = tmp_path / "o.pcap"
    try:
        main(["-t", str(root), "-b", f"{b // NS}.{b % NS:09d}", "-e", f"{e // NS}.{e % NS:09d}",
              "-f", expr, "-o", str(out)])
    except SystemExit as x:
        assert x.code in (0, 1)
    got = read_pcap_records(out.read_bytes()) if out.exists() else []
    assert got == [p for p in tcpdump_select(files, expr) if b <= p[0] < e]
