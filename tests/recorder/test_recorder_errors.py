"""Every startup error is one line on stderr that says what to do, with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from recorderproc import (
    RecorderProc,
    one_line,
    read_pcap,
    recorded_frames,
    synthetic_pcap,
    tool,
)

from pcapvault.index.dumpset import DumpSet

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def run_recorder(*args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), tool("recorder"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args, needles",
    [
        (["-i", "nosuch0"], ["unknown interface", "ip link"]),
        (["-i", "lo", "-f", "tcp port"], ["bad filter", "syntax error"]),
        (["-i", "lo", "-p", "12XB"], ["bad -p", "e.g. 500MB"]),
        # A size without a unit is bytes (n2disk's -p counted MB): too small to be meant.
        (["-i", "lo", "-p", "256"], ["bad -p '256'", "at least 16K", "write e.g. 256M"]),
        (["-i", "lo", "--disk-limit", "500000"], ["at least 1M", "write e.g. 500000M"]),
        (["-i", "lo", "--disk-limit", "150%"], ["percentage", "at most 100%"]),
        (["-i", "lo", "--disk-limit", "lots"], ["bad --disk-limit"]),
        (["-i", "lo", "--disk-limit", "0MB"], ["above zero"]),
        (["-i", "lo", "--disk-limit", "1MB", "-p", "4M"], ["cannot hold even one", "raise"]),
        (["-i", "lo", "--disk-limit", "80 %"], ["bad --disk-limit", "e.g. 80%"]),
        (["-i", "lo", "--disk-limit", "1e1%"], ["bad --disk-limit", "e.g. 80%"]),
        (["-i", "lo", "--disk-limit", "99999999999999999999999T"], ["more than any"]),
        (["-i", "lo", "--file-mode", "999"], ["bad --file-mode '999'", "octal"]),
        (["-i", "lo", "--dir-mode", "abc"], ["bad --dir-mode 'abc'", "octal"]),
        # The recorder writes its files and the indexer reads them, as their owner.
        (["-i", "lo", "--file-mode", "0440"], ["bad --file-mode '0440'", "owner", "0640"]),
        (["-i", "lo", "--exec-timeout", "nan"], ["--exec-timeout", "nan"]),
        (["-i", "lo", "--stats-interval", "nan"], ["--stats-interval", "nan"]),
    ],
)
def test_bad_arguments(tmp_path, args, needles):
    r = run_recorder(*args, "-o", str(tmp_path / "ds"))
    # Bad option values (and a limit too small for -p) are usage errors (2); a wrong
    # interface fails at run time (1).
    one_line(r, 1 if "nosuch0" in args else 2, *needles, prog="recorder")


def test_u_hands_over_only_a_dump_set_or_a_new_directory(tmp_path):
    """Root hands -o to the -u account: never through a link the account (which owns
    /var/lib/pcapvault, and runs --exec-cmd) made, and never a directory holding other
    files (/etc behind a planted link was given to the account)."""
    import os

    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "file").write_text("root's")
    base = tmp_path / "base"
    base.mkdir()
    planted = base / "ds"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)  # made by the account
    r = run_recorder("-i", "lo", "-u", "nobody", "-o", str(planted))
    one_line(r, 1, f"-o {planted} is a link made by uid 65534", prog="recorder")
    rootlink = base / "root-link"
    rootlink.symlink_to(victim)  # root's own link: followed, but victim is no dump set
    r = run_recorder("-i", "lo", "-u", "nobody", "-o", str(rootlink))
    one_line(r, 1, "holds files but no dump set", prog="recorder")
    for p in (victim, victim / "sub", victim / "sub" / "file"):
        assert p.stat().st_uid == 0, p


def test_missing_capability(tmp_path):
    probe = subprocess.run([*NOBODY, sys.executable, "-c", "import pcapvault.recorder"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this Python is not usable by an unprivileged user here")
    r = run_recorder("-i", "lo", "-o", str(tmp_path / "ds"), prefix=NOBODY)
    one_line(r, None, "CAP_NET_RAW", "root", prog="recorder")


def test_output_directory_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        one_line(run_recorder("-i", "lo", "-o", str(ro / "ds")), None, "cannot create",
                 "choose another -o", prog="recorder")
        one_line(run_recorder("-i", "lo", "-o", str(ro)), None, "not writable", prog="recorder")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("iface, args, needles", [
    ("pv0", ["-i", "lo"], ["dump set of interface pv0, not lo", "give -i pv0"]),
    ("lo", ["-i", "lo", "--usec"], ["records nanosecond timestamps", "leave out --usec"]),
])
def test_restart_refuses_another_interface_or_precision(tmp_path, iface, args, needles):
    """One dump set holds one interface's packets, in one timestamp precision."""
    ds = DumpSet.create(tmp_path / "ds", interface=iface, linktype=1, snaplen=1536,
                        nanosecond=True)
    one_line(run_recorder(*args, "-o", str(tmp_path / "ds")), 1, *needles, prog="recorder")
    assert DumpSet.open(tmp_path / "ds").meta == ds.meta


@pytest.mark.parametrize("below, what", [
    ("ds", "dump set"), ("site/ds", "dump set"), ("tl", "timeline")])
def test_output_above_a_dump_set_is_refused(tmp_path, below, what):
    """-o C where C/ds (or C/site/ds) is a dump set, or C/tl another set's timeline, would
    put C's files around it and make C/ds unusable; nothing is written into C."""
    ds = DumpSet.create(tmp_path / "c" / below if what == "dump set" else tmp_path / "other",
                        interface="lo", linktype=1, snaplen=1536, nanosecond=True,
                        timeline_dir=None if what == "dump set" else tmp_path / "c" / below)
    r = run_recorder("-i", "lo", "-o", str(tmp_path / "c"))
    one_line(r, 1, f"holds the {what} {tmp_path / 'c' / below}", "beside it", prog="recorder")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [below.split("/")[0]]
    # The dump set below, and a restart of it, still work.
    assert DumpSet.create(ds.root, interface="lo", linktype=1, snaplen=1536,
                          nanosecond=True).meta == ds.meta


def test_timeline_above_a_dump_set_is_refused(tmp_path):
    """-A C where C/ds is a dump set: C/ds would lie inside a timeline, and its next start
    be refused; nothing is written into C."""
    DumpSet.create(tmp_path / "c" / "ds", interface="lo", linktype=1, snaplen=1536,
                   nanosecond=True)
    r = run_recorder("-i", "lo", "-o", str(tmp_path / "new"), "-A", str(tmp_path / "c"))
    one_line(r, None, f"timeline {tmp_path / 'c'} holds the dump set {tmp_path / 'c' / 'ds'}",
             "beside it", prog="recorder")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ds"]
    assert not (tmp_path / "new" / ".pcapvault").exists()


def small_fs(tmp_path: Path, size: str) -> Path:
    d = tmp_path / "fs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    return d


def test_disk_full_frees_oldest_and_goes_on(veth, tmp_path):
    fs = small_fs(tmp_path, "3m")
    try:
        src = tmp_path / "in.pcap"
        synthetic_pcap(src, 20000, 500)  # 10 MB into a 3 MB filesystem
        # The budget believes there is room: only the filesystem itself says no.
        rec = RecorderProc(veth, fs / "ds", "-p", "0.5M", "--disk-limit", "100MB")
        sent = veth.send([src])
        time.sleep(0.5)
        assert rec.stop() == 0, rec.stderr
        assert "disk full: deleted the oldest file" in rec.stderr
        kept = [f for _, f, _ in recorded_frames(fs / "ds")]
        assert kept and kept == sent[-len(kept):]
        assert DumpSet.open(fs / "ds").temp_files() == []
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_disk_full_with_nothing_to_delete_closes_cleanly(veth, tmp_path):
    fs = small_fs(tmp_path, "1m")
    try:
        src = tmp_path / "in.pcap"
        synthetic_pcap(src, 4000, 500)  # 2 MB, one file of up to 8 MB
        rec = RecorderProc(veth, fs / "ds", "-p", "8M", "--disk-limit", "100MB")
        sent = veth.send([src])
        rc = rec.wait(30)
        assert rc == 1
        err = [line for line in rec.lines if "error" in line.lower()]
        assert any("disk full" in line and "free space" in line for line in err), rec.stderr
        ds = DumpSet.open(fs / "ds")
        assert ds.temp_files() == []
        files = ds.files()
        assert len(files) == 1
        got = read_pcap(files[0].pcap)  # parses completely: no torn record left
        assert [f for _, f, _ in got] == sent[: len(got)] and len(got) > 100
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def test_filesystem_refusing_o_direct_falls_back_with_one_warning(veth, tmp_path):
    d = tmp_path / "ramfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(d)], check=True)  # no O_DIRECT
    try:
        src = tmp_path / "in.pcap"
        synthetic_pcap(src, 2000, 300)
        rec = RecorderProc(veth, d / "ds", "-p", "0.1M", "--disk-limit", "1GB")
        sent = veth.send([src])
        time.sleep(0.3)
        assert rec.stop() == 0, rec.stderr
        assert rec.stderr.count("refuses O_DIRECT") == 1, rec.stderr
        assert len(DumpSet.open(d / "ds").files()) > 3
        assert [f for _, f, _ in recorded_frames(d / "ds")] == sent
    finally:
        subprocess.run(["umount", str(d)], check=True)
