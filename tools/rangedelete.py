"""Deleting a time range (and optionally only what a filter selects) from a dump set on purpose.

An erasure request or a password recorded in clear needs packets gone, with a record that they
went. Files wholly inside the window go as the budget deletes them (links first); a file the
window cuts, or any file of the window with a filter, is rewritten without the selected
packets: the new pcap and its index are written under hidden temporary names, then, under the
links lock, the file's timeline links are removed, the pcap and then the index are renamed over
the old ones, and the links are made again (docs/DESIGN.md, "Deleting a range"). A reader
therefore finds the old pair or the new one; a stop halfway leaves either the old file (the
temporaries are removed by npcaprepair) or the new pcap with the old index, which describes a
larger pcap and which npcaprepair (and the recorder's start) rebuilds. A file whose first
packets went takes the name of its new first packet.

Held files (index/holds.py) are refused before anything is deleted, and asked again under the
links lock for each file. Every run that deletes leaves one JSON line in the dump set's audit
file (`audit.log`) and in syslog.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import signal
import stat
import sys
import syslog
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from pcapvault.index import compressed, timeline
from pcapvault.index.atomicfile import create_new, temp_path
from pcapvault.index.builder import index_pcap
from pcapvault.index.dumpset import DumpSet, StoredFile, file_name
from pcapvault.index.errors import FormatError, PcapVaultError
from pcapvault.index.holds import files_overlapping, load_holds
from pcapvault.index.indexfile import PacketIndex, encode_index, read_index
from pcapvault.index.libpcap import FilterError, compile_filter
from pcapvault.index.pcapfile import PcapReader, RecordTable, parse_global_header, scan_records
from pcapvault.index.pcaplayout import GLOBAL_HEADER_LEN, RECORD_HEADER_LEN, global_header
from pcapvault.index.recordcopy import build_pcap, record_sizes
from pcapvault.index.repair import live, lock
from pcapvault.index.times import TimeError, format_time, parse_window

from .npcaprepair import become_owner

AUDIT_FILE = "audit.log"
SYSLOG_IDENT = "npcapmanage"


class DeleteRefused(PcapVaultError):
    """Nothing was deleted: a held file, a file not yet indexed, or one that needs repair."""


class Stopped(PcapVaultError):
    """A stop signal came: the run ended between two files (the audit says what went)."""


@dataclass
class Cut:
    """What happens to one file: deleted whole (`keep` None) or rewritten keeping `keep`."""

    sf: StoredFile
    keep: np.ndarray | None
    packets: int  # removed
    bytes: int  # record bytes (headers and data) removed
    size: int = 0  # the pcap's size when planned: a file changed since is not touched


@dataclass
class DeletePlan:
    ds: DumpSet
    begin_ns: int
    end_ns: int
    expr: str
    cuts: list[Cut] = field(default_factory=list)

    @property
    def packets(self) -> int:
        return sum(c.packets for c in self.cuts)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.cuts)


def _rel(ds: DumpSet, sf: StoredFile) -> str:
    return sf.pcap.relative_to(ds.root).as_posix()


def _records(sf: StoredFile, idx: PacketIndex) -> tuple[PcapReader, np.ndarray, RecordTable]:
    """(reader, its array, record table) of a stored file, which must agree with its index."""
    r = PcapReader(sf.pcap)
    arr = r.array()
    table = scan_records(arr, r.header)
    if r.size != idx.pcap_size or table.torn or len(table) != idx.count:
        r.close()
        raise DeleteRefused(f"{sf.pcap} and its index disagree; run npcaprepair on the dump "
                            "set first")
    return r, arr, table


def plan_delete(ds: DumpSet, begin_ns: int, end_ns: int, expr: str = "",
                recording: bool = False) -> DeletePlan:
    """What deleting [begin_ns, end_ns) (packets matching `expr`, if given) would do.

    Refuses (DeleteRefused, nothing deleted) when an affected file is held, not yet indexed
    and linked (the recorder's indexer has it), or when the file a running recorder is writing
    may hold packets of the window (`recording`: a recorder holds the dump set's lock).
    """
    filt = compile_filter(expr, int(ds.meta.get("linktype", 1)),
                          int(ds.meta.get("snaplen", 262144))) if expr else None
    plan = DeletePlan(ds, begin_ns, end_ns, expr)
    writing = recording_from(ds, recording)
    if writing is not None and writing < end_ns:
        raise DeleteRefused(
            f"the file a recorder is writing holds packets from {format_time(writing)}, "
            "inside the window; close it first (kill -USR1 the recorder, or systemctl reload "
            "recorder@IFACE) and run again once it is indexed")
    for sf in files_overlapping(ds, begin_ns, end_ns):
        slot_link = timeline.slot_dir(ds.timeline, sf.slot) / sf.name
        if not (sf.index.exists() and slot_link.is_symlink()):
            raise DeleteRefused(
                f"{sf.pcap} is not indexed and linked yet (the recorder's indexer has it, or "
                "the dump set needs npcaprepair); run again in a moment")
        cut = _plan_file(sf, begin_ns, end_ns, filt)
        if cut is not None:
            plan.cuts.append(cut)
    holds = load_holds(ds)
    held = [_rel(ds, c.sf) for c in plan.cuts if holds.holds(c.sf)]
    if held:
        raise DeleteRefused(
            f"{len(held)} file(s) of the window are under a legal hold ({', '.join(held)}); "
            "nothing was deleted: see npcapmanage holds, and release the hold first if the "
            "deletion is meant")
    return plan


MANAGE_LOCK = ".manage.lock"  # in the dump set's root: one import or deletion at a time
_held: list[int] = []  # the locks this process holds until it ends


def writer_lock(ds: DumpSet) -> bool:
    """Take the dump set's lock for the life of the process, as npcaprepair does (no recorder
    start or repair meanwhile), unless a recorder holds it: then work beside it, on closed,
    linked files only. Returns whether a recorder is writing.

    Imports and deletions first take a lock of their own (MANAGE_LOCK): beside a recorder,
    or beside each other (the second would see the first's lock as a recorder's), two of
    them would each check the dump set, then both change it."""
    try:
        fd = os.open(ds.root / MANAGE_LOCK,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise PcapVaultError(f"cannot lock {ds.root / MANAGE_LOCK}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PcapVaultError(f"another npcapimport or npcapmanage delete is changing {ds.root}; "
                             "run this when it has ended") from None
    _held.append(fd)
    if live(ds):
        return True
    _held.append(lock(ds))
    return False


def recording_from(ds: DumpSet, recording: bool) -> int | None:
    """From when a live recorder writes: the first packet time of the file it is writing (the
    file's time when it has no complete packet yet; now between files), or None when no
    recorder is `recording`."""
    if not recording:
        return None
    first = None
    for p in ds.temp_files():
        try:
            with open(p, "rb") as f:
                head = f.read(40)
            hdr = parse_global_header(head[:24], str(p))
            t = scan_records(np.frombuffer(head, np.uint8), hdr).ts_ns
            ns = int(t[0]) if len(t) else p.stat().st_mtime_ns
        except (OSError, FormatError):
            continue
        first = ns if first is None else min(first, ns)
    return time.time_ns() if first is None else first


def _plan_file(sf: StoredFile, begin_ns: int, end_ns: int, filt) -> Cut | None:
    try:
        idx = read_index(sf.index, packets=False)
    except FormatError as e:
        raise DeleteRefused(f"{e}; run npcaprepair on the dump set first") from None
    if not idx.count or idx.last_ns < begin_ns or idx.first_ns >= end_ns:
        return None
    if filt is None and begin_ns <= idx.first_ns and idx.last_ns < end_ns:
        return Cut(sf, None, idx.count, idx.pcap_size - GLOBAL_HEADER_LEN, idx.pcap_size)
    r, arr, t = _records(sf, idx)
    try:
        sel = (t.ts_ns >= begin_ns) & (t.ts_ns < end_ns)
        if filt is not None and sel.any():
            at = np.flatnonzero(sel)
            off = t.offset[at].astype(np.int64) + RECORD_HEADER_LEN
            sel[at] = filt.match_many(arr, off, t.caplen[at], t.wirelen[at])
        n = int(sel.sum())
        if not n:
            return None
        removed = int(record_sizes(t.caplen[sel]).sum())
        return Cut(sf, None if n == len(sel) else ~sel, n, removed, r.size)
    finally:
        del arr
        r.close()


def _held_now(ds: DumpSet, sf: StoredFile) -> bool:
    """Asked under the links lock: a hold placed since the plan was made wins."""
    return load_holds(ds).holds(sf)


def write_synced(path: Path, data: np.ndarray, mode: int) -> None:
    """Write a whole new file with exact permissions, on disk before it is renamed into
    place (the caller renames it when and under which lock it needs)."""
    fd = create_new(path, mode)  # a temporary name: never through a planted link
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _renamed(sf: StoredFile, first_ns: int) -> StoredFile:
    """`sf` as it is named once its first packet is at `first_ns`: unchanged while its name is
    not earlier than that packet's microsecond, else that microsecond (or the next free one)."""
    if sf.first_ns >= first_ns // 1000 * 1000:
        return sf
    suffix = sf.name[sf.name.index(".pcap"):]
    ns = first_ns // 1000 * 1000
    while True:
        new = StoredFile(ns, sf.pcap.with_name(file_name(ns) + suffix))
        if not new.pcap.exists():
            return new
        ns += 1000


def fix_names(ds: DumpSet, begin_ns: int, end_ns: int,
              report: Callable[[str], None] = lambda line: None) -> None:
    """Give a file of the window named earlier than its first packet (a deletion stopped
    between replacing its pcap and renaming it) its first packet's name, with its index and
    links, so that npcaprepair's checks hold again."""
    for sf in files_overlapping(ds, begin_ns, end_ns):
        try:
            first = read_index(sf.index, packets=False).first_ns
        except FormatError:
            continue  # the plan refuses it with the repair hint
        final = _renamed(sf, first)
        if final == sf:
            continue
        with ds.links_locked():
            timeline.unlink(ds.timeline, sf.slot, sf.name)
            os.rename(sf.pcap, final.pcap)
            os.rename(sf.index, final.index)
            ds.link(final)
        report(f"renamed {_rel(ds, sf)} to {final.name}, its first packet's name (a deletion "
               "had stopped halfway)")


def _rewrite(ds: DumpSet, cut: Cut, replaced: Callable[[], None]) -> StoredFile | None:
    """Rewrite one file without the packets `cut.keep` leaves out: the file as now stored, or
    None when it changed or went since the plan (the budget deleted it) and was left alone.

    `replaced` is called as soon as the new pcap is in place: from then on the packets are
    gone, whatever fails after (the audit must count them)."""
    sf = cut.sf
    try:
        st = sf.pcap.stat()
        r = PcapReader(sf.pcap)
    except (FileNotFoundError, FormatError):
        return None
    try:
        if r.size != cut.size:
            return None
        arr = r.array()
        t = scan_records(arr, r.header)
        keep = cut.keep
        h = r.header
        head = global_header(h.linktype, h.snaplen, h.nanosecond)
        new = build_pcap(head, arr, t.offset[keep].astype(np.int64) + RECORD_HEADER_LEN,
                         t.caplen[keep], t.wirelen[keep], t.ts_ns[keep], h.nanosecond)
        del arr
    finally:
        r.close()
    idx, _ = index_pcap(new, parse_global_header(head, str(sf.pcap)))
    mode = st.st_mode & 0o777
    tmp, itmp = temp_path(sf.pcap), temp_path(sf.index)
    try:
        if compressed.is_compressed(sf.pcap):
            compressed.compress_file(tmp, tmp, file_mode=mode, data=memoryview(new))
        else:
            write_synced(tmp, new, mode)
        try:
            write_synced(itmp, np.frombuffer(encode_index(idx), np.uint8),
                         sf.index.stat().st_mode & 0o777)
        except BaseException:
            tmp.unlink(missing_ok=True)  # not left taking room on a full disk
            raise
    except OSError as e:
        raise PcapVaultError(f"cannot write the rewritten {_rel(ds, sf)} ({e.strerror or e}); "
                             "it and the files after it are as they were") from None
    with ds.links_locked():
        try:
            now = sf.pcap.stat()
            gone = (now.st_ino, now.st_size) != (st.st_ino, st.st_size)
        except FileNotFoundError:
            gone = True
        if gone or _held_now(ds, sf):
            tmp.unlink(missing_ok=True)
            itmp.unlink(missing_ok=True)
            if gone:
                return None
            raise DeleteRefused(f"{_rel(ds, sf)} was put under a legal hold meanwhile; it and "
                                "the files after it were left as they were")
        # Readers stop finding the file; the new pcap replaces the old one (npcaprepair
        # rebuilds an index that describes a larger pcap); when its first packets went, it
        # takes the name of its new first packet (a name must not be earlier, see
        # docs/FORMAT.md); its index follows; readers find it again.
        timeline.unlink(ds.timeline, sf.slot, sf.name)
        os.replace(tmp, sf.pcap)
        replaced()
        final = _renamed(sf, idx.first_ns)
        if final != sf:
            os.rename(sf.pcap, final.pcap)
        os.replace(itmp, final.index)
        if final != sf:
            sf.index.unlink(missing_ok=True)
        ds.link(final)
    return final


@dataclass
class Done:
    """What a run did remove so far (the audit records it even when it stops halfway)."""

    packets: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)

    def add(self, cut: Cut, rel: str) -> None:
        self.packets += cut.packets
        self.bytes += cut.bytes
        self.files.append(rel)


def execute(plan: DeletePlan, done: Done,
            report: Callable[[str], None] = lambda line: None,
            stop: Callable[[], str] = lambda: "") -> None:
    """Carry out `plan`, counting into `done` what was removed the moment it is gone (before
    it is reported: a report to a terminal that hung up fails). `stop` says, between files,
    why to stop ("" to go on): raises Stopped."""
    ds = plan.ds
    for i, cut in enumerate(plan.cuts):
        if why := stop():
            raise Stopped(f"stopped by {why} after {i} of {len(plan.cuts)} files; the others "
                          "are as they were: run the same command again to delete the rest")
        rel = _rel(ds, cut.sf)
        if cut.keep is None:
            freed = ds.delete(cut.sf, keep=lambda sf: _held_now(ds, sf))
            if freed is None:
                raise DeleteRefused(f"{rel} was put under a legal hold meanwhile; it and the "
                                    "files after it were left as they were")
            done.add(cut, rel)
            report(f"deleted {rel} ({cut.packets} packets)")
        else:
            final = _rewrite(ds, cut, lambda cut=cut, rel=rel: done.add(cut, rel))
            if final is None:
                report(f"skipped {rel}: deleted or changed meanwhile (the disk budget)")
                continue
            now = "" if final == cut.sf else f", now {final.name} (its new first packet)"
            report(f"rewrote {rel} without {cut.packets} packets{now}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_between_files() -> Iterator[Callable[[], str]]:
    """While files are changed, Ctrl-C, kill and a hung-up terminal only ask to stop: the
    file at hand is finished and the audit written (their default action would end the
    process with neither). Yields what `execute` takes as `stop`. A signal ignored when the
    command started (nohup) stays ignored."""
    got: list[str] = []

    def note(signum: int, frame: object) -> None:
        got.append(signal.Signals(signum).name)

    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for s, h in old.items():
            if h is not signal.SIG_IGN:
                signal.signal(s, note)
        yield lambda: got[0] if got else ""
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def caller() -> dict:
    """Who runs the command: the login name (the one who sudo'ed, not root), the real uid."""
    try:
        login = os.getlogin()
    except OSError:
        login = pwd.getpwuid(os.getuid()).pw_name
    who = {"user": login, "uid": os.getuid()}
    if os.environ.get("SUDO_USER"):
        who["sudo_user"] = os.environ["SUDO_USER"]
    return who


def append_audit(ds: DumpSet, record: dict) -> None:
    """One JSON line, `record` with the time first, in DS/audit.log and in syslog (authpriv).

    The file first, as the record of reference; it is refused unless it is a regular file
    only its owner may write (an attacker's symlink or a shared file is no audit trail).
    """
    line = json.dumps({"time": format_time(time.time_ns()), **record}, separators=(",", ":"))
    path = ds.root / AUDIT_FILE
    problem = ""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o640)
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o022:
                os.write(fd, (line + "\n").encode())
            else:
                problem = "it must be a regular file writable by its owner only"
        finally:
            os.close(fd)
    except OSError as e:
        problem = e.strerror or str(e)
    syslog.openlog(SYSLOG_IDENT, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_NOTICE, line)
    if problem:
        raise PcapVaultError(f"cannot append to the audit log {path} ({problem}); the "
                             f"{record['event']} is recorded in syslog only: {line}")


def audit(ds: DumpSet, who: dict, plan: DeletePlan, done: Done, outcome: str) -> None:
    """The audit line of a run that deleted (docs/FORMAT.md, "Audit log")."""
    append_audit(ds, {"event": "delete", "outcome": outcome, **who, "dumpset": str(ds.root),
                      "begin": format_time(plan.begin_ns), "end": format_time(plan.end_ns),
                      "filter": plan.expr, "packets": done.packets, "bytes": done.bytes,
                      "files": done.files})


EPILOG = """\b
Examples:
  npcapmanage delete -t /var/lib/pcapvault/eth0 -b "2025-11-21 14:00" -e "2025-11-21 14:05"
  npcapmanage delete -t /var/lib/pcapvault/eth0 -b -2h -e -1h -f "host 10.0.0.5" --yes

Files wholly inside the window are deleted; files the window cuts (every file of the
window, with -f) are rewritten without the selected packets and reindexed, atomically.
Nothing is deleted when a file of the window is under a legal hold (npcapmanage holds).
It shows what it will do and asks first (--yes: without asking; needed without a
terminal). A running recorder goes on recording: the file it writes must not reach into
the window (close it with SIGUSR1 first). Each run that deletes appends two JSON lines (who,
when, window, filter, packets and bytes) to DUMPSET/audit.log and to syslog: what it is
about to delete, before the first file goes, and what it removed, at its end.
Run it as the dump set's owner, or as root (it becomes the owner).
"""


@click.command("delete", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-t", "--dumpset", "dumpset", required=True, type=click.Path(path_type=Path),
              help="The dump set (the recorder's -o) or its timeline.")
@click.option("-b", "--begin", required=True, help="Start of the window (inclusive).")
@click.option("-e", "--end", required=True, help="End of the window (exclusive).")
@click.option("-f", "--filter", "expr", default="", help="Delete only what this tcpdump filter "
              "selects in the window.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(dumpset: Path, begin: str, end: str, expr: str, yes: bool) -> int:
    """Delete the packets of a time window (matching -f) from a dump set, for good."""
    try:
        begin_ns, end_ns = parse_window(begin, end)
    except TimeError as e:
        raise click.UsageError(str(e)) from None
    if not yes and not sys.stdin.isatty():
        raise click.UsageError("not asking for confirmation without a terminal; add --yes to "
                               "delete without asking")
    who = caller()
    ds = DumpSet.open(dumpset)
    owner = ds.root.stat().st_uid
    if os.geteuid() not in (0, owner):
        raise PcapVaultError(f"{ds.root} belongs to uid {owner}; run as its owner or as root")
    become_owner(ds)
    recording = writer_lock(ds)
    fix_names(ds, begin_ns, end_ns, report=click.echo)
    try:
        plan = plan_delete(ds, begin_ns, end_ns, expr, recording)
    except FilterError as e:
        raise click.UsageError(str(e)) from None
    window = f"{format_time(begin_ns)} .. {format_time(end_ns)}" + (
        f" matching {expr!r}" if expr else "")
    if not plan.cuts:
        click.echo(f"nothing to delete in {ds.root}: no packet in {window}")
        return 0
    whole = sum(c.keep is None for c in plan.cuts)
    click.echo(f"{ds.root}: {plan.packets} packets ({plan.bytes} bytes) in {window}: "
               f"{whole} file(s) deleted whole, {len(plan.cuts) - whole} rewritten")
    if not yes and not click.confirm("delete them for good?", err=True):
        click.echo("nothing deleted")
        return 1
    # Before the first file goes: a run killed outright (kill -9, a crash, the power) still
    # leaves a record that it began and what it meant to delete; and a log that cannot be
    # written stops the run while nothing has gone.
    begun = Done()
    for c in plan.cuts:
        begun.add(c, _rel(ds, c.sf))
    audit(ds, who, plan, begun, "begun")
    done = Done()
    outcome = "stopped"
    try:
        with stop_between_files() as stop:
            execute(plan, done, report=click.echo, stop=stop)
        outcome = "deleted"
    finally:
        # Audited even when stopped halfway: the record says what did go.
        if done.files or outcome == "deleted":
            audit(ds, who, plan, done, outcome)
    click.echo(f"deleted {done.packets} packets ({done.bytes} bytes) from {len(done.files)} "
               f"file(s); recorded in {ds.root / AUDIT_FILE}")
    return 0

