"""`npcapimport` of many small captures (they share files, laid out as the recorder lays out
its own), and of what should not be imported at all: FIFOs and devices, the dump set's own
files, compression bombs, a capture too disordered to be found by time."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from dumpsets import assert_clean, repair
from extract_helpers import NS, SYNTH_START, read_pcap_records, tcpdump_select, write_pcap
from fsutil import loop_fs
from import_helpers import (
    extract,
    import_in_process,
    new_dumpset,
    npcapimport,
    one_line,
    pcapng_block,
    pcapng_shb,
    records,
    traffic,
)
from recorderproc import tool

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet


def rotations(d: Path, count: int, start: int = SYNTH_START, per: int = 20) -> list[Path]:
    """`count` captures as `tcpdump -G 60` leaves them: one a minute, `per` packets each."""
    d.mkdir(exist_ok=True)
    out = []
    for i in range(count):
        t0 = start + i * 60 * NS
        p = d / f"rot-{i:03d}.pcap"
        write_pcap(p, traffic(per, start=t0, span=40))
        out.append(p)
    return out


def recorded_later(root: Path) -> DumpSet:
    """A dump set whose recorder has written a file later than every capture imported."""
    ds = DumpSet.open(root)
    later = SYNTH_START + 86400 * NS
    tmp = root / ".rec-1.pcap.part"
    pk = traffic(5, start=later)
    write_pcap(tmp, pk)
    ds.place(tmp, pk[0][0])
    assert "made" in repair(root).stdout  # indexed and linked, as the recorder's indexer does
    return ds


def test_small_captures_share_files_and_directories(tmp_path):
    """25 one-minute captures in a dump set that holds a later recorded file and keeps 2 files
    a directory: one file per 10-minute slot (not one per capture), directories of 2 files
    (not one per file), and extraction equals tcpdump over the captures."""
    root = new_dumpset(tmp_path / "ds")
    meta = json.loads((root / ".pcapvault").read_text()) | {"files_per_dir": 2}
    timeline.write_json_atomic(root / ".pcapvault", meta)
    ds = recorded_later(root)
    caps = rotations(tmp_path / "in", 25)
    r = npcapimport("-t", root, tmp_path / "in")
    assert r.returncode == 0, r.stderr
    ds = DumpSet.open(root)
    imported = [sf for sf in ds.files() if sf.first_ns < SYNTH_START + 3600 * NS]
    slots = {(SYNTH_START + i * 60 * NS) // (600 * NS) for i in range(25)}
    assert len(imported) == len(slots) == 3
    assert all(sf.first_ns // (600 * NS) == sf.slot // 600 for sf in imported)
    by_dir: dict[Path, int] = {}
    for sf in ds.files():
        by_dir[sf.pcap.parent] = by_dir.get(sf.pcap.parent, 0) + 1
    assert sorted(by_dir.values()) == [1, 1, 2], by_dir  # 2 + 1 imported, 1 recorded
    assert all(int(sf.pcap.parent.name.split(".")[0]) * NS <= sf.first_ns for sf in ds.files())
    # Each capture's entry names the one file holding its packets, not all of its group's.
    reg = json.loads((root / "imports.json").read_text())["imports"]
    assert all(len(e["files"]) == 1 for e in reg.values())
    assert {n for e in reg.values() for n in e["files"]} == {sf.name for sf in imported}
    assert_clean(root)
    assert sorted(extract(root, tmp_path / "out.pcap", "1970-01-01T00:00:00Z",
                          "2025-11-22T00:00:00Z")) == sorted(tcpdump_select(caps, ""))
    r = npcapimport("-t", root, tmp_path / "in")
    assert r.stdout.count("already imported") == 25, r.stdout
    assert len(DumpSet.open(root).files()) == 4


def test_files_fill_up_to_the_file_size(tmp_path):
    """Dense captures of one slot fill files up to -p: fewer files than captures, none over
    -p (each capture's packets are in time order, so every cut is allowed)."""
    root = new_dumpset(tmp_path / "ds")
    caps = rotations(tmp_path / "in", 9, per=150)  # 9 minutes: one slot
    total = sum(p.stat().st_size - 24 for p in caps)
    r = npcapimport("-t", root, "-p", "64K", *caps)
    assert r.returncode == 0, r.stderr
    files = DumpSet.open(root).files()
    assert len(files) < len(caps)
    assert len(files) <= total // (64 << 10) + 1
    assert all(sf.pcap.stat().st_size <= 64 << 10 for sf in files)
    stored = []
    for sf in files:
        stored += read_pcap_records(sf.pcap.read_bytes())
    assert stored == sorted(tcpdump_select(caps, ""))  # in file order: the captures' order


def test_a_stop_in_the_second_group_keeps_the_first(tmp_path, monkeypatch):
    """Groups of 4 captures: a stop while the second group is placed leaves the first
    complete; the next run undoes the second, imports it again and skips the first."""
    from pcapvault.tools import npcapimport as imp

    caps = rotations(tmp_path / "in", 20)  # 20 minutes: groups end at slot boundaries
    root = new_dumpset(tmp_path / "ds")
    ds = DumpSet.open(root)
    monkeypatch.setattr(imp, "GROUP_CAPTURES", 4)
    real, placed = DumpSet.place, []

    def stop_in_second_group(self, *a, **kw):
        placed.append(real(self, *a, **kw))
        if len(ds.files()) > 1 and json.loads((root / "imports.json").read_text())[
                "imports"] and any(e["complete"] for e in json.loads(
                (root / "imports.json").read_text())["imports"].values()):
            raise KeyboardInterrupt
        return placed[-1]

    monkeypatch.setattr(DumpSet, "place", stop_in_second_group)
    with pytest.raises(KeyboardInterrupt):
        import_in_process(ds, caps, 1 << 20)
    monkeypatch.undo()
    reg = json.loads((root / "imports.json").read_text())["imports"]
    done = sorted(e["source"] for e in reg.values() if e["complete"])
    assert 0 < len(done) < len(reg) < 20
    r = npcapimport("-t", root, tmp_path / "in")
    assert r.returncode == 0 and "stopped halfway" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("already imported") == len(done)
    assert_clean(root)
    assert sorted(extract(root, tmp_path / "out.pcap")) == sorted(tcpdump_select(caps, ""))


def run_bounded(*args: object) -> subprocess.CompletedProcess:
    """npcapimport with a short timeout: the old code hung on a FIFO."""
    return subprocess.run([tool("npcapimport"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_fifos_and_devices_in_a_directory_are_skipped(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    pk = traffic(50)
    write_pcap(d / "a.pcap", pk)
    os.mkfifo(d / "fifo.pcap")
    (d / "zero.pcap.gz").symlink_to("/dev/zero")
    (d / "gone.pcap").symlink_to(tmp_path / "nothing-there")
    root = new_dumpset(tmp_path / "ds")
    r = run_bounded("-t", root, d)
    assert r.returncode == 0, r.stderr
    for n in ("fifo.pcap", "zero.pcap.gz"):
        assert f"{d / n}: not a regular file" in r.stdout, r.stdout
    assert f"{d / 'gone.pcap'}: No such file or directory; skipped" in r.stdout
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(pk)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_given_is_refused_in_one_line(tmp_path, kind):
    src = tmp_path / "in.pcap"
    if kind == "fifo":
        os.mkfifo(src)
    else:
        src.symlink_to("/dev/zero")
    root = new_dumpset(tmp_path / "ds")
    r = run_bounded("-t", root, src)
    one_line(r, 1, f"{src}: not a regular file", "a FIFO" if kind == "fifo" else "a device")
    assert not DumpSet.open(root).files()


def test_the_dump_sets_own_files_are_not_imported(tmp_path):
    """The recorder's unfinished file (no recorder running): imported, then placed by the
    repair at the next start, its packets were stored twice. A file of the dump set, given
    or reached through a link, is refused; a directory holding the dump set skips it."""
    base = tmp_path / "captures"
    base.mkdir()
    root = new_dumpset(base / "ds")
    unfinished = root / ".rec-7.pcap.part"
    pk = traffic(40)
    write_pcap(unfinished, pk)
    (base / "link.pcap").symlink_to(unfinished)
    for given in (unfinished, base / "link.pcap"):
        one_line(npcapimport("-t", root, given), 1, "inside the dump set", "nothing was imported")
    (base / "link.pcap").unlink()
    other = traffic(30, start=SYNTH_START + 7200 * NS)
    write_pcap(base / "other.pcap", other)
    r = npcapimport("-t", root, base)
    assert r.returncode == 0 and "the dump set's own directory; skipped" in r.stdout, r.stdout
    repair(root)  # as at the recorder's next start: the unfinished file is placed
    assert_clean(root)
    assert sorted(extract(root, tmp_path / "out.pcap")) == records(pk + other)


def test_a_capture_too_disordered_refuses_the_run_before_anything_is_written(tmp_path):
    """The refusal came in the second pass, after the captures before it were imported
    (README: any refusal imports nothing of the run)."""
    good = tmp_path / "good.pcap"
    write_pcap(good, traffic(100))
    pk = traffic(100, start=SYNTH_START + 7200 * NS)
    bad = tmp_path / "bad.pcap"
    write_pcap(bad, [*pk[:50], (pk[0][0] - 1800 * NS, pk[0][1], pk[0][2]), *pk[50:]])
    root = new_dumpset(tmp_path / "ds")
    one_line(npcapimport("-t", root, good, bad), 1, str(bad), "back and forth",
             "nothing was imported")
    assert not DumpSet.open(root).files()
    assert not (root / "imports.json").exists()


def test_a_compression_bomb_is_refused_from_its_first_megabytes(tmp_path):
    """4 GB of zeros (4 MB of gzip) beside a dump set on an 8 MB filesystem: refused for
    what it is (not a capture), not by filling the disk first."""
    bomb = tmp_path / "bomb.pcap.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        zeros = bytes(64 << 20)
        for _ in range(64):
            f.write(zeros)
    with loop_fs(tmp_path, "8M") as fs:
        root = new_dumpset(fs / "ds")
        one_line(npcapimport("-t", root, bomb), 1, str(bomb), "not a pcap file")
        assert not DumpSet.open(root).files()


def _pcap(snaplen: int, *records: bytes) -> bytes:
    return struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, snaplen, 1) + b"".join(records)


def _record(ts: int, data: bytes, caplen: int | None = None, wirelen: int | None = None) -> bytes:
    sec, ns = divmod(ts, NS)
    return struct.pack("<IIII", sec, ns, len(data) if caplen is None else caplen,
                       len(data) if wirelen is None else wirelen) + data


def _crafted() -> dict[str, bytes]:
    pk = traffic(20)
    recs = [_record(ts, d, wirelen=w) for ts, d, w in pk]
    epbs = []
    for ts, d, w in pk:
        units = ts
        epbs.append(pcapng_block(6, struct.pack("<IIIII", 0, units >> 32, units & 0xFFFFFFFF,
                                                len(d), w) + d))
    idb = pcapng_block(1, struct.pack("<HHI", 1, 0, 262144)
                       + struct.pack("<HH", 9, 1) + bytes([9]) + bytes(3) + bytes(4))
    return {
        "huge-snaplen": _pcap(0xFFFFFFFF, *recs),
        "caplen-over-snaplen": _pcap(64, *recs),
        "torn-last-record": _pcap(262144, *recs)[:-7],
        "record-claiming-4-GB": _pcap(262144, *recs[:10], struct.pack(
            "<IIII", pk[10][0] // NS, 0, 0xFFFFFFF0, 0xFFFFFFF0), *recs[10:]),
        "pcapng-unknown-blocks": pcapng_shb() + idb + b"".join(
            e + pcapng_block(0x0BAD0BAD, bytes(13)) for e in epbs),
    }


@pytest.mark.parametrize("name", sorted(_crafted()))
def test_crafted_records_import_as_tcpdump_reads_them(tmp_path, name):
    """Odd but readable captures: what is imported is what tcpdump reads (up to a record
    that cannot be one), with a line for what is left out, and no traceback."""
    src = tmp_path / f"{name}.pcap"
    src.write_bytes(_crafted()[name])
    r = subprocess.run(["tcpdump", "--time-stamp-precision=nano", "-r", str(src), "-w", "-"],
                       capture_output=True)
    want = sorted(read_pcap_records(r.stdout))
    assert want
    root = new_dumpset(tmp_path / "ds")
    r = run_bounded("-t", root, src)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    if name in ("torn-last-record", "record-claiming-4-GB"):
        assert "after the last complete packet" in r.stdout, r.stdout
    assert sorted(extract(root, tmp_path / "out.pcap")) == want
    assert_clean(root)
