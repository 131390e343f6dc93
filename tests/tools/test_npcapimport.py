"""`npcapimport`: existing captures adopted into a dump set are extracted as tcpdump reads them
(every pcap variant, pcapng, gzip, zstd), once, in file order, and what cannot be adopted is
refused with one line."""

from __future__ import annotations

import gzip
import json
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest
import pyzstd
from dumpsets import assert_clean, repair
from extract_helpers import (
    CORPUS,
    NS,
    SYNTH_START,
    epoch,
    read_pcap_records,
    tcpdump_select,
    write_pcap,
)
from fsutil import fill, loop_fs
from import_helpers import (
    as_us,
    extract,
    import_in_process,
    new_dumpset,
    npcapimport,
    one_line,
    pcapng_block,
    pcapng_shb,
    records,
    traffic,
    write_pcapng,
    write_variant,
)
from recorderproc import RecorderProc, recorded_frames, synthetic_pcap, tool

from pcapvault.index.dumpset import DumpSet


def test_shared_corpus_extraction_equals_tcpdump(tmp_path):
    if not CORPUS.is_dir():
        pytest.skip(f"tcpdump test corpus not found at {CORPUS}")
    files = sorted(CORPUS.glob("*.pcap"))
    root = new_dumpset(tmp_path / "ds")
    r = npcapimport("-t", root, CORPUS)
    assert r.returncode == 0, r.stderr
    assert "merged in time order" in r.stdout  # the corpus has overlapping captures
    assert "nothing to repair" in repair(root, "--dry-run").stdout
    want = sorted(tcpdump_select(files, ""))
    assert sorted(extract(root, tmp_path / "all.pcap")) == want
    udp = sorted(tcpdump_select(files, "udp"))
    assert udp and sorted(extract(root, tmp_path / "udp.pcap", expr="udp")) == udp
    # Windows around packets of different captures.
    rnd = random.Random(3)
    for ts, _, _ in rnd.sample(want, 6):
        b, e = ts - rnd.randrange(2 * NS), ts + rnd.randrange(1, 2 * NS)
        got = extract(root, tmp_path / f"w{ts}.pcap", epoch(b), epoch(e))
        assert sorted(got) == [p for p in want if b <= p[0] < e]


VARIANTS = {
    "le-us": lambda p, pk: write_variant(p, pk, False, False),
    "be-us": lambda p, pk: write_variant(p, pk, True, False),
    "le-ns": lambda p, pk: write_variant(p, pk, False, True),
    "be-ns": lambda p, pk: write_variant(p, pk, True, True),
    "pcapng": lambda p, pk: write_pcapng(p, pk),
    "pcapng-be-usec": lambda p, pk: write_pcapng(p, pk, big_endian=True, tsresol=None),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("packing", ["plain", "gz", "zst"])
def test_every_variant_and_compression(tmp_path, variant, packing):
    pk = traffic(300)
    src = tmp_path / f"in.{variant}"
    VARIANTS[variant](src, pk)
    oracle = sorted(tcpdump_select([src], ""))  # tcpdump reads every variant itself
    micro = variant.endswith("us") or variant.endswith("usec")
    assert oracle == records(as_us(pk) if micro else pk)
    if packing == "gz":
        src = src.with_name(src.name + ".gz")
        src.write_bytes(gzip.compress((tmp_path / f"in.{variant}").read_bytes()))
    elif packing == "zst":
        src = src.with_name(src.name + ".zst")
        src.write_bytes(pyzstd.compress((tmp_path / f"in.{variant}").read_bytes()))
    root = new_dumpset(tmp_path / "ds")
    r = npcapimport("-t", root, "-p", "16K", src)
    assert r.returncode == 0, r.stderr
    ds = DumpSet.open(root)
    assert len(ds.files()) > 3  # cut at 16K and at slot boundaries
    assert all(sf.first_ns // (600 * NS) == sf.slot // 600 for sf in ds.files())
    assert sorted(extract(root, tmp_path / "out.pcap")) == oracle
    assert_clean(root)


def test_microsecond_dump_set_keeps_its_precision(tmp_path):
    pk = traffic(200)
    src = tmp_path / "in.pcap"
    write_pcap(src, pk)  # nanosecond
    root = new_dumpset(tmp_path / "ds", nanosecond=False)
    assert npcapimport("-t", root, src).returncode == 0
    for sf in DumpSet.open(root).files():
        assert struct.unpack_from("<I", sf.pcap.read_bytes())[0] == 0xA1B2C3D4
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(as_us(pk))


def test_twice_is_not_duplicated(tmp_path):
    pk = traffic(300)
    src = tmp_path / "in.pcap"
    write_pcap(src, pk)
    same = tmp_path / "copy.pcap.gz"
    same.write_bytes(gzip.compress(src.read_bytes()))
    root = new_dumpset(tmp_path / "ds")
    assert npcapimport("-t", root, src).returncode == 0
    names = [sf.name for sf in DumpSet.open(root).files()]
    for again in (src, same):
        r = npcapimport("-t", root, again)
        assert r.returncode == 0 and "already imported" in r.stdout, r.stdout + r.stderr
    assert [sf.name for sf in DumpSet.open(root).files()] == names
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(pk)


def test_no_room_to_decompress_is_said_as_such(tmp_path):
    """A gzip capture decompressed beside a dump set whose filesystem is full: the run says
    where room is missing (not "damaged compressed data"), imports nothing, and the file
    itself imports once there is room."""
    src = tmp_path / "in.pcap"
    write_pcap(src, traffic(3000))
    packed = tmp_path / "in.pcap.gz"
    packed.write_bytes(gzip.compress(src.read_bytes()))
    with loop_fs(tmp_path, "8M") as fs:
        root = new_dumpset(fs / "ds")
        filler = fill(fs)
        r = npcapimport("-t", root, packed)
        one_line(r, 1, f"{packed}: no room to decompress it in {root}", "free space there")
        assert DumpSet.open(root).files() == []
        filler.unlink()
        r = subprocess.run([tool("npcapimport"), "-t", str(root), packed.name],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        (entry,) = json.loads((root / "imports.json").read_text())["imports"].values()
        assert entry["source"] == str(packed)  # as FORMAT.md shows: absolute


def test_out_of_order_packets_keep_file_order_and_windows_are_exact(tmp_path):
    rnd = random.Random(9)
    pk = traffic(1500, span=1700)
    # Jitter: packets step back by up to half a second, some by five seconds, a few arrive
    # 3 minutes late (so some cuts must wait), all kept in this order.
    shuffled = []
    for i, (ts, d, w) in enumerate(pk):
        back = rnd.choice([0, 0, 0, rnd.randrange(NS // 2), 5 * NS])
        if i % 400 == 200:
            back = 180 * NS
        shuffled.append((ts - back, d, w))
    src = tmp_path / "jitter.pcap"
    write_pcap(src, shuffled)
    root = new_dumpset(tmp_path / "ds")
    r = npcapimport("-t", root, "-p", "32K", src)
    assert r.returncode == 0, r.stderr
    assert_clean(root)
    stored = []
    for sf in DumpSet.open(root).files():
        stored += read_pcap_records(sf.pcap.read_bytes())
    assert stored == [(ts, w, d) for ts, d, w in shuffled]  # file order kept
    want = sorted(tcpdump_select([src], ""))
    for k in range(40):
        b = SYNTH_START - 200 * NS + rnd.randrange(1900 * NS)
        e = b + rnd.choice([NS // 10, NS, 7 * NS, 60 * NS, 700 * NS])
        got = extract(root, tmp_path / f"w{k}.pcap", epoch(b), epoch(e))
        assert sorted(got) == [p for p in want if b <= p[0] < e], (k, b, e)


def test_overlapping_captures_are_merged_and_recorded_files_refused(tmp_path):
    pk = traffic(400)
    a, b, c = tmp_path / "a.pcap", tmp_path / "b.pcapng", tmp_path / "c.pcap"
    write_pcap(a, pk[0::2])
    write_pcapng(b, pk[1::2])
    write_pcap(c, [(ts + 5 * NS, d, w) for ts, d, w in pk[100:110]])
    root = new_dumpset(tmp_path / "ds")
    r = npcapimport("-t", root, a, b)
    assert r.returncode == 0 and "merged in time order" in r.stdout, r.stdout + r.stderr
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(pk)
    before = sorted(p.name for p in root.rglob("*.pcap"))
    one_line(npcapimport("-t", root, c), 1, str(c), "overlap", "nothing was imported")
    assert sorted(p.name for p in root.rglob("*.pcap")) == before
    assert_clean(root)


def test_link_type_is_refused(tmp_path):
    src = tmp_path / "raw.pcap"
    write_variant(src, [(SYNTH_START, bytes(20), 20)], False, True, linktype=101)
    root = new_dumpset(tmp_path / "ds")
    one_line(npcapimport("-t", root, src), 1, "link type 101", "dump set's 1")
    assert not DumpSet.open(root).files()


def test_several_interfaces_and_broken_files_are_refused(tmp_path):
    root = new_dumpset(tmp_path / "ds")
    two = tmp_path / "two.pcapng"
    write_pcapng(two, traffic(5), interfaces=2)
    one_line(npcapimport("-t", root, two), 1, "several interfaces")
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"hello, not a capture at all")
    one_line(npcapimport("-t", root, junk), 1, "not a pcap")
    future = tmp_path / "2200.pcapng"
    write_pcapng(future, [(7_258_118_400 * NS, bytes(60), 60)])
    one_line(npcapimport("-t", root, future), 1, "1970 to 2106")
    bad_gz = tmp_path / "cut.pcap.gz"
    bad_gz.write_bytes(gzip.compress(random.Random(1).randbytes(100000))[:500])
    one_line(npcapimport("-t", root, bad_gz), 1, "damaged compressed data")
    assert not DumpSet.open(root).files()


@pytest.mark.parametrize("args,needle", [
    (["-p", "lots"], "-p"),
    (["/nonexistent/capture.pcap"], "does not exist"),
    ([], "Missing argument"),
])
def test_bad_usage_is_one_line_exit_2(tmp_path, args, needle):
    src = tmp_path / "in.pcap"
    write_pcap(src, traffic(5))
    root = new_dumpset(tmp_path / "ds")
    extra = [] if args and args[0].startswith("/") or not args else [src]
    one_line(npcapimport("-t", root, *args, *extra), 2, needle)


def test_imported_files_count_against_the_budget(tmp_path):
    src = tmp_path / "in.pcap"
    write_pcap(src, traffic(300))
    root = new_dumpset(tmp_path / "ds")
    before = DumpSet.open(root).usage()
    assert npcapimport("-t", root, src).returncode == 0
    ds = DumpSet.open(root)
    pcaps = sum(sf.pcap.stat().st_size + sf.index.stat().st_size for sf in ds.files())
    assert ds.usage() >= before + pcaps > before + src.stat().st_size


@pytest.mark.parametrize("stop_at", ["place", "link", "complete"])
def test_an_import_stopped_halfway_is_undone_and_done_again(tmp_path, monkeypatch, stop_at):
    """A stop after the third file is placed, after the second is linked, or right before the
    registry says complete: the next run removes what the stopped one placed, and imports
    the capture again, whole and once."""
    from pcapvault.tools import npcapimport as imp

    pk = traffic(600)
    src = tmp_path / "in.pcap"
    write_pcap(src, pk)
    root = new_dumpset(tmp_path / "ds")
    ds = DumpSet.open(root)
    calls = []
    # (owner, function, the call after which it stops; 0: instead of the second call)
    target = {"place": (DumpSet, "place", 3), "link": (DumpSet, "link_if_present", 2),
              "complete": (imp, "_store_registry", 0)}[stop_at]
    real = getattr(*target[:2])

    def stop(*a, **kw):
        calls.append(1)
        if not target[2] and len(calls) == 2:
            raise KeyboardInterrupt
        out = real(*a, **kw)
        if len(calls) == target[2]:
            raise KeyboardInterrupt  # the power fails right after it
        return out

    monkeypatch.setattr(target[0], target[1], stop)
    with pytest.raises(KeyboardInterrupt):
        import_in_process(ds, [src], 64 << 10)
    monkeypatch.undo()
    assert len(ds.files()) >= 3
    r = npcapimport("-t", root, "-p", "64K", src)
    assert r.returncode == 0 and "stopped halfway" in r.stdout, r.stdout + r.stderr
    assert_clean(root)
    assert not list(root.glob(".import-*"))
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(pk)
    assert npcapimport("-t", root, "-p", "64K", src).stdout.count("already imported") == 1


def test_import_beside_a_running_recorder(veth, tmp_path):
    """Old captures go in while the recorder records, cut at the recorder's -p; one
    reaching into the file it writes is refused."""
    root = tmp_path / "ds"
    rec = RecorderProc(veth, root, "--disk-limit", "1GB", "-p", "32K")
    src = tmp_path / "live.pcap"
    synthetic_pcap(src, 100, 200)
    veth.send([src])
    time.sleep(0.3)
    pk = traffic(3000)  # about 230 KB in each of its three 10-minute slots
    old = tmp_path / "old.pcap"
    write_pcap(old, pk)
    r = npcapimport("-t", root, old)
    assert r.returncode == 0, r.stderr
    recent = tmp_path / "recent.pcap"
    write_pcap(recent, [(time.time_ns() + 10 * NS, bytes(60), 60)])
    one_line(npcapimport("-t", root, recent), 1, "running recorder")
    assert rec.proc.poll() is None
    assert rec.stop() == 0, rec.stderr
    assert_clean(root)
    assert sorted(extract(root, tmp_path / "old-out.pcap", epoch(pk[0][0]),
                          epoch(pk[-1][0] + 1))) == records(pk)
    assert len(recorded_frames(root)) == 100 + len(pk)
    ds = DumpSet.open(root)
    assert ds.file_bytes == 32 << 10  # the recorder's -p, kept in the dump set's marker
    imported = [sf for sf in ds.files() if sf.first_ns <= pk[-1][0]]
    assert sum(sf.pcap.stat().st_size for sf in imported) > 12 * (32 << 10)
    # (a file is cut only where time order allows: it may run on for a record or two)
    assert all(sf.pcap.stat().st_size <= (32 << 10) + 2 * 1552 for sf in imported)


def test_root_imports_as_the_dump_sets_owner(tmp_path):
    import os
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pv-owner-"))  # traversable by the owner
    try:
        base.chmod(0o755)
        root = new_dumpset(base / "ds")
        for p in [root, *root.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
        src = base / "in.pcap"
        write_pcap(src, traffic(100))
        src.chmod(0o644)
        r = npcapimport("-t", root, src)
        assert r.returncode == 0, r.stderr
        owners = {p: p.lstat().st_uid for p in [root, *root.rglob("*")]}
        assert set(owners.values()) == {nobody.pw_uid}, owners
        assert (root / "imports.json").exists()
    finally:
        shutil.rmtree(base)


def test_packets_longer_than_the_dump_sets_snaplen_are_cut_and_said_to_be(tmp_path):
    pk = traffic(50)
    big = (pk[10][0] + 1, pk[10][1] + bytes(4000), len(pk[10][1]) + 4000)
    src = tmp_path / "jumbo.pcap"
    write_pcap(src, [*pk[:11], big, *pk[11:]])
    root = tmp_path / "ds"
    DumpSet.create(root, interface="eth0", linktype=1, snaplen=1536, nanosecond=True)
    r = npcapimport("-t", root, src)
    assert r.returncode == 0 and "1 packets longer" in r.stdout, r.stdout + r.stderr
    got = extract(root, tmp_path / "out.pcap")
    assert sorted(got) == records([*pk, (big[0], big[1][:1536], big[2])])
    # tcpdump reads the extraction as stored: the header's snapshot length covers it.
    assert sorted(tcpdump_select([tmp_path / "out.pcap"], "")) == sorted(got)


def _registry(**entry: object) -> str:
    whole = {"source": "/a.pcap", "imported": "2025-11-22T09:00:01.0Z", "packets": 1,
             "files": [], "complete": False}
    return json.dumps({"format": "pcapvault-imports", "version": 1,
                       "imports": {"ab": whole | entry}})


@pytest.mark.parametrize("content", [
    "{ half",
    # KeyError, AttributeError, TypeError (and RecursionError) in undo_partial and survey
    '{"format": "pcapvault-imports", "version": 1, "imports": {"ab": {"complete": false}}}',
    '{"format": "pcapvault-imports", "version": 1, "imports": {"ab": 5}}',
    _registry(files=5),
    _registry(files=[5], complete=True),
    '{"format": "pcapvault-imports", "version": 1, "imports": ' + "[" * 100000,
], ids=["half", "no-source", "not-an-object", "files-5", "file-name-5", "nested"])
def test_a_damaged_registry_is_refused_not_read_as_empty(tmp_path, content):
    src = tmp_path / "in.pcap"
    write_pcap(src, traffic(50))
    root = new_dumpset(tmp_path / "ds")
    (root / "imports.json").write_text(content)
    one_line(npcapimport("-t", root, src), 1, "imports.json is damaged")
    assert not DumpSet.open(root).files()


def _idb(*opts: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HH", c, len(v)) + v + b"\0" * (-len(v) % 4) for c, v in opts)
    return pcapng_block(1, struct.pack("<HHI", 1, 0, 65535) + body + bytes(4))


def _epb(units: int) -> bytes:
    return pcapng_block(6, struct.pack("<IIIII", 0, units >> 32, units & 0xFFFFFFFF, 60, 60)
                        + bytes(60))


_SHORT_EPB = struct.pack("<III", 6, 12, 12)
_SHORT_IDB = struct.pack("<III", 1, 12, 12)


@pytest.mark.parametrize("body,needle", [
    # blocks of 12 bytes at the end: their fields were unpacked before the length was checked
    (_idb() + _SHORT_EPB, "too short"),
    (_SHORT_IDB, "too short"),
    # 2^-1 s units, a timestamp of 2^63: OverflowError converting to int64
    (_idb((9, b"\x81")) + _epb((1 << 63) + 5), "outside 1970..2262"),
    # an offset of 2^62 s: OverflowError adding it
    (_idb((14, struct.pack("<q", 1 << 62))) + _epb(1_600_000_000 * 10**6), "outside 1970..2262"),
    # microseconds whose ns wrap int64 into 2020: imported silently as 2020
    (_idb() + _epb((1_600_000_000 * 10**9 + 3 * (1 << 64)) // 1000), "outside 1970..2262"),
], ids=["short_epb", "short_idb", "shift", "tsoffset", "overflow_mul"])
def test_damaged_pcapng_is_refused_in_one_line(tmp_path, body, needle):
    src = tmp_path / "bad.pcapng"
    src.write_bytes(pcapng_shb() + body)
    root = new_dumpset(tmp_path / "ds")
    one_line(npcapimport("-t", root, src), 1, str(src), needle)
    assert not DumpSet.open(root).files()


def test_pcapng_resolution_finer_than_a_nanosecond(tmp_path):
    """if_tsresol 10^-127 s (0x7f): the divisor beyond uint64 was an OverflowError; one unit
    of it is 0 ns, which is a time (1970-01-01)."""
    src = tmp_path / "fine.pcapng"
    src.write_bytes(pcapng_shb() + _idb((9, b"\x7f")) + _epb(1))
    root = new_dumpset(tmp_path / "ds")
    r = npcapimport("-t", root, src)
    assert r.returncode == 0 and "1970-01-01T00:00:00.000000000Z to" in r.stdout, r.stderr


def test_a_stop_right_after_a_file_took_the_next_free_microsecond_is_undone(
        tmp_path, monkeypatch):
    """Every packet in one microsecond: each file after the first takes the next free one.
    The registry named the file's intended name, then place() bumped it: a stop before the
    registry was rewritten made the next run remove the wrong file and refuse for good."""
    pk = [(SYNTH_START + i, d, w) for i, (_, d, w) in enumerate(traffic(400))]
    src = tmp_path / "same-microsecond.pcap"
    write_pcap(src, pk)
    root = new_dumpset(tmp_path / "ds")
    ds = DumpSet.open(root)
    real = DumpSet.place
    placed = []

    def stop_after_second(self, *a, **kw):
        placed.append(real(self, *a, **kw))
        if len(placed) == 2:
            raise KeyboardInterrupt  # the power fails right after the rename
        return placed[-1]

    monkeypatch.setattr(DumpSet, "place", stop_after_second)
    with pytest.raises(KeyboardInterrupt):
        import_in_process(ds, [src], 16 << 10)
    monkeypatch.undo()
    assert placed[1].first_ns == SYNTH_START // 1000 * 1000 + 1000  # it was bumped
    r = npcapimport("-t", root, "-p", "16K", src)
    assert r.returncode == 0 and "stopped halfway" in r.stdout, r.stdout + r.stderr
    assert_clean(root)
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(pk)
