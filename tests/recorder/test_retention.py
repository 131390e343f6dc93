"""Retention (issue 19): --max-age, and legal holds against the disk budget, with a real
recorder on a veth pair; the budget's rules on their own first."""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

from recorderproc import RecorderProc, read_stats, recorded_frames, synthetic_pcap, tool

from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.holds import holds_path, place_hold, release_hold
from pcapvault.index.pcapfile import global_header
from pcapvault.index.times import parse_duration, parse_time
from pcapvault.recorder.budget import DiskBudget, Limit
from pcapvault.recorder.indexer import index_and_link

S = 1_000_000_000
KB = 1024


def add_files(ds: DumpSet, first_ns: int, nfiles: int, per_file: int = 20,
              gap_ns: int = 10_000_000, size: int = 200) -> list[StoredFile]:
    """Files recorded earlier (timestamps from `first_ns` on), indexed and linked as the
    recorder does it."""
    out = []
    for f in range(nfiles):
        recs = []
        for i in range(per_file):
            ts = first_ns + (f * per_file + i) * gap_ns
            frame = bytes(12) + b"\x08\x00" + struct.pack("!I", f * 1000 + i).ljust(size, b"x")
            recs.append(struct.pack("<IIII", ts // S, ts % S, len(frame), len(frame)) + frame)
        temp = ds.temp_path(f"old{f}")
        temp.write_bytes(global_header(1, 1536, True) + b"".join(recs))
        sf = ds.place(temp, first_ns + f * per_file * gap_ns)
        out.append(index_and_link(ds, sf))
    return out


def new_dumpset(root: Path, iface: str = "test0") -> DumpSet:
    return DumpSet.create(root, interface=iface, linktype=1, snaplen=1536, nanosecond=True)


def names(files: list[StoredFile]) -> set[str]:
    return {sf.name for sf in files}


def manage(*args: str) -> str:
    r = subprocess.run([tool("npcapmanage"), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def wait_for(what, timeout: float, rec: RecorderProc) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < end, rec.stderr
        time.sleep(0.2)


# --- the budget's rules -----------------------------------------------------------------------


def test_expire_deletes_by_last_packet_oldest_first_and_spares_held_files(tmp_path):
    ds = new_dumpset(tmp_path / "ds")
    now = time.time_ns()
    old = add_files(ds, now - 10 * 86400 * S, 3)
    # First packet older than the age, last one younger: the file stays.
    straddling = add_files(ds, now - 3600 * S - 100 * S, 1, per_file=30, gap_ns=5 * S)
    young = add_files(ds, now - 60 * S, 2)
    held = place_hold(ds, old[1].first_ns, old[1].first_ns + 1, "case", "u")
    budget = DiskBudget(ds, Limit("1G", bytes=1 << 30), 64 * KB, max_age_ns=3600 * S)
    assert budget.expire(now) == 2
    assert names(ds.files()) == names([old[1], *straddling, *young])
    assert not list(ds.timeline.rglob(old[0].name))  # its link went too
    assert budget.expired_files == 2 and budget.deleted_files == 0
    release_hold(ds, held.id)
    assert budget.expire(now) == 1  # the release is seen without a restart
    assert names(ds.files()) == names([*straddling, *young])
    assert DiskBudget(ds, Limit("1G", bytes=1 << 30), 64 * KB).expire(now) == 0  # no --max-age


def test_make_room_never_deletes_held_files_and_says_when_they_fill_the_budget(tmp_path):
    ds = new_dumpset(tmp_path / "ds")
    files = add_files(ds, 1_763_737_000 * S, 6, per_file=50, size=1000)
    place_hold(ds, files[1].first_ns, files[2].first_ns + 1, "case", "u")  # files 1 and 2
    used = ds.usage()
    reserve = int(64 * KB * 1.5)
    budget = DiskBudget(ds, Limit("x", bytes=used + reserve + 8 * 4096 - 40 * KB), 64 * KB)
    budget.make_room()  # one unheld file is enough: the oldest one goes
    assert names(ds.files()) == names(files[1:])
    assert not budget.held_full
    budget.limit_bytes = reserve + 8 * 4096 + 4096  # only an empty dump set fits now
    budget.make_room()
    assert names(ds.files()) == names(files[1:3])
    assert budget.held_full and budget.deleted_files == 4
    assert not budget.free_oldest()  # disk full: held files do not go either
    holds_path(ds).write_text("{ damaged")  # unreadable holds: nothing may go
    budget.limit_bytes = 1 << 30
    budget.max_age_ns = S
    assert budget.expire() == 0 and names(ds.files()) == names(files[1:3])
    assert budget.holds_damaged


def test_max_age_takes_durations_as_relative_times_do_and_refuses_others(veth, tmp_path):
    assert parse_duration("30d") == 30 * 86400 * S
    assert parse_duration("90m") == 5400 * S and parse_duration("1.5h") == 5400 * S
    assert parse_time("-90m", now_ns=10**18) == 10**18 - 5400 * S  # the same parser
    for bad in ("30", "0d", "-1d", "1y", "d", ""):
        p = veth.run_rx(tool("recorder"), "-i", veth.rx, "-o", str(tmp_path / "ds"),
                        "--max-age", bad, stderr=subprocess.PIPE, text=True)
        err = p.stderr.read()
        assert p.wait(30) == 2, err
        assert len(err.strip().splitlines()) == 1 and "--max-age" in err, err
    assert not (tmp_path / "ds").exists()


# --- a real recorder ------------------------------------------------------------------------------


def test_max_age_deletes_old_files_at_start_and_every_minute_and_keeps_new_ones(veth, tmp_path):
    ds = new_dumpset(tmp_path / "ds", veth.rx)
    now = time.time_ns()
    old = add_files(ds, now - 40 * 86400 * S, 3)
    # Its last packet turns an hour old about 40 s after the start: for the periodic check.
    soon = add_files(ds, now - 3600 * S + 40 * S - 20 * 10_000_000, 1)
    young = add_files(ds, now - 600 * S, 2)
    rec = RecorderProc(veth, ds.root, "--max-age", "1h", "--disk-limit", "1GB",
                       "--stats-interval", "0.5")
    assert names(ds.files()) == names(soon + young)  # at start
    assert not any(list(ds.timeline.rglob(sf.name)) for sf in old)
    assert rec.stderr.count("max age: deleted") == 3
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 200, 300)
    sent = veth.send([src])
    wait_for(lambda: read_stats(ds.root)["files_deleted_age"] == "4", 90, rec)
    assert not soon[0].pcap.exists()
    stats = read_stats(ds.root)
    assert (stats["files_deleted_age"], stats["files_deleted_budget"]) == ("4", "0")
    assert stats["files_deleted"] == "4"
    assert rec.stop() == 0, rec.stderr
    assert f"max age: deleted {soon[0].name}" in rec.stderr
    left = DumpSet.open(ds.root).files()
    assert names(young) <= names(left) and len(left) == 3
    assert [f for _, f, _ in recorded_frames(ds.root)][-len(sent):] == sent


def test_a_hold_survives_budget_pressure_stops_recording_when_full_and_release_resumes(
        veth, tmp_path):
    ds = new_dumpset(tmp_path / "ds", veth.rx)
    old = add_files(ds, time.time_ns() - 86400 * S, 6, per_file=100, size=1000)
    manage("hold", "-t", str(ds.root), "-b", str(old[0].first_ns // S), "-e",
           str(old[-1].first_ns // S + 10), "--reason", "evidence")
    limit = 2 << 20
    rec = RecorderProc(veth, ds.root, "-p", "64K", "--disk-limit", "2M",
                       "--stats-interval", "0.3")
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 3000, 1000)

    # Pressure: the budget deletes the recorder's own files, never the held ones.
    veth.send([src], pps=2000)
    wait_for(lambda: int(read_stats(ds.root)["files_deleted_budget"]) > 5, 30, rec)
    assert all(sf.pcap.exists() and sf.index.exists() for sf in old)
    assert ds.usage() <= limit

    # Everything held: the recorder stops writing rather than delete or overshoot.
    out = manage("hold", "-t", str(ds.root), "-b", "-1h", "-e", str(time.time_ns() // S + 3600),
                 "--reason", "all of it")
    hold_id = out.split()[1]
    veth.send([src], pps=2000)
    wait_for(lambda: read_stats(ds.root)["held_full"] == "1", 30, rec)
    veth.send([src], pps=2000)
    time.sleep(0.5)
    stats = read_stats(ds.root)
    assert stats["held_full"] == "1" and int(stats["packets_held_full"]) > 0
    assert stats["packets_dropped"] == "0"  # not the kernel's drops: counted apart
    assert "NOT RECORDING" in rec.stderr and rec.proc.poll() is None
    assert ds.usage() <= limit
    kept = names(DumpSet.open(ds.root).files())
    written = int(stats["files_written"])

    # Released: room appears and recording resumes by itself.
    manage("release", hold_id, "-t", str(ds.root))
    wait_for(lambda: read_stats(ds.root)["held_full"] == "0", 10, rec)
    sent = veth.send([src], pps=2000)
    assert rec.stop() == 0, rec.stderr
    assert "recording resumes" in rec.stderr
    assert int(read_stats(ds.root)["files_written"]) > written
    files = DumpSet.open(ds.root).files()
    assert all(sf.pcap.exists() for sf in old)
    assert not kept <= names(files)  # unheld again, the recorder's files made room
    assert ds.usage() <= limit
    frames = [f for _, f, _ in recorded_frames(ds.root)][len(old) * 100:]
    assert frames and frames == sent[-len(frames):]  # the newest, with no gap


def test_a_hold_placed_while_recording_protects_from_the_next_deletion_on(veth, tmp_path):
    """A hold placed while the recorder runs protects files from the next deletion on."""
    ds = new_dumpset(tmp_path / "ds", veth.rx)
    old = add_files(ds, time.time_ns() - 86400 * S, 3, per_file=100, size=1000)
    rec = RecorderProc(veth, ds.root, "-p", "64K", "--disk-limit", "1M")
    place_hold(ds, old[2].first_ns, old[2].first_ns + 1, "late", "u")
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 3000, 1000)
    veth.send([src], pps=2000)
    assert rec.stop() == 0, rec.stderr
    assert not old[0].pcap.exists() and not old[1].pcap.exists()
    assert old[2].pcap.exists()
    assert list(ds.timeline.rglob(old[2].name))
