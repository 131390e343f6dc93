"""Damaged records and indexes: extraction writes only records whose header agrees with the
index, reports the others with their file and offset, says the result is incomplete (exit 3),
and never aborts on a damaged index; `-l` counts only what the pcaps hold.

tcpdump is the oracle for readability: every output must be read to its end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    NS,
    SYNTH_START,
    build_dumpset,
    epoch,
    flip_caplen,
    read_pcap_records,
    records,
    synthetic_dumpset,
    tcpdump_select,
    tcpdump_window,
)

from pcapvault.extract import postingsplan
from pcapvault.extract import records as small_result
from pcapvault.extract.access import open_query
from pcapvault.extract.report import Stats
from pcapvault.index.indexfile import read_index, write_index

EXE = [sys.executable, "-m", "pcapvault.extract"]  # what the npcapextract script runs
B, E = SYNTH_START, SYNTH_START + 3600 * NS


def npcapextract(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, "-t", str(root), "-b", epoch(B), "-e", epoch(E), *args],
                          capture_output=True, **kw)


def pcaps(root: Path) -> list[Path]:
    """The dump set's pcaps in time order (the stored files, not their timeline links)."""
    return sorted((p for p in root.rglob("*.pcap") if not p.is_symlink()),
                  key=lambda p: p.name)


def readable(out: bytes | Path) -> list[tuple[int, int, bytes]]:
    """The records tcpdump reads from an output, which it must read to the end."""
    if isinstance(out, bytes):
        r = subprocess.run(["tcpdump", "--time-stamp-precision=nano", "-r", "-", "-w", "-"],
                           input=out, capture_output=True)
        assert r.returncode == 0 and b"invalid" not in r.stderr, r.stderr
        return read_pcap_records(r.stdout)
    return tcpdump_select([out], "")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root, files = synthetic_dumpset(tmp_path_factory.mktemp("synth") / "ds")
    return root, files, tcpdump_window(files, "", B, E)


def copy(synth, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(synth[0], root, symlinks=True)
    return root


@pytest.mark.parametrize("expr", ["", "len > 0", "vlan or ip or ip6 or arp"])
def test_flipped_caplen_is_skipped_and_reported(synth, tmp_path, expr):
    """The case of the issue: one bit of one stored caplen flipped. The output is read by
    tcpdump to its end, holds everything but that record, and exit 3 says it is incomplete."""
    root = copy(synth, tmp_path)
    pcap = pcaps(root)[1]
    at, damaged = flip_caplen(pcap, 100)
    want = [p for p in tcpdump_window(synth[1], expr, B, E) if p != damaged]
    out = tmp_path / "o.pcap"
    r = npcapextract(root, "-f", expr, "-o", str(out), "-v", text=True)
    assert r.returncode == 3, r.stderr
    assert f"{pcap.name}: 1 record(s) disagree with the index" in r.stderr
    assert f"first at byte {at}" in r.stderr and "skipped as damaged: 1 records" in r.stderr
    assert "Traceback" not in r.stderr
    assert readable(out) == want


def _host_record_damaged(synth, tmp_path: Path) -> tuple[Path, str, int, tuple]:
    """A copy of the synthetic set with one IPv4 record's captured length flipped: the root,
    a host filter that selects it, its offset and the packet as the oracle read it before."""
    root = copy(synth, tmp_path)
    pcap = pcaps(root)[1]
    offsets = records(pcap)
    data = pcap.read_bytes()
    k = next(i for i in range(100, len(offsets))
             if data[offsets[i] + 16 + 12 : offsets[i] + 16 + 14] == b"\x08\x00")
    host = ".".join(map(str, data[offsets[k] + 16 + 26 : offsets[k] + 16 + 30]))
    at, damaged = flip_caplen(pcap, k)
    return root, f"host {host}", at, damaged


def test_flipped_caplen_in_a_postings_plan(synth, tmp_path):
    """Read without numpy (records.py), the record is noticed before anything is written and
    the engine answers, skipping it: the same readable, incomplete result as any plan's."""
    root, expr, at, damaged = _host_record_damaged(synth, tmp_path)
    plan = postingsplan.plan(open_query(str(root), expr), B, E)
    assert plan is not None
    assert small_result.run(plan, B, E, str(tmp_path / "fast.pcap"), False, False, Stats()) is None
    assert not (tmp_path / "fast.pcap").exists()
    want = [p for p in tcpdump_window(synth[1], expr, B, E) if p != damaged]
    assert len(want) > 10
    out = tmp_path / "o.pcap"
    r = npcapextract(root, "-f", expr, "-o", str(out), text=True)
    assert r.returncode == 3 and f"first at byte {at}" in r.stderr, r.stderr
    assert readable(out) == want


def _evict(files: list[Path]) -> None:
    """Drop the files from the page cache, so that the engine reads them with O_DIRECT."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Files of 2.9 MB (2,000 frames of 1,400 bytes): dense enough for O_DIRECT reads and
    runs long enough for sendfile to a pipe."""
    rng = np.random.default_rng(3)
    frames = []
    for i in range(6000):
        body = bytes(12) + b"\x08\x00" + rng.bytes(1386)
        frames.append((SYNTH_START + i * 100_000_000, body, len(body)))
    ds = build_dumpset(tmp_path_factory.mktemp("big") / "ds", frames, per_file=2000)
    files = [sf.pcap for sf in ds.files()]
    return ds.root, files, tcpdump_window(files, "", B, E)


@pytest.mark.parametrize("path", ["direct", "sendfile", "page-cache"])
def test_every_read_path_skips_the_damaged_record(big, tmp_path, path):
    root = copy(big, tmp_path)
    pcap = pcaps(root)[1]
    at, damaged = flip_caplen(pcap, 1500)
    want = [p for p in big[2] if p != damaged]
    if path == "direct":
        _evict(pcaps(root))
    if path == "sendfile":
        r = npcapextract(root, "-O")  # a pipe: unfiltered long runs go by sendfile, unread
        got = readable(r.stdout)
    else:
        out = tmp_path / "o.pcap"
        r = npcapextract(root, "-f", "len > 0" if path == "page-cache" else "", "-o", str(out))
        got = readable(out)
    assert r.returncode == 3 and f"first at byte {at}".encode() in r.stderr, r.stderr
    assert got == want


def test_another_files_index_falls_back_to_a_scan(synth, tmp_path):
    """An index copied from another file (its checksum holds) must not drop this file's
    packets: its time span gives it away, and the pcap is scanned instead."""
    root = copy(synth, tmp_path)
    files = pcaps(root)
    shutil.copyfile(Path(str(files[4]) + ".idx"), Path(str(files[1]) + ".idx"))
    for expr in ("", "host 10.0.1.3"):
        r = npcapextract(root, "-f", expr, "-O")
        assert r.returncode == 0, r.stderr
        assert b"another file's" in r.stderr and b"scanning the pcap" in r.stderr
        assert readable(r.stdout) == tcpdump_window(synth[1], expr, B, E)


def test_damaged_index_offsets_do_not_abort(synth, tmp_path):
    """Index entries whose offsets wrap around (a damaged index with its checksums
    recomputed): the file is scanned instead, nothing aborts with 'Invalid argument'."""
    root = copy(synth, tmp_path)
    files = pcaps(root)
    idx_path = Path(str(files[2]) + ".idx")
    idx = read_index(idx_path)
    idx.offset = idx.offset.copy()
    idx.offset[7] += np.uint64(1 << 63)
    write_index(idx_path, idx)
    for expr in ("", "len > 0"):
        r = npcapextract(root, "-f", expr, "-O")
        assert r.returncode == 0 and b"index unusable" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr and b"Invalid argument" not in r.stderr
        assert readable(r.stdout) == tcpdump_window(synth[1], expr, B, E)


def test_listing_counts_only_what_the_pcaps_hold(synth, tmp_path):
    """`-l -v` listed a 0-byte pcap with its index's count of matches: the records are
    counted unread, so a pcap cut short must not be counted by its index."""
    root = copy(synth, tmp_path)
    files = pcaps(root)
    os.truncate(files[1], 0)
    half = records(files[3])[150]
    os.truncate(files[3], half + 5)  # 150 whole records, then a torn one
    r = npcapextract(root, "-l", "-v", text=True)
    assert r.returncode == 3, r.stderr  # a pcap that is not one any more was skipped
    assert f"{files[1].name}: unreadable, skipped" in r.stderr
    listed = {Path(p).name: int(n) for p, n in (ln.split("\t") for ln in r.stdout.splitlines())}
    assert files[1].name not in listed
    assert listed[files[3].name] == 150
    # Every count is what an extraction writes from that file, on the host-query fast path
    # too (which leaves cut pcaps to the engine).
    x = npcapextract(root, "-O")
    assert sum(listed.values()) == len(readable(x.stdout))
    host = npcapextract(root, "-f", "host 10.0.1.3", "-l", "-v", text=True)
    listed = {Path(p).name: int(n)
              for p, n in (ln.split("\t") for ln in host.stdout.splitlines())}
    assert listed and files[1].name not in listed, host.stderr
    x = npcapextract(root, "-f", "host 10.0.1.3", "-O")
    assert sum(listed.values()) == len(readable(x.stdout))


def test_flipped_caplen_read_by_the_engine_from_a_postings_plan(synth, tmp_path):
    """The engine reading a postings plan (which knows only each record's captured length)
    skips and reports the damaged record like a flow-table plan: the same result."""
    from pcapvault.extract.engine import RequestRun
    from pcapvault.extract.flowplan import Source
    from pcapvault.extract.output import Output
    from pcapvault.extract.request import Request

    root, expr, at, damaged = _host_record_damaged(synth, tmp_path)
    want = [p for p in tcpdump_window(synth[1], expr, B, E) if p != damaged]
    for postings in (True, False):
        warnings: list[str] = []
        stats = Stats()
        run = RequestRun(Request([str(root)], B, E, expr), [Source(str(root), 0, expr)], stats,
                         warnings.append, postings=postings)
        assert isinstance(run.sources[0], postingsplan.PostingsSource) == postings
        out = tmp_path / f"o{postings}.pcap"
        try:
            run.write(lambda ifaces, **opts: Output(str(out), ifaces, **opts))  # noqa: B023
        finally:
            run.out.close()
        assert stats.damaged_records == 1 and stats.exit_status(1) == 3
        assert any(f"first at byte {at}" in w for w in warnings), warnings
        assert readable(out) == want
