"""Bring a dump set back to a consistent state after a crash, power loss or manual meddling.

Shared by `npcaprepair` and by the recorder's start, so that a crash never needs a human. The
rules: never delete a byte of a complete packet; every change is reported; a second run finds
nothing to do. Files are checked cheaply first (an index whose checksum holds and whose
recorded pcap size matches the file) and read in full only when that check fails.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import compressed, timeline
from .builder import build_index
from .dumpset import DumpSet, StoredFile
from .errors import FormatError, PcapVaultError
from .indexfile import PacketIndex, index_problem, read_index, read_postings, write_index
from .pcapfile import (
    GLOBAL_HEADER_LEN,
    RECORD_HEADER_LEN,
    PcapReader,
    headers_disagree,
    parse_global_header,
    scan_records,
)
from .pcaplayout import global_header, is_own_header, record_header
from .postings import FIRST_POSTINGS_VERSION, HEADER_LEN, VERSION, parse_header


@dataclass(frozen=True)
class Action:
    """One change made (or, in a dry run, that would be made)."""

    what: str
    path: Path
    why: str = ""

    def __str__(self) -> str:
        return f"{self.what} {self.path}" + (f" ({self.why})" if self.why else "")


def lock(ds: DumpSet) -> int:
    """Exclusive lock for the life of the process: one writer (recorder or repair) at a time."""
    fd = os.open(ds.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PcapVaultError(
            f"a recorder (or another repair) is writing to {ds.root}; stop it first "
            "(the recorder repairs its dump set by itself when it starts)"
        ) from None
    return fd


def live(ds: DumpSet) -> bool:
    """Whether a recorder (or a repair) holds the dump set's lock, read from /proc/locks so
    that asking never takes the lock (a recorder starting meanwhile would fail)."""
    try:
        st = os.stat(ds.root / ".lock")
    except FileNotFoundError:
        return False
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            return any(line.split()[5:6] == [want] for line in f if " FLOCK " in line)
    except OSError:
        return False


class Repair:
    """Finds and fixes inconsistencies; `dry_run` only reports them."""

    def __init__(self, ds: DumpSet, *, dry_run: bool = False, deep: bool = False,
                 report: Callable[[Action], None] = lambda a: None, live: bool = False,
                 upgrade: bool = False):
        """`deep` also reads every pcap to check it against its index and decompresses every
        compressed file to verify its frame checksums. `live` (a dry run while a recorder
        holds the lock): the files it is writing, compressing or linking are its own, not
        leftovers, and are left out. `upgrade` rebuilds sound indexes of an older format
        version too (they are read as they are, without the newer parts)."""
        self.ds = ds
        self.deep = deep
        self.upgrade = upgrade
        self.live = live and dry_run
        self.dry_run = dry_run
        self.report = report
        self.actions: list[Action] = []

    def _do(self, what: str, path: Path, why: str, fn: Callable[[], object]) -> None:
        action = Action(what, path, why)
        self.actions.append(action)
        self.report(action)
        if not self.dry_run:
            fn()

    def run(self) -> list[Action]:
        if not self.live:
            self.finish_temp_files()
            self.remove_partial_files()
            self.remove_orphan_indexes()
        for sf in self.ds.files():
            self.check_file(sf)
        self.remove_dangling_links()
        self.remove_empty_dirs()
        return self.actions

    # --- steps ------------------------------------------------------------------------------

    def finish_temp_files(self) -> None:
        """A file the recorder was writing: keep its complete records under a final name."""
        for temp in self.ds.temp_files():
            table = _scan(temp)
            if table is None or len(table.ts_ns) == 0:
                self._do("remove", temp, "unfinished file without a complete packet",
                         temp.unlink)
                continue
            if table.torn:
                self._do("truncate", temp, f"torn last record, keeping {table.complete_end} "
                         "bytes of complete packets", lambda t=temp, n=table.complete_end:
                         _truncate(t, n))
            first = int(table.ts_ns[0])
            self._do("finalise", temp, "left under its temporary name",
                     lambda t=temp, f=first: self.ds.place(t, f))

    def remove_partial_files(self) -> None:
        """Leftover temporary indexes, links and markers (`.NAME.part`) are never complete."""
        dirs = [*self.ds.storage_dirs(), self.ds.root]
        for d in dirs:
            for p in d.glob(".*.part"):
                if p.name.startswith(".rec-"):
                    continue  # pcaps being written: finish_temp_files
                self._do("remove", p, "incomplete temporary file", p.unlink)
        for dirpath, _dirs, files in os.walk(self.ds.timeline):
            for n in files:
                if n.startswith(".") and n.endswith(".part"):
                    p = Path(dirpath) / n
                    self._do("remove", p, "incomplete temporary link", p.unlink)

    def remove_orphan_indexes(self) -> None:
        """An index whose pcap is gone (a stop between a deletion's unlinks) describes
        nothing, and its space would count against the budget for good."""
        for d in self.ds.storage_dirs():
            try:
                names = set(os.listdir(d))
            except FileNotFoundError:
                continue
            for n in sorted(names):
                if n.endswith(".idx") and not n.startswith(".") and n[:-4] not in names:
                    p = d / n
                    self._do("remove", p, "index of a pcap that is gone", p.unlink)

    def check_file(self, sf: StoredFile) -> None:
        if compressed.is_compressed(sf.pcap):
            plain = sf.pcap.with_name(sf.pcap.name.removesuffix(compressed.SUFFIX))
            if plain.exists():
                if self.live:
                    return  # the recorder is compressing it
                # Compression was interrupted before the plain file went: that one is whole.
                self._do("remove", sf.pcap, f"duplicate of {plain.name}, whose compression was "
                         "interrupted", lambda: self.ds.delete(sf))
                return
        if not compressed.is_compressed(sf.pcap):
            fix = _damaged_header(self.ds, sf, self.deep)
            if fix is not None:
                self._do("restore pcap header", sf.pcap, fix[0],
                         lambda: _write_header(sf.pcap, fix[1]))
                if self.dry_run:
                    return  # what follows would read the header not yet restored
        wrong = None
        try:
            with PcapReader(sf.pcap) as r:
                size = r.size
            why = _index_problem(sf, size)
            if why == "missing" and self.live:
                why = "missing; the recorder may not have indexed it yet"
            if not why and self.deep and compressed.is_compressed(sf.pcap):
                with compressed.CompressedReader(sf.pcap) as z:
                    z.copy_to(_Discard())
            if not why and self.deep:
                why, wrong = _records_disagree(sf)
            if not why and self.upgrade:
                why = _older_version(sf.index)
        except FormatError as e:
            why = f"pcap unreadable: {str(e).removeprefix(str(sf.pcap) + ': ')}"
        if why:
            table = _scan(sf.pcap)
            if wrong is not None and table is not None and table.torn and not (
                    compressed.is_compressed(sf.pcap) or _big_endian(sf.pcap)):
                # The record walk breaks on a damaged header that the index, which covers
                # the file record for record, still describes: restore the header rather
                # than cut the file there (every packet after it is whole).
                self._do("restore record headers", sf.pcap, f"{why}; from the index, which "
                         "covers every record", lambda: _restore_headers(sf.pcap, *wrong))
                why = ""
        if why:
            if compressed.is_compressed(sf.pcap) and (table is None or table.torn):
                table = self.salvage_compressed(sf)
            if table is None or len(table.ts_ns) == 0:
                self._do("remove", sf.pcap, "not a pcap with any complete packet",
                         lambda: self.ds.delete(sf))
                return
            if table.torn and not compressed.is_compressed(sf.pcap):
                self._do("truncate", sf.pcap, f"torn last record, keeping "
                         f"{table.complete_end} bytes of complete packets",
                         lambda: _truncate(sf.pcap, table.complete_end))
            self._do("rebuild index", sf.index, why,
                     lambda: write_index(sf.index, build_index(sf.pcap)))
        slot_dir = timeline.slot_dir(self.ds.timeline, sf.slot)
        for target in (sf.pcap, sf.index):
            link = slot_dir / target.name
            want = os.path.relpath(target, slot_dir)
            try:
                have = os.readlink(link)
            except OSError:
                have = None
            if have != want and (target.exists() or self.dry_run):
                self._do("link", link, "missing timeline link" if have is None
                         else "timeline link points elsewhere",
                         lambda t=target: timeline.link(self.ds.timeline, sf.slot, t))

    def salvage_compressed(self, sf: StoredFile):
        """A damaged or truncated .pcap.zst: keep the complete packets of its intact frames."""
        data = compressed.salvage(sf.pcap)
        try:
            hdr = parse_global_header(data[:GLOBAL_HEADER_LEN], str(sf.pcap))
        except FormatError:
            return None
        table = scan_records(np.frombuffer(data, np.uint8), hdr)
        if len(table.ts_ns) == 0:
            return None

        def rewrite() -> None:
            # From memory: no plain temporary file beside it (atomic_write makes the one).
            compressed.compress_file(sf.pcap, sf.pcap,
                                     data=memoryview(data)[: table.complete_end])

        self._do("recompress", sf.pcap, f"damaged or truncated zstd data, keeping "
                 f"{table.complete_end} bytes of complete packets", rewrite)
        return table

    def remove_dangling_links(self) -> None:
        for dirpath, _dirs, files in os.walk(self.ds.timeline):
            for n in files:
                p = Path(dirpath) / n
                if p.is_symlink() and not p.exists():
                    self._do("remove", p, "timeline link to a file that is gone", p.unlink)

    def remove_empty_dirs(self) -> None:
        for dirpath, _dirs, _files in os.walk(self.ds.timeline, topdown=False):
            d = Path(dirpath)
            if d != self.ds.timeline and not os.listdir(d):
                self._do("remove", d, "empty slot directory", d.rmdir)
        for d in self.ds.storage_dirs():
            if not os.listdir(d):
                self._do("remove", d, "empty storage directory", d.rmdir)


class _Discard:
    """A sink for verifying data by reading it."""

    def write(self, data: bytes) -> int:
        return len(data)


def _scan(path: Path):
    """The pcap's record table, or None when it is not a pcap at all."""
    try:
        with PcapReader(path) as r:
            return r.scan()
    except FormatError:
        return None


def _index_problem(sf: StoredFile, size: int) -> str:
    """Why the index cannot be trusted for this pcap, or '' when it can."""
    if not sf.index.exists():
        return "missing"
    try:
        idx = read_index(sf.index, packets=False)
        if idx.version >= FIRST_POSTINGS_VERSION:
            read_postings(sf.index)  # frames: their own checksums, not the header's CRC
    except FormatError as e:
        return f"damaged: {str(e).removeprefix(str(sf.index) + ': ')}"
    if idx.pcap_size != size:
        return f"describes {idx.pcap_size} bytes of a {size}-byte pcap"
    if idx.count and not sf.named_for(idx.first_ns, idx.last_ns):
        return (f"another file's: its packets span {idx.first_ns}..{idx.last_ns} ns, this file "
                f"starts at {sf.first_ns} ns")
    return ""


def _older_version(index: Path) -> str:
    """Why an index of an older format version is rewritten on --upgrade, or ''."""
    with open(index, "rb") as f:
        version = parse_header(f.read(HEADER_LEN), str(index)).version
    if version >= VERSION:
        return ""
    return f"index format version {version}; upgraded to version {VERSION}"


def _records_disagree(sf: StoredFile) -> tuple[str, tuple | None]:
    """Whether the index describes this pcap record for record: every entry's header as
    the index says, the entries following each other from the first record to the end.

    The quick checks (checksum, size, span) miss a flipped bit in a record header or an
    index that belongs to another file of the same size: extraction would copy such a header
    with the index's length. Returns (why, None) when the index does not cover the file,
    (why, (idx, disagreeing entries, nanosecond)) when it covers it but some headers differ,
    ("", None) when all agree. Reads the whole pcap."""
    try:
        idx = read_index(sf.index)
    except FormatError as e:
        return f"damaged: {str(e).removeprefix(str(sf.index) + ': ')}", None
    problem = index_problem(idx)
    if problem:
        return f"inconsistent: {problem}", None
    if not idx.count:
        return "", None
    off = idx.offset.astype(np.int64)
    ends = off + RECORD_HEADER_LEN + idx.caplen.astype(np.int64)
    if off[0] != GLOBAL_HEADER_LEN or (off[1:] != ends[:-1]).any() or ends[-1] != idx.pcap_size:
        return "its entries do not follow the pcap's records from first to last", None
    with PcapReader(sf.pcap) as r:
        bad = np.flatnonzero(headers_disagree(r.array(), off, idx.caplen, idx.wirelen,
                                              idx.ts_ns, r.header))
    if not len(bad):
        return "", None
    return (f"{len(bad)} record header(s) disagree with the index, first at byte "
            f"{int(off[bad[0]])}"), (idx, bad, r.header.nanosecond)


def _big_endian(path: Path) -> bool:
    """Whether a pcap stores big-endian headers (restoring writes little-endian ones)."""
    try:
        with PcapReader(path) as r:
            return r.header.big_endian
    except FormatError:
        return True


def _open_pcap(path: Path) -> int:
    """An fd to change a pcap the dump set lists through: never a link's target, and only a
    regular file (the name may have been swapped since it was listed)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PcapVaultError(f"{path} is not a regular file; remove it from the dump set")
    return fd


def _truncate(path: Path, size: int) -> None:
    fd = _open_pcap(path)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _damaged_header(ds: DumpSet, sf: StoredFile, deep: bool) -> tuple[str, bytes] | None:
    """(why, the header to write) when a plain pcap's global header is not one the dump set
    writes (magic, version, link type, and with `deep` a snapshot length below its longest
    record) while its index shows the records are the dump set's own: the first record where
    the index says, as it says. None otherwise (a healthy header, or no index to go by: the
    checks after this one decide). Before, a damaged magic made the file unreadable and it
    was removed as "not a pcap", with every packet in it; tcpdump and extraction refused or
    misread the others."""
    try:
        fd = os.open(sf.pcap, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            head = os.pread(fd, GLOBAL_HEADER_LEN + RECORD_HEADER_LEN, 0)
        finally:
            os.close(fd)
    except OSError:
        return None
    linktype, ns = int(ds.meta.get("linktype", 1)), ds.nanosecond
    # Records are never longer than the dump set's snapshot length: only a header below it
    # needs the index (read here once more in the deep check) to know the longest record.
    longest = int(ds.meta.get("snaplen", 0)) if deep else 0
    if is_own_header(head, linktype, ns, longest):
        return None
    try:
        idx = read_index(sf.index)
    except (OSError, FormatError):
        return None
    if not idx.count or index_problem(idx) or int(idx.offset[0]) != GLOBAL_HEADER_LEN:
        return None
    longest = int(idx.caplen.max())
    if is_own_header(head, linktype, ns, longest):
        return None
    first = record_header(int(idx.ts_ns[0]), int(idx.caplen[0]), int(idx.wirelen[0]), ns)
    if head[GLOBAL_HEADER_LEN:] != first:
        return None  # the records are not the index's either: not only the header is wrong
    snaplen = max(int(ds.meta.get("snaplen", 0)), longest)
    return ("its pcap header is not the dump set's (magic, version, link type, or a snapshot "
            "length below its records'); the index shows its records are"), global_header(
        linktype, snaplen, ns)


def _write_header(path: Path, header: bytes) -> None:
    fd = _open_pcap(path)
    try:
        os.pwrite(fd, header, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_headers(path: Path, idx: PacketIndex, bad: np.ndarray, nanosecond: bool) -> None:
    """Write the index's header into each disagreeing record of the pcap."""
    fd = _open_pcap(path)
    try:
        for i in bad.tolist():
            os.pwrite(fd, record_header(int(idx.ts_ns[i]), int(idx.caplen[i]),
                                        int(idx.wirelen[i]), nanosecond), int(idx.offset[i]))
        os.fsync(fd)
    finally:
        os.close(fd)


def repair(ds: DumpSet, *, dry_run: bool = False, deep: bool = False,
           report: Callable[[Action], None] = lambda a: None, live: bool = False,
           upgrade: bool = False) -> list[Action]:
    return Repair(ds, dry_run=dry_run, deep=deep, report=report, live=live,
                  upgrade=upgrade).run()
