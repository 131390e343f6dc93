"""Rotation, the disk budget, SIGUSR1, restarts: the recorder's file life cycle."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

from extract_helpers import read_pcap_records
from recorderproc import (
    RecorderProc,
    extracted_records,
    read_pcap,
    read_stats,
    record,
    recorded_frames,
    synthetic_pcap,
)

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet


def dumpset_bytes(root) -> int:
    """Everything under the dump set that the budget covers, measured independently."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            if n in (".pcapvault", ".lock", "stats", ".pcapvault-timeline") or n.endswith(
                "stats.part"
            ):
                continue
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total


def test_rotation_by_size(veth, tmp_path):
    sent = record(veth, tmp_path, 2000, 500, "-p", "0.1M")
    files = DumpSet.open(tmp_path / "ds").files()
    sizes = [sf.pcap.stat().st_size for sf in files]
    assert len(files) >= 10
    assert max(sizes) <= int(0.1 * (1 << 20))
    assert min(sizes[:-1]) > int(0.1 * (1 << 20)) - 600, "files close only when full"
    assert [f for _, f, _ in recorded_frames(tmp_path / "ds")] == sent


def test_rotation_by_time(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 40, 100)
    rec = RecorderProc(veth, tmp_path / "ds", "-t", "1", "--disk-limit", "1GB")
    veth.send([src], pps=10)
    time.sleep(0.3)
    assert rec.stop() == 0
    files = DumpSet.open(tmp_path / "ds").files()
    assert len(files) >= 3
    for sf in files:
        ts = [t for t, _, _ in read_pcap(sf.pcap)]
        # A file holds packets from its first second up to the next one.
        assert ts[-1] // 10**9 - ts[0] // 10**9 <= 1
        assert sf.first_ns // 1000 == ts[0] // 1000


def test_slot_boundary_splits_a_block(tmp_path):
    """The block crossing a 10-minute boundary is cut there, whatever -p and -t say."""
    from pcapvault.recorder.capture import split_at

    slot_end = timeline.slot_of(1_700_000_000) + timeline.SLOT_SECONDS
    secs = [slot_end - 2, slot_end - 1, slot_end - 1, slot_end, slot_end + 1]
    lens = [100] * 5
    assert split_at(secs, lens, 0, slot_end, 24, 1 << 30, False) == 3
    # Size cut comes first when it is nearer; a file always takes at least one packet.
    assert split_at(secs, lens, 0, slot_end, 24, 224, False) == 2
    assert split_at(secs, lens, 0, slot_end, 1000, 10, False) == 1
    assert split_at(secs, lens, 1, slot_end, 1000, 10, True) == 1
    # A packet more than a second before the file's first (the clock stepped back) too.
    assert split_at([100, 99, 98, 101], lens, 0, slot_end, 24, 1 << 30, False, 99) == 2


def test_clock_stepping_back_starts_a_new_file(tmp_path):
    """Packets an hour before the file's first (the wall clock stepped back) go into a file
    named for them, so extraction finds them by their time; they used to fill the later
    file until -t after its first packet."""
    import numpy as np
    from extract_helpers import ether, ipv4, udp

    from pcapvault.recorder.capture import Recorder, RecorderConfig
    from pcapvault.recorder.indexer import index_and_link
    from pcapvault.recorder.ring import BlockRecords

    def block(stamps: list[int]) -> BlockRecords:
        recs = []
        for k, ns in enumerate(stamps):
            frame = ether(b"\x02" * 6, b"\x04" * 6, 0x0800,
                          ipv4("10.0.0.1", "10.0.0.2", 17, udp(4000, 5000, k.to_bytes(4, "big"))))
            recs.append(struct.pack("<IIII", *divmod(ns, 10**9), len(frame), len(frame)) + frame)
        ends = np.cumsum([len(r) for r in recs], dtype=np.int64)
        return BlockRecords(memoryview(b"".join(recs)), ends,
                            np.array([ns // 10**9 for ns in stamps], dtype=np.uint32))

    t0 = timeline.slot_of(1_700_000_000) + 10
    rec = Recorder(RecorderConfig("lo", tmp_path / "ds", max_file_seconds=60, direct_io=False))
    try:
        rec._store(block([t0 * 10**9, t0 * 10**9 + 5]))
        back = [(t0 - 3600) * 10**9 + k * 10**10 for k in range(300)]  # 50 minutes, 10 s apart
        for k in range(0, 300, 50):
            rec._store(block(back[k : k + 50]))
        rec._close()
    finally:
        rec.ring.close()
    ds = DumpSet.open(tmp_path / "ds")
    for sf in ds.files():
        index_and_link(ds, sf)
    got = extracted_records(ds.root, tmp_path / "out.pcap", str(t0 - 3600), str(t0 - 3000))
    assert [t for t, _, _ in got] == [ns for ns in back if ns < (t0 - 3000) * 10**9]
    for sf in ds.files():
        ts = [t for t, _, _ in read_pcap(sf.pcap)]
        assert min(ts) // 10**9 >= sf.first_ns // 10**9 - 1, sf.name


def test_budget_holds_over_wraparounds(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 30000, 400)  # about 12.5 MB through a 2 MB budget
    limit = 2 << 20
    rec = RecorderProc(veth, tmp_path / "ds", "-p", "0.25M", "--disk-limit", "2MB")
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, dumpset_bytes(tmp_path / "ds"))
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    sent = veth.send([src], out=tmp_path / "sent.bin")
    time.sleep(0.5)
    assert rec.stop() == 0, rec.stderr
    stop.set()
    t.join()
    assert peak <= limit, f"budget exceeded: {peak} > {limit}"
    ds = DumpSet.open(tmp_path / "ds")
    files = ds.files()
    kept = [f for _, f, _ in recorded_frames(tmp_path / "ds")]
    # Oldest deleted first: what is left is exactly the newest tail of what was sent.
    assert len(kept) < len(sent) // 3
    assert kept == sent[-len(kept):]
    for sf in files:
        assert sf.index.exists()
        assert (timeline.slot_dir(ds.timeline, sf.slot) / sf.name).is_symlink()
    links = [p for p in ds.timeline.rglob("*.pcap")]
    assert len(links) == len(files), "links of deleted files must go with them"
    stats = read_stats(tmp_path / "ds")
    assert int(stats["files_deleted"]) > 10


def test_sigusr1_makes_file_extractable_within_a_second(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 100, 100)
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB")
    sent = veth.send([src])
    time.sleep(0.2)
    ds = DumpSet.open(tmp_path / "ds")
    assert ds.files_in_window(0, 2**63 - 1) == []
    t0 = time.monotonic()
    rec.signal(signal.SIGUSR1)
    found = []
    while time.monotonic() - t0 < 5 and not found:
        found = [f for f in ds.files_in_window(0, 2**63 - 1) if os.path.exists(f"{f.pcap}.idx")]
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    assert found, rec.stderr
    assert elapsed < 1.0, f"file visible after {elapsed:.2f} s"
    assert [f for _, f, _ in read_pcap(found[0].pcap)] == sent
    # Capture goes on into a new file.
    sent2 = veth.send([src])
    time.sleep(0.2)
    assert rec.stop() == 0
    assert [f for _, f, _ in recorded_frames(tmp_path / "ds")] == sent + sent2


def test_restart_adopts_old_files(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 3000, 400)
    rec = RecorderProc(veth, tmp_path / "ds", "-p", "0.25M", "--disk-limit", "4MB")
    first = veth.send([src])
    time.sleep(0.3)
    assert rec.stop() == 0
    before = DumpSet.open(tmp_path / "ds").files()
    assert len(before) >= 4
    # A tighter budget and new traffic: the old files count against it and go first.
    rec = RecorderProc(veth, tmp_path / "ds", "-p", "0.25M", "--disk-limit", "2MB")
    second = veth.send([src])
    time.sleep(0.3)
    assert rec.stop() == 0
    after = DumpSet.open(tmp_path / "ds").files()
    assert dumpset_bytes(tmp_path / "ds") <= 2 << 20
    assert before[0] not in after, "the oldest file of the first run goes first"
    kept = [f for _, f, _ in recorded_frames(tmp_path / "ds")]
    everything = first + second
    assert kept == everything[-len(kept):]
    assert len(kept) > len(second) // 2


def test_restart_with_larger_snaplen_keeps_extraction_whole(veth, tmp_path):
    """A restart's larger -s raises the dump set's snaplen: the extracted pcap's header
    covers the longer records, which tcpdump would otherwise cut on rewriting."""
    small, big = tmp_path / "small.pcap", tmp_path / "big.pcap"
    synthetic_pcap(small, 5, 100)
    synthetic_pcap(big, 5, 4000)
    rec = RecorderProc(veth, tmp_path / "ds", "-s", "1536", "--files-per-dir", "5")
    veth.send([small])
    time.sleep(0.3)
    assert rec.stop() == 0
    rec = RecorderProc(veth, tmp_path / "ds", "-s", "9000", "--files-per-dir", "7")
    sent = veth.send([big])
    time.sleep(0.3)
    assert rec.stop() == 0
    assert "--files-per-dir 7 replaces the 5" in rec.stderr
    # A later start with the default -s keeps the larger one.
    rec = RecorderProc(veth, tmp_path / "ds", "--files-per-dir", "7")
    assert rec.stop() == 0
    meta = DumpSet.open(tmp_path / "ds").meta
    assert (meta["snaplen"], meta["files_per_dir"]) == (9000, 7)
    out = tmp_path / "out.pcap"
    got = extracted_records(tmp_path / "ds", out, "946684800", "4102444800")
    assert int.from_bytes(out.read_bytes()[16:20], "little") == 9000
    assert [f for _, _, f in got][-5:] == sent
    again = tmp_path / "again.pcap"
    subprocess.run(["tcpdump", "-r", str(out), "-w", str(again)], check=True,
                   capture_output=True)
    assert [len(f) for _, _, f in read_pcap_records(again.read_bytes())][-5:] == [4000] * 5


def test_crash_leftover_is_recovered_on_start(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 500, 300)
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB")
    sent = veth.send([src])
    time.sleep(0.3)
    rec.signal(signal.SIGKILL)
    rec.wait()
    ds = DumpSet.open(tmp_path / "ds")
    temps = ds.temp_files()
    assert len(temps) == 1 and ds.files() == []
    # The crash tore the last record in half.
    with open(temps[0], "r+b") as f:
        f.truncate(os.path.getsize(temps[0]) - 7)
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB")
    time.sleep(0.5)
    assert rec.stop() == 0, rec.stderr
    assert "repair: finalise" in rec.stderr
    assert ds.temp_files() == []
    got = [f for _, f, _ in recorded_frames(tmp_path / "ds")]
    # Only the unaligned staging tail (under 4 KiB) may be lost to kill -9.
    assert got == sent[: len(got)] and len(got) >= len(sent) - 4096 // 316 - 1
    assert all(sf.index.exists() for sf in ds.files())


def test_private_dump_set_and_privilege_drop(veth, tmp_path):
    import pwd
    import stat
    import tempfile

    # A world-traversable parent: the account we drop to must reach the dump set.
    base = Path(tempfile.mkdtemp(prefix="pv-priv-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = tmp_path / "in.pcap"
        synthetic_pcap(src, 300, 200)
        rec = RecorderProc(veth, base / "ds", "-u", "nobody", "-p", "0.02M",
                           "--disk-limit", "1GB")
        sent = veth.send([src])
        time.sleep(0.3)
        assert rec.stop() == 0, rec.stderr
        nobody = pwd.getpwnam("nobody").pw_uid
        ds = DumpSet.open(base / "ds")
        files = ds.files()
        assert len(files) > 2 and all(sf.index.exists() for sf in files)
        assert [f for _, f, _ in recorded_frames(base / "ds")] == sent
        for sf in files:
            for p in (sf.pcap, sf.index):
                st = p.stat()
                assert st.st_uid == nobody, p
                assert stat.S_IMODE(st.st_mode) == 0o640, p
            assert stat.S_IMODE(sf.pcap.parent.stat().st_mode) == 0o750
        for d in [base / "ds", *ds.timeline.rglob("*")]:
            if d.is_dir() and not d.is_symlink():
                assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
        # Configurable, as n2disk's --file-mode / --dir-mode.
        rec = RecorderProc(veth, base / "ds2", "--file-mode", "0600", "--dir-mode", "0700",
                           "--disk-limit", "1GB")
        veth.send([src])
        time.sleep(0.3)
        assert rec.stop() == 0
        sf = DumpSet.open(base / "ds2").files()[0]
        assert stat.S_IMODE(sf.pcap.stat().st_mode) == 0o600
        assert stat.S_IMODE(sf.index.stat().st_mode) == 0o600
        assert stat.S_IMODE(sf.pcap.parent.stat().st_mode) == 0o700
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
