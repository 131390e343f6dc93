"""`npcapmanage delete`: a window cut through files leaves extraction equal to tcpdump's
selection minus the deleted packets; held files are refused; every run is audited."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dumpsets import assert_clean, repair
from extract_helpers import (
    NS,
    SYNTH_START,
    epoch,
    synthetic_dumpset,
    tcpdump_select,
    tcpdump_window,
)
from recorderproc import (
    RecorderProc,
    extracted_records,
    one_line,
    recorded_frames,
    synthetic_pcap,
    tool,
)

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.holds import place_hold


def manage(*args: str) -> subprocess.CompletedProcess:
    """`npcapmanage delete ARGS` with stdin not a terminal."""
    return subprocess.run([tool("npcapmanage"), "delete", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def extract_all(root: Path, out: Path) -> list:
    return extracted_records(root, out, epoch(SYNTH_START - 3600 * NS),
                             epoch(SYNTH_START + 7200 * NS))


@pytest.fixture()
def synth(tmp_path):
    root, pcaps = synthetic_dumpset(tmp_path / "ds")
    orig = tmp_path / "orig"
    orig.mkdir()
    copies = []
    for p in pcaps:
        copies.append(orig / p.name)
        shutil.copyfile(p, copies[-1])
    return root, copies


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name.endswith((".pcap",
                                                                                ".idx"))}


def minus(all_pkts: list, gone: list) -> list:
    left = sorted(all_pkts)
    for p in gone:
        left.remove(p)
    return left


@pytest.mark.parametrize("expr", ["", "udp"])
def test_delete_window_cut_through_files(synth, tmp_path, expr):
    root, originals = synth
    # 7 to 17 minutes in: cuts the files at both ends, whole files in between, crosses a slot.
    b, e = SYNTH_START + 420 * NS + 1234, SYNTH_START + 1020 * NS + 777
    before = len(DumpSet.open(root).files())
    args = ["-t", str(root), "-b", epoch(b), "-e", epoch(e), "--yes"]
    r = manage(*args, *(["-f", expr] if expr else []))
    assert r.returncode == 0, r.stderr
    assert "deleted" in r.stdout and "rewrote" in r.stdout, r.stdout
    gone = tcpdump_window(originals, expr or "", b, e)
    assert gone
    want = minus(tcpdump_select(originals, ""), gone)
    got = extract_all(root, tmp_path / "all.pcap")
    assert sorted(got) == want
    assert_clean(root)
    if expr:  # with a filter every file of the window is rewritten, none deleted
        assert len(DumpSet.open(root).files()) == before
    else:
        assert len(DumpSet.open(root).files()) < before
    rec = json.loads((root / "audit.log").read_text().splitlines()[-1])
    assert rec["event"] == "delete" and rec["outcome"] == "deleted"
    assert rec["packets"] == len(gone)
    assert rec["bytes"] == sum(16 + len(p[2]) for p in gone)
    assert rec["filter"] == expr and rec["user"] == "root" and rec["files"]
    assert rec["begin"] == "2025-11-21T15:07:00.123458023Z"
    # A second run finds nothing and audits nothing.
    r = manage(*args, *(["-f", expr] if expr else []))
    assert r.returncode == 0 and "nothing to delete" in r.stdout, r.stdout + r.stderr
    begun, _ = [json.loads(line) for line in (root / "audit.log").read_text().splitlines()]
    assert begun["outcome"] == "begun"
    assert (begun["packets"], begun["files"]) == (rec["packets"], rec["files"])


def test_held_files_are_refused_and_nothing_deleted(synth):
    root, _ = synth
    ds = DumpSet.open(root)
    hold = place_hold(ds, SYNTH_START + 1000 * NS, SYNTH_START + 1001 * NS, "case 7", "root")
    before = digests(root)
    r = manage("-t", str(root), "-b", epoch(SYNTH_START + 420 * NS), "-e",
               epoch(SYNTH_START + 1020 * NS), "--yes")
    line = one_line(r, 1, "legal hold", hold.files[0], "nothing was deleted")
    assert line.startswith("npcapmanage: error:")
    assert digests(root) == before
    assert not (root / "audit.log").exists()


def test_one_import_or_deletion_at_a_time(synth, tmp_path):
    """Beside a recorder (or each other) an import and a deletion each check the dump set,
    then change it: a second one waits its turn, told so in one line, changing nothing."""
    root, copies = synth
    before = digests(root)
    fd = os.open(root / ".manage.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another npcapimport or npcapmanage at work
        r = manage("-t", str(root), "-b", epoch(SYNTH_START + 420 * NS), "-e",
                   epoch(SYNTH_START + 1020 * NS), "--yes")
        one_line(r, 1, "another npcapimport or npcapmanage delete is changing", str(root),
                 prog="npcapmanage")
        r = subprocess.run([tool("npcapimport"), "-t", str(root), str(copies[0])],
                           capture_output=True, text=True, timeout=300)
        one_line(r, 1, "another npcapimport or npcapmanage delete is changing",
                 prog="npcapimport")
        assert digests(root) == before
    finally:
        os.close(fd)
    os.unlink(root / ".manage.lock")
    os.symlink(root / "elsewhere", root / ".manage.lock")  # a lock file that leads away
    r = manage("-t", str(root), "-b", epoch(SYNTH_START + 420 * NS), "-e",
               epoch(SYNTH_START + 1020 * NS), "--yes")
    one_line(r, 1, "cannot lock", ".manage.lock", prog="npcapmanage")
    assert not (root / "elsewhere").exists() and digests(root) == before
    os.unlink(root / ".manage.lock")
    r = manage("-t", str(root), "-b", epoch(SYNTH_START + 420 * NS), "-e",
               epoch(SYNTH_START + 1020 * NS), "--yes")
    assert r.returncode == 0, r.stderr  # and once it has ended, it runs
    assert digests(root) != before


def test_no_terminal_needs_yes(synth):
    root, _ = synth
    before = digests(root)
    r = manage("-t", str(root), "-b", epoch(SYNTH_START), "-e", epoch(SYNTH_START + NS))
    one_line(r, 2, "--yes", "terminal")
    assert digests(root) == before


def _on_terminal(args: list[str], answer: bytes) -> tuple[int, bytes]:
    """Run the command on a pseudo-terminal, answering its question with `answer`."""
    cmd = [tool("npcapmanage"), "delete", *args]
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(cmd[0], cmd)
    out = b""
    sent = False
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
        if not sent and b"for good?" in out:
            os.write(fd, answer)
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_confirmation_on_a_terminal(synth):
    root, _ = synth
    args = ["-t", str(root), "-b", epoch(SYNTH_START), "-e", epoch(SYNTH_START + 60 * NS)]
    before = digests(root)
    code, out = _on_terminal(args, b"n\n")
    assert code == 1 and b"nothing deleted" in out, out
    assert digests(root) == before
    code, out = _on_terminal(args, b"y\n")
    assert code == 0 and b"deleted" in out, out
    assert digests(root) != before
    assert_clean(root)


@pytest.mark.parametrize("args,needle", [
    (["-b", "yesterday-ish", "-e", "now"], "yesterday-ish"),
    (["-b", "now", "-e", "-1h"], "after END"),
    (["-b", "-1h", "-e", "now", "-f", "host nowhere.invalid."], "filter"),
])
def test_bad_input_is_one_line_exit_2(synth, args, needle):
    root, _ = synth
    one_line(manage("-t", str(root), *args, "--yes"), 2, needle)


def test_not_a_dumpset_is_one_line_exit_1(tmp_path):
    one_line(manage("-t", str(tmp_path), "-b", "-1h", "-e", "now", "--yes"), 1,
             "not a pcapvault dump set")


def test_stopped_between_pcap_and_index_is_repaired(synth, tmp_path, monkeypatch):
    """A stop after the new pcap is in place but before its index: npcaprepair rebuilds the
    index (it describes a larger pcap) and extraction has the deletion done."""
    from pcapvault.tools import rangedelete

    root, originals = synth
    b, e = SYNTH_START + 420 * NS, SYNTH_START + 430 * NS
    ds = DumpSet.open(root)
    plan = rangedelete.plan_delete(ds, b, e)
    assert [c.keep is not None for c in plan.cuts] == [True]
    real = os.replace
    calls = []

    def stop_at_index(src, dst):
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(rangedelete.os, "replace", stop_at_index)
    with pytest.raises(KeyboardInterrupt):
        rangedelete.execute(plan, rangedelete.Done())
    monkeypatch.undo()
    r = subprocess.run([tool("npcaprepair"), str(root)], capture_output=True, text=True)
    assert r.returncode == 0 and "rebuild index" in r.stdout, r.stdout + r.stderr
    assert_clean(root)
    want = minus(tcpdump_select(originals, ""), tcpdump_window(originals, "", b, e))
    assert sorted(extract_all(root, tmp_path / "all.pcap")) == want


def test_audit_line_goes_to_syslog_too(synth, tmp_path):
    from pamworld import catch_syslog

    root, _ = synth
    with catch_syslog(tmp_path) as (catcher, prefix):
        r = subprocess.run([*prefix, tool("npcapmanage"), "delete", "-t", str(root), "-b",
                            epoch(SYNTH_START), "-e", epoch(SYNTH_START + 30 * NS), "--yes"],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        line = (root / "audit.log").read_text().splitlines()[-1]
        (prio,) = catcher.wait_for("npcapmanage", [line])
    assert prio >= 0, catcher.received
    assert json.loads(line)["packets"] > 0


def test_delete_beside_a_running_recorder(veth, tmp_path):
    """A running recorder goes on recording; the file it writes is never touched, and a window
    reaching into it is refused."""
    root = tmp_path / "ds"
    rec = RecorderProc(veth, root, "--disk-limit", "1GB")
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 200, 200)
    veth.send([src])
    time.sleep(0.3)
    rec.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 20
    while not any(list(DumpSet.open(root).timeline.rglob(sf.name + ".idx"))
                  for sf in DumpSet.open(root).files()):
        assert time.monotonic() < deadline, rec.stderr
        time.sleep(0.1)
    first = recorded_frames(root)
    assert len(first) == 200
    veth.send([src])  # into the next file, which the recorder keeps open
    time.sleep(0.3)
    one_line(manage("-t", str(root), "-b", "-1h", "-e", "now", "--yes"), 1,
             "a recorder is writing")
    b, e = first[50][0], first[150][0]
    r = manage("-t", str(root), "-b", epoch(b), "-e", epoch(e), "--yes")
    assert r.returncode == 0 and "rewrote" in r.stdout, r.stdout + r.stderr
    assert rec.proc.poll() is None
    assert rec.stop() == 0, rec.stderr
    after = recorded_frames(root)
    assert after[:100] == first[:50] + first[150:]
    assert [f for _, f, _ in after[100:]] == [f for _, f, _ in first]  # the second batch
    assert_clean(root)


def test_compressed_files_are_rewritten_compressed(tmp_path):
    """A dump set of `recorder --compress`: the cut file stays a seekable .pcap.zst."""
    from extract_helpers import synthetic_traffic, write_pcap

    from pcapvault.index import timeline
    from pcapvault.recorder.indexer import index_and_link

    pk = synthetic_traffic(600, SYNTH_START, seed=4, span_s=1500)
    ds = DumpSet.create(tmp_path / "ds", interface="eth0", linktype=1, snaplen=262144,
                        nanosecond=True)
    groups: list[list] = []
    for p in pk:
        if not groups or len(groups[-1]) >= 100 or (
                timeline.slot_of(p[0] // NS) != timeline.slot_of(groups[-1][0][0] // NS)):
            groups.append([])
        groups[-1].append(p)
    for i, g in enumerate(groups):
        tmp = ds.temp_path(i)
        write_pcap(tmp, g)
        index_and_link(ds, ds.place(tmp, g[0][0]), compress=3)
    originals = []
    for i, g in enumerate(groups):
        originals.append(tmp_path / f"orig{i}.pcap")
        write_pcap(originals[-1], g)
    b, e = pk[150][0] + 1, pk[420][0]
    r = manage("-t", str(ds.root), "-b", epoch(b), "-e", epoch(e), "-f", "tcp", "--yes")
    assert r.returncode == 0 and "rewrote" in r.stdout, r.stdout + r.stderr
    assert all(sf.name.endswith(".pcap.zst") for sf in DumpSet.open(ds.root).files())
    want = minus(tcpdump_select(originals, ""), tcpdump_window(originals, "tcp", b, e))
    assert sorted(extract_all(ds.root, tmp_path / "all.pcap")) == want
    assert_clean(ds.root)


def test_root_deletes_as_the_dump_sets_owner(tmp_path):
    """What a deletion writes (rewritten files, the audit log) belongs to the dump set's owner,
    as the recorder's account must go on deleting and rewriting them."""
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pv-owner-"))  # traversable by the owner
    try:
        base.chmod(0o755)
        root, _ = synthetic_dumpset(base / "ds")
        for p in [root, *root.rglob("*")]:
            os.chown(p, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
        r = manage("-t", str(root), "-b", epoch(SYNTH_START + 420 * NS), "-e",
                   epoch(SYNTH_START + 1020 * NS), "-f", "udp", "--yes")
        assert r.returncode == 0 and "rewrote" in r.stdout, r.stdout + r.stderr
        assert json.loads((root / "audit.log").read_text().splitlines()[-1])["user"] == "root"
        owners = {p: p.lstat().st_uid for p in [root, *root.rglob("*")]}
        assert set(owners.values()) == {nobody.pw_uid}, owners
    finally:
        shutil.rmtree(base)


def test_a_hold_placed_after_the_plan_wins(synth):
    """Asked again under the links lock, file by file: the held file and those after it stay."""
    from pcapvault.tools import rangedelete

    root, _ = synth
    ds = DumpSet.open(root)
    plan = rangedelete.plan_delete(ds, SYNTH_START + 420 * NS, SYNTH_START + 1020 * NS)
    assert len(plan.cuts) >= 3
    held = plan.cuts[1].sf
    place_hold(ds, held.first_ns, held.first_ns + 1, "late", "root")
    later = digests(root)
    done = rangedelete.Done()
    with pytest.raises(rangedelete.DeleteRefused, match="legal hold meanwhile"):
        rangedelete.execute(plan, done)
    assert done.files == [plan.cuts[0].sf.pcap.relative_to(root).as_posix()]
    now = digests(root)
    for c in plan.cuts[1:]:
        rel = str(c.sf.pcap.relative_to(root))
        assert now[rel] == later[rel]


def test_stopped_before_the_new_name_is_fixed_by_running_again(synth, tmp_path, monkeypatch):
    """A stop after the new pcap replaced the old but before the file took its new first
    packet's name: npcaprepair makes it consistent, and the deletion run again renames it, so
    the repair finds nothing more to do."""
    from pcapvault.tools import rangedelete

    root, originals = synth
    ds = DumpSet.open(root)
    first = ds.files()[1]
    b, e = first.first_ns, first.first_ns + 20 * NS  # its first packets
    plan = rangedelete.plan_delete(ds, b, e)
    assert [c.sf for c in plan.cuts] == [first] and plan.cuts[0].keep is not None

    def stop(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(rangedelete.os, "rename", stop)
    with pytest.raises(KeyboardInterrupt):
        rangedelete.execute(plan, rangedelete.Done())
    monkeypatch.undo()
    repair(root)
    assert "another file's" in repair(root, "--dry-run").stdout  # the name is too early
    r = manage("-t", str(root), "-b", epoch(b), "-e", epoch(e), "--yes")
    assert r.returncode == 0 and "renamed" in r.stdout, r.stdout + r.stderr
    assert_clean(root)
    want = minus(tcpdump_select(originals, ""), tcpdump_window(originals, "", b, e))
    assert sorted(extract_all(root, tmp_path / "all.pcap")) == want


def _deleting_udp(root: Path, b: int, e: int) -> tuple[subprocess.Popen, str]:
    """`npcapmanage delete -f udp` of [b, e) running, with its output up to its first
    rewritten file."""
    p = subprocess.Popen([tool("npcapmanage"), "delete", "-t", str(root), "-b", epoch(b), "-e",
                          epoch(e), "-f", "udp", "--yes"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    out = ""
    while "rewrote" not in out:
        line = p.stdout.readline()
        assert line, out + p.stderr.read()
        out += line
    return p, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_ends_between_files_and_is_audited(synth, tmp_path, sig):
    """kill, or the terminal hanging up, ended the run at once: files already rewritten were
    in no audit line (nothing at all when it was the first), and a stop between a pcap and
    its index left the file for npcaprepair. Now the file at hand is finished, the audit
    says what went, and the message says how to go on."""
    root, originals = synth
    b, e = SYNTH_START, SYNTH_START + 1800 * NS
    p, out = _deleting_udp(root, b, e)
    p.send_signal(sig)
    rest, err = p.communicate(timeout=120)
    out += rest
    rewrote = [line.split()[1] for line in out.splitlines() if line.startswith("rewrote")]
    assert p.returncode == 1, out + err
    assert err.startswith(f"npcapmanage: error: stopped by {sig.name} after "), err
    assert len(err.strip().splitlines()) == 1
    assert 0 < len(rewrote) < 9, out  # 9 files to rewrite: it stopped before the end
    begun, rec = [json.loads(line) for line in (root / "audit.log").read_text().splitlines()]
    assert rec["outcome"] == "stopped" and rec["files"] == rewrote
    assert begun["outcome"] == "begun" and len(begun["files"]) == 9
    assert_clean(root)  # no file left halfway
    ds = DumpSet.open(root)
    cut = [p for p in originals if f"{p.name}" in {Path(r).name for r in rewrote}]
    gone = tcpdump_window(cut, "udp", b, e)
    assert rec["packets"] == len(gone)
    want = minus(tcpdump_select(originals, ""), gone)
    assert sorted(extract_all(ds.root, tmp_path / "all.pcap")) == want


@pytest.mark.parametrize("fails", ["index rename", "report"])
def test_what_went_is_counted_even_when_a_later_step_fails(synth, monkeypatch, fails):
    """A file's packets are gone once its new pcap is in place: a failure after that (the
    index's rename, or the report to a terminal that hung up) left them out of `done`, so
    out of the audit line, which was not even written when it was the first file."""
    from pcapvault.tools import rangedelete

    root, _ = synth
    ds = DumpSet.open(root)
    plan = rangedelete.plan_delete(ds, SYNTH_START + 420 * NS, SYNTH_START + 1020 * NS, "udp")
    first = plan.cuts[0]
    report = lambda line: None  # noqa: E731
    if fails == "report":
        def report(line):
            raise OSError(5, "Input/output error")
    else:
        real = os.replace

        def replace(src, dst):
            if str(dst).endswith(".idx"):
                raise OSError(28, "No space left on device")
            real(src, dst)

        monkeypatch.setattr(rangedelete.os, "replace", replace)
    done = rangedelete.Done()
    with pytest.raises(OSError):
        rangedelete.execute(plan, done, report=report)
    assert done.files == [first.sf.pcap.relative_to(root).as_posix()]
    assert (done.packets, done.bytes) == (first.packets, first.bytes) != (0, 0)


def test_a_full_disk_leaves_the_file_as_it_was_and_no_temporary(small_ext4, tmp_path):
    """With room for the rewritten pcap but not its index, the new pcap was left behind as
    `.X.pcap.part` (on a disk already full, uncounted by the recorder's budget), and the
    error did not say which file or that nothing of it changed."""
    from fsutil import fill

    root, _ = synthetic_dumpset(small_ext4 / "ds")
    filler = fill(small_ext4)
    args = ["-t", str(root), "-b", epoch(SYNTH_START), "-e", epoch(SYNTH_START + 1800 * NS),
            "-f", "udp", "--yes"]
    before = digests(root)
    errors = []
    for _ in range(64):  # free a little more room each turn, until it succeeds
        r = manage(*args)
        if r.returncode == 0:
            break
        errors.append(one_line(r, 1, "No space left on device"))
        assert not list(root.rglob("*.part")), errors[-1]
        assert digests(root) == before
        os.truncate(filler, filler.stat().st_size - 4096)
    assert r.returncode == 0, r.stdout + r.stderr
    first = next(iter(DumpSet.open(root).files())).pcap.relative_to(root)
    assert (f"cannot write the rewritten {first} (No space left on device); it and the files "
            "after it are as they were") in errors[-1], errors
    assert_clean(root)


def test_a_run_killed_outright_has_left_its_begun_line(synth):
    """kill -9 (or a crash, a power cut) halfway left files rewritten and no audit line at
    all: the line saying what the run meant to delete is now written before the first."""
    root, _ = synth
    b, e = SYNTH_START, SYNTH_START + 1800 * NS
    p, out = _deleting_udp(root, b, e)
    p.kill()
    p.communicate(timeout=60)
    (rec,) = [json.loads(line) for line in (root / "audit.log").read_text().splitlines()]
    assert rec["outcome"] == "begun" and rec["filter"] == "udp" and len(rec["files"]) == 9
    (first,) = [line.split()[1] for line in out.splitlines() if line.startswith("rewrote")]
    assert first in rec["files"] and rec["packets"] > 0


def test_no_file_goes_when_the_audit_log_cannot_be_written(synth, tmp_path):
    """A deletion that cannot be recorded is not done (before, the files went and the run
    then failed on the log)."""
    root, _ = synth
    (root / "audit.log").symlink_to(tmp_path / "elsewhere")
    before = digests(root)
    r = manage("-t", str(root), "-b", epoch(SYNTH_START + 420 * NS), "-e",
               epoch(SYNTH_START + 1020 * NS), "--yes")
    one_line(r, 1, "cannot append to the audit log")
    assert digests(root) == before and not (tmp_path / "elsewhere").exists()
