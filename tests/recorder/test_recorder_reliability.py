"""The recorder on an operator's worst day: a killed indexer, a full disk, a bad -A, a nested -o.

Issue 21, items 1, 2, 7 and 8: each of these used to lose recorded data or stop capture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fsutil import fill, loop_fs
from recorderproc import (
    RecorderProc,
    one_line,
    read_stats,
    record,
    recorded_frames,
    synthetic_pcap,
    tool,
)

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet


def indexer_pid(rec: RecorderProc, other_than: int = 0, timeout: float = 5) -> int:
    """The pid of the recorder's indexer child (a new one when `other_than` is given)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            kids = Path(f"/proc/{rec.proc.pid}/task/{rec.proc.pid}/children").read_text().split()
        except FileNotFoundError:
            kids = []
        kids = [int(k) for k in kids if int(k) != other_than]
        if kids:
            return kids[0]
        time.sleep(0.02)
    raise AssertionError("no indexer process:\n" + rec.stderr)


def start_fails(pair, *args: str) -> subprocess.CompletedProcess:
    """A recorder run in the test namespace that is expected to stop at start."""
    p = pair.run_rx(tool("recorder"), "-i", pair.rx, "--disk-limit", "1GB", *args,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# --- item 1: a dead indexer ---------------------------------------------------------------------


def record_with_stalled_indexer(veth, tmp_path: Path, end_stall: signal.Signals):
    """60 MB through a 40 MB budget in 1 MB files while the indexer makes no progress.

    The indexer is stopped (like one swapping hard) while the traffic passes, then sent
    `end_stall`. Checks that the budget kept a full budget's worth of the newest files and that
    every one of them ends up indexed and linked; returns the recorder and the backlog seen.
    """
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 60000, 1000)
    rec = RecorderProc(veth, tmp_path / "ds", "-p", "1M", "--disk-limit", "40MB",
                       "--stats-interval", "0.2")
    pid = indexer_pid(rec)
    os.kill(pid, signal.SIGSTOP)
    try:
        sent = veth.send([src], pps=0)
        time.sleep(0.6)
        behind = int(read_stats(tmp_path / "ds")["files_pending_index"])
    finally:
        os.kill(pid, end_stall)
        os.kill(pid, signal.SIGCONT)
    # The indexer runs at idle priority: on a busy machine catching up may take a while.
    end = time.monotonic() + 90
    while read_stats(tmp_path / "ds")["files_pending_index"] != "0":
        assert time.monotonic() < end, rec.stderr
        time.sleep(0.2)
    assert rec.stop() == 0, rec.stderr
    ds = DumpSet.open(tmp_path / "ds")
    files = ds.files()
    # 37 files stay when the indexer keeps up; waiting files used to make the budget delete
    # nearly all of them.
    assert len(files) >= 30, rec.stderr
    kept = [f for _, f, _ in recorded_frames(tmp_path / "ds")]
    assert kept == sent[-len(kept):]
    assert all(sf.index.exists() for sf in files)
    assert [sf.name for sf in ds.files_in_window(0, 2**63 - 1)] == [sf.name for sf in files]
    return rec, behind


def test_killed_indexer_is_restarted_and_indexes_what_was_waiting(veth, tmp_path):
    rec, behind = record_with_stalled_indexer(veth, tmp_path, signal.SIGKILL)  # the OOM killer
    assert behind >= 30
    died = [line for line in rec.lines if "the indexer process died" in line]
    assert len(died) == 1 and "killed by SIGKILL" in died[0] and "restarting it" in died[0]
    assert int(died[0].split(" with ")[1].split()[0]) >= 30, died[0]
    assert read_stats(tmp_path / "ds")["indexer_restarts"] == "1"


def test_a_stalled_indexer_is_reported_not_paid_for_with_recorded_files(veth, tmp_path):
    rec, behind = record_with_stalled_indexer(veth, tmp_path, signal.SIGCONT)
    assert behind >= 30
    assert "the indexer is behind" in rec.stderr, rec.stderr
    assert "the indexer has caught up" in rec.stderr, rec.stderr
    assert "the indexer process died" not in rec.stderr


def test_an_indexer_killed_before_traffic_is_replaced_at_once(veth, tmp_path):
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB")
    old = indexer_pid(rec)
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    indexer_pid(rec, other_than=old)
    assert time.monotonic() - t0 < 1
    assert "the indexer process died (killed by SIGKILL) with 0 closed files" in rec.stderr
    assert rec.stop() == 0, rec.stderr


def test_an_indexer_that_keeps_dying_stops_the_recorder(veth, tmp_path):
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB")
    pid = indexer_pid(rec)
    for _ in range(6):
        os.kill(pid, signal.SIGKILL)
        if _ < 5:
            pid = indexer_pid(rec, other_than=pid)
    assert rec.wait(10) == 1
    errors = [line for line in rec.lines if "error: " in line]
    assert len(errors) == 1, rec.stderr
    assert "died 6 times" in errors[0] and "start the recorder again" in errors[0]
    assert rec.stderr.count("restarting it") == 5
    assert "Traceback" not in rec.stderr, rec.stderr


# --- item 2: stats are best effort --------------------------------------------------------------


@pytest.mark.parametrize("where", ["/proc/nope", "{tmp}/no/such/dir/stats"])
def test_uncreatable_stats_file_is_refused_at_start(veth, tmp_path, where):
    r = start_fails(veth, "-o", str(tmp_path / "ds"), "--stats-file",
                    where.format(tmp=tmp_path))
    one_line(r, 2, "cannot write the stats file", "--stats-file", prog="recorder")


@pytest.fixture
def ext4(tmp_path):
    """A small ext4 filesystem on a loop device, created and removed by the test."""
    with loop_fs(tmp_path, "24M") as mnt:
        yield mnt


def test_disk_filled_by_another_process_never_stops_capture(veth, tmp_path, ext4):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 4000, 1000)  # 4 MB, four closed files of 1 MB
    rec = RecorderProc(veth, ext4 / "ds", "-p", "1M", "--disk-limit", "1GB",
                       "--stats-interval", "0.1")
    first = veth.send([src])
    time.sleep(0.5)
    fill(ext4)
    time.sleep(1)  # ten stats intervals on a full disk
    assert rec.proc.poll() is None, rec.stderr
    second = veth.send([src])
    time.sleep(0.5)
    assert rec.stop() == 0, rec.stderr
    assert rec.stderr.count("cannot write the stats file") == 1, rec.stderr
    assert "error" not in rec.stderr.lower(), rec.stderr
    assert "disk full: deleted the oldest file" in rec.stderr
    kept = [f for _, f, _ in recorded_frames(ext4 / "ds")]
    assert len(kept) >= len(second) // 2 and kept == (first + second)[-len(kept):]
    assert not (ext4 / "ds" / ".stats.part").exists()


def test_a_link_in_the_way_of_the_stats_file_never_stops_capture(veth, tmp_path):
    """Someone plants a link at the stats file's temporary name: the stats are skipped (said
    once), the capture goes on, and nothing is written through the link."""
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 500, 200)
    rec = RecorderProc(veth, tmp_path / "ds", "--stats-interval", "0.1")
    target = tmp_path / "target"
    (tmp_path / "ds" / ".stats.part").symlink_to(target)
    time.sleep(0.5)  # five stats intervals with the link in the way
    assert rec.proc.poll() is None, rec.stderr
    sent = veth.send([src])
    time.sleep(0.3)
    assert rec.stop() == 0, rec.stderr
    assert rec.stderr.count("cannot write the stats file") == 1, rec.stderr
    assert [f for _, f, _ in recorded_frames(tmp_path / "ds")] == sent
    assert not target.exists()


def test_a_reload_during_start_up_does_not_kill_it(veth, tmp_path):
    """`systemctl reload` (SIGUSR1) right after a Type=simple start, before the capture
    loop takes the signal: the default action ended the recorder, silently. From the
    moment the command's code runs (the signal ignored: the interpreter's own start is all
    that is left before), reloads during start-up are harmless."""
    rec = RecorderProc(veth, tmp_path / "ds", ready=False)
    status = Path(f"/proc/{rec.proc.pid}/status")
    usr1 = 1 << (signal.SIGUSR1 - 1)
    while not rec._ready.is_set():
        fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        if int(fields["SigIgn"], 16) & usr1:
            break
        time.sleep(0.002)
    assert not rec._ready.is_set(), "started before SIGUSR1 was set aside"
    until = time.monotonic() + 1.5
    while time.monotonic() < until and rec.proc.poll() is None:
        rec.signal(signal.SIGUSR1)
        time.sleep(0.05)
    assert rec._ready.wait(20) and rec.proc.poll() is None, rec.stderr
    assert rec.stop() == 0, rec.stderr


# --- item 7: -A -----------------------------------------------------------------------------------


def test_a_bad_timeline_leaves_no_marker_and_a_good_one_works(veth, tmp_path):
    ds_dir, tl = tmp_path / "ds", tmp_path / "tl"
    r = start_fails(veth, "-o", str(ds_dir), "-A", "/proc/foo")
    one_line(r, 1, "cannot create the timeline /proc/foo", "-A", prog="recorder")
    assert not (ds_dir / ".pcapvault").exists()
    record(veth, tmp_path, 500, 200, "-A", str(tl))
    ds = DumpSet.open(ds_dir)
    assert ds.timeline == tl and ds.timeline_problem() == ""
    assert ds.files_in_window(0, 2**63 - 1) == [
        type(sf)(sf.first_ns, timeline.slot_dir(tl, sf.slot) / sf.name) for sf in ds.files()
    ]


def test_a_different_timeline_is_refused_while_the_old_one_exists_then_moved(veth, tmp_path):
    ds_dir, tl, tl2 = tmp_path / "ds", tmp_path / "tl", tmp_path / "tl2"
    record(veth, tmp_path, 500, 200, "-A", str(tl))
    marker = (ds_dir / ".pcapvault").read_text()
    r = start_fails(veth, "-o", str(ds_dir), "-A", str(tl2))
    one_line(r, 2, f"differs from the timeline {tl}", f"delete {tl}", prog="recorder")
    assert (ds_dir / ".pcapvault").read_text() == marker and not tl2.exists()
    # Moving it as the message says: the old timeline goes, the start relinks every file.
    subprocess.run(["rm", "-r", str(tl)], check=True)
    assert "does not exist" in DumpSet.open(ds_dir).timeline_problem()
    rec = RecorderProc(veth, ds_dir, "-A", str(tl2), "--disk-limit", "1GB")
    assert rec.stop() == 0, rec.stderr
    ds = DumpSet.open(ds_dir)
    assert ds.timeline == tl2 and ds.timeline_problem() == ""
    assert json.loads((ds_dir / ".pcapvault").read_text())["timeline"] == str(tl2)
    assert len(ds.files_in_window(0, 2**63 - 1)) == len(ds.files()) > 0


def test_timeline_problem_names_a_foreign_or_unmarked_timeline(tmp_path):
    from dumpsets import make_dumpset

    a = make_dumpset(tmp_path / "a", nfiles=1)
    b = make_dumpset(tmp_path / "b", nfiles=1)
    meta = json.loads((a.timeline / timeline.MARKER).read_text())
    (a.timeline / timeline.MARKER).write_text(json.dumps({**meta, "dumpset": str(b.root)}))
    assert f"belongs to the dump set {b.root}" in DumpSet.open(a.root).timeline_problem()
    (a.timeline / timeline.MARKER).unlink()
    assert "not a pcapvault timeline" in DumpSet.open(a.root).timeline_problem()


# --- item 8: nested dump sets -------------------------------------------------------------------


def test_a_dump_set_inside_a_live_one_or_its_timeline_is_refused(veth, tmp_path):
    ds_dir = tmp_path / "ds"
    rec = RecorderProc(veth, ds_dir, "--disk-limit", "1GB")
    try:
        tl = DumpSet.open(ds_dir).timeline
        for inner, needle in ((tl, "is a timeline"), (tl / "x", "inside the timeline"),
                              (ds_dir / "sub", "inside the dump set")):
            r = start_fails(veth, "-o", str(inner))
            one_line(r, 1, needle, "-o", prog="recorder")
            assert not (inner / ".pcapvault").exists()
        assert not (ds_dir / "sub").exists() and not (tl / "x").exists()
        # Nor may another dump set take over this one's timeline.
        r = start_fails(veth, "-o", str(tmp_path / "other"), "-A", str(tl))
        one_line(r, 1, "belongs to another dump set", "-A", prog="recorder")
    finally:
        assert rec.stop() == 0, rec.stderr


def test_disk_full_with_nothing_to_delete_is_one_error_and_no_stats_part(veth, tmp_path, ext4):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 2000, 1000)
    rec = RecorderProc(veth, ext4 / "ds", "-p", "64M", "--disk-limit", "1GB",
                       "--stats-interval", "0.1")
    veth.send([src])  # all in the file being written: there is no closed file to delete
    time.sleep(0.3)
    fill(ext4)
    veth.send([src])
    assert rec.wait(30) == 1, rec.stderr
    errors = [line for line in rec.lines if "error" in line.lower()]
    assert len(errors) == 1, rec.stderr
    assert "disk full" in errors[0] and "nothing left to delete" in errors[0]
    # The stats file may have said so once before capture hit the full disk, never after.
    assert rec.stderr.count("cannot write the stats file") <= 1
    assert rec.stderr.index("cannot write the stats file") < rec.stderr.index(errors[0]) \
        if "cannot write the stats file" in rec.stderr else True
    assert not (ext4 / "ds" / ".stats.part").exists()
    assert DumpSet.open(ext4 / "ds").temp_files() == []
