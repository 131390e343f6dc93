"""recorder --exec-cmd: a command for every closed file, once it is indexed and linked, that can
neither stall capture nor run as root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dumpsets import make_dumpset
from recorderproc import RecorderProc, read_stats, recorded_frames, synthetic_pcap, tool

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.indexfile import read_index
from pcapvault.recorder.hook import FileHook

NOBODY = 65534

# One line per run: what the command was told and what it saw.
REPORT = ('echo "$PCAPVAULT_PCAP|$PCAPVAULT_INDEX|$PCAPVAULT_DUMPSET|$PCAPVAULT_FIRST_NS|'
          '$PCAPVAULT_LAST_NS|$(id -u)|$(readlink /proc/self/fd/0)|'
          '$(test -e "$PCAPVAULT_INDEX" && echo indexed)|'
          '$(find "$PCAPVAULT_DUMPSET/timeline" -name "${PCAPVAULT_PCAP##*/}" | grep -c .)"'
          ' >> {log}')


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-traversable directory: the account the recorder drops to must reach it."""
    base = Path(tempfile.mkdtemp(prefix="pv-hook-", dir="/tmp"))
    base.chmod(0o755)
    (base / "log").mkdir()
    os.chown(base / "log", NOBODY, NOBODY)
    try:
        yield base
    finally:
        shutil.rmtree(base)


def test_the_hook_sees_every_closed_file_exactly_once_indexed_and_linked(veth, tmp_path, shared):
    log = shared / "log" / "runs"
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 1500, 400)
    rec = RecorderProc(veth, shared / "ds", "-u", "nobody", "-p", "64K", "--disk-limit", "1GB",
                       "--exec-cmd", REPORT.replace("{log}", str(log)), "--exec-max", "3")
    sent = veth.send([src], pps=3000)
    time.sleep(0.3)
    assert rec.stop() == 0, rec.stderr
    ds = DumpSet.open(shared / "ds")
    files = ds.files()
    assert len(files) > 5
    assert [f for _, f, _ in recorded_frames(ds.root)] == sent
    runs = [line.split("|") for line in log.read_text().splitlines()]
    assert sorted(r[0] for r in runs) == [str(sf.pcap) for sf in files]  # each file once
    for pcap, index, dumpset, first, last, uid, stdin, indexed, links in runs:
        idx = read_index(index, packets=False)
        assert index == pcap + ".idx" and dumpset == str(ds.root)
        assert (int(first), int(last)) == (idx.first_ns, idx.last_ns)
        assert (uid, stdin, indexed, links) == (str(NOBODY), "/dev/null", "indexed", "1")
    stats = read_stats(ds.root)
    assert stats["exec_started"] == str(len(files)) and stats["exec_failed"] == "0"


def test_a_hanging_hook_does_not_stop_capture_and_is_killed(veth, tmp_path, shared):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 6000, 300)
    rec = RecorderProc(veth, shared / "ds", "-u", "nobody", "-p", "64K", "--disk-limit", "1GB",
                       "--exec-cmd", "sleep 1000", "--exec-max", "1", "--exec-timeout", "1")
    sent = veth.send([src], pps=2000)  # 3 s at a steady rate
    time.sleep(0.3)
    assert rec.stop() == 0, rec.stderr
    stats = read_stats(shared / "ds")
    assert stats["packets_dropped"] == "0"
    assert [f for _, f, _ in recorded_frames(shared / "ds")] == sent
    assert int(stats["exec_killed"]) >= 3, rec.stderr
    assert "still runs after 1 s: killing it" in rec.stderr
    assert "not run to the end for" in rec.stderr  # the exit waits one timeout, no more


def test_failures_and_a_full_queue_are_logged_and_counted(tmp_path, caplog):
    ds = make_dumpset(tmp_path / "ds", nfiles=3)
    # Slow enough that the first still runs when the third file comes.
    hook = FileHook(f"sleep 0.5; exit 3; touch {tmp_path}/never", ds.root, max_running=1,
                    timeout=30, queue_max=1)
    for sf in ds.files():
        hook.submit(sf)  # one runs, one waits, the third finds the queue full
    hook.close()
    assert (hook.started, hook.failed, hook.skipped, hook.killed) == (2, 2, 1, 0)
    assert "failed (exit status 3)" in caplog.text
    assert f"not run for {ds.files()[2].name}" in caplog.text
    assert not (tmp_path / "never").exists()


def _capabilities(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t") for line in lines if line.startswith(("CapPrm", "CapEff",
                                                                         "CapAmb")))


def test_no_capability_is_kept_past_the_rings_set_up(veth, tmp_path, shared):
    """As under recorder@.service: the pcapvault account with ambient capabilities. Neither
    the recorder, nor its indexer (which parses what attackers send), nor the hook keeps
    any once the ring is set up."""
    caps = "+net_raw,+net_admin"
    as_unit = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
               f"--inh-caps={caps}", f"--ambient-caps={caps}"]
    (shared / "ds").mkdir()
    os.chown(shared / "ds", NOBODY, NOBODY)
    log = shared / "log" / "caps"
    p = veth.run_rx(*as_unit, tool("recorder"), "-i", veth.rx, "-o", str(shared / "ds"),
                    "--disk-limit", "1GB", "--exec-cmd",
                    f"grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status >> {log}",
                    stderr=subprocess.PIPE, text=True)
    err = ""
    while "recording " not in err:
        line = p.stderr.readline()
        assert line, err
        err += line
    kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    assert kids  # the indexer
    for pid in (p.pid, *map(int, kids)):
        assert set(_capabilities(pid).values()) == {"0000000000000000"}, pid
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 20, 100)
    veth.send([src])
    time.sleep(0.3)
    p.terminate()
    err += p.stderr.read()
    assert p.wait(60) == 0, err
    caps = dict(line.split(":\t") for line in log.read_text().splitlines())
    assert set(caps.values()) == {"0000000000000000"}, caps


def test_the_hook_never_runs_as_root(veth, tmp_path):
    p = veth.run_rx(tool("recorder"), "-i", veth.rx, "-o", str(tmp_path / "ds"), "--exec-cmd",
                    "true", stderr=subprocess.PIPE, text=True)
    r = subprocess.CompletedProcess(p.args, p.wait(60), "", p.stderr.read())
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("recorder: error: --exec-cmd would run as root: give -u")
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()


def test_at_most_exec_max_commands_run_at_once(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=5)
    log = tmp_path / "log"
    hook = FileHook(f"echo start >> {log}; sleep 0.3; echo end >> {log}", ds.root,
                    max_running=2)
    for sf in ds.files():
        hook.submit(sf)
    assert len(hook.running) == 2 and len(hook.queue) == 3
    hook.close()
    running = most = 0
    for line in log.read_text().split():
        running += 1 if line == "start" else -1
        most = max(most, running)
    assert most == 2 and running == 0 and hook.started == 5


def test_what_a_command_leaves_running_is_killed_when_it_exits(tmp_path, caplog):
    """`CMD &` returned at once and left CMD running, for ever: beyond --exec-max (one per
    file, however many files) and beyond --exec-timeout, and past the recorder's exit."""
    ds = make_dumpset(tmp_path / "ds", nfiles=3)
    pids = tmp_path / "pids"
    hook = FileHook(f"sleep 1000 & echo $! >> {pids}", ds.root, max_running=1, timeout=30)
    for sf in ds.files():
        hook.submit(sf)
    hook.close()
    assert (hook.started, hook.failed, hook.killed) == (3, 0, 0)
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 3
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in left):
        assert time.monotonic() < deadline, [p for p in left if _alive(p)]
        time.sleep(0.05)
    assert caplog.text.count("left 1 process(es) running when it exited: killed") == 3


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"
