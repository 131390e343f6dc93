"""`npcapimport -t DS FILE|DIR...`: adopt existing captures into a dump set.

Teams arrive with years of tcpdump or n2disk captures. The captures (index/captures.py: pcap
in any variant, pcapng with one interface, gzip or zstd), taken in time order, are cut into
files as the recorder cuts its own (at a file size, the recorder's -p, and at every 10-minute
slot boundary), in the dump set's precision, so that many small captures share files, and
placed in storage directories of `files_per_dir` files (DumpSet.placements), indexed and
linked, so extraction, the budget, holds and `--max-age` treat them like recorded files.

A window's files are found by their start times alone (docs/FORMAT.md), which holds only while
files do not overlap in time. So captures of one run that overlap each other are merged in
time order (as mergecap does; a tie keeps the order the captures were given in), and a capture
that overlaps a file already in the dump set (recorded or imported before), or the file a
running recorder is writing, is refused, naming the file; a refusal imports nothing of the
run: no packet is lost or doubled silently. Packets out of time order inside a capture that
overlaps no other stay in file order; such a capture is cut on its own, only where every packet
before the cut is earlier than every packet after it (within the second of slack readers
allow), and each file is named by its earliest packet.

Every imported capture is recorded by the SHA-256 of its decompressed content in
DS/imports.json, first as pending with the names of the files its group becomes, then as
complete: importing it again does nothing, and a run stopped halfway is undone by the next
run, which then imports the group again. A group (up to GROUP_BYTES or GROUP_CAPTURES) is the
unit of durability: its files are written, then synced together, renamed into place, their
directories synced once, linked, and only then recorded as complete.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from pcapvault.index import timeline
from pcapvault.index.atomicfile import create_new, read_small_file
from pcapvault.index.builder import index_records
from pcapvault.index.captures import Capture, open_capture
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.errors import FormatError, PcapVaultError
from pcapvault.index.holds import files_overlapping, last_packet_ns
from pcapvault.index.indexfile import encode_index
from pcapvault.index.pcapfile import RecordTable, parse_global_header
from pcapvault.index.pcaplayout import (
    GLOBAL_HEADER_LEN,
    MAX_CAPLEN,
    RECORD_HEADER_LEN,
    global_header,
)
from pcapvault.index.recordcopy import put_records, record_sizes
from pcapvault.index.sizes import parse_size
from pcapvault.index.times import format_time
from pcapvault.recorder.cli import _mode

from .npcaprepair import become_owner
from .rangedelete import recording_from, writer_lock

IMPORTS_FILE = "imports.json"
FORMAT = "pcapvault-imports"
VERSION = 1
DEFAULT_FILE_BYTES = 256 << 20
NS = 1_000_000_000
# Readers allow this much of a file's packets past the next file's first one (docs/FORMAT.md).
SLACK_NS = NS
SLOT_NS = timeline.SLOT_SECONDS * NS
CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap", ".dmp")
# A pcap record's seconds are an unsigned 32-bit number.
PCAP_TIME_END = (1 << 32) * NS


class ImportRefused(PcapVaultError):
    """A capture that cannot be adopted as it is (link type, overlap, disorder)."""


# --- the registry of imported captures ------------------------------------------------------


def _registry_path(ds: DumpSet) -> Path:
    return ds.root / IMPORTS_FILE


def load_registry(ds: DumpSet) -> dict:
    """digest -> entry of every capture imported (or being imported) into the dump set."""
    path = _registry_path(ds)
    try:
        doc = json.loads(read_small_file(path))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as e:
        doc = {"error": str(e) or type(e).__name__}
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get(
            "version") != VERSION or not isinstance(doc.get("imports"), dict) or not all(
            _valid_entry(e) for e in doc["imports"].values()):
        raise ImportRefused(
            f"{path} is damaged or of another version ({str(doc)[:60]}); restore it from a "
            "backup, or remove it (captures imported before would then be imported again, "
            "and refused where they overlap what they became)")
    return doc["imports"]


# An entry's fields and their types (docs/FORMAT.md, "Imports"): every reader of the
# registry relies on them, so a damaged entry refuses the whole file.
_ENTRY = {"source": str, "imported": str, "packets": int, "files": list, "complete": bool}


def _valid_entry(e: object) -> bool:
    return (isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in _ENTRY.items())
            and all(isinstance(n, str) for n in e["files"]))


def _store_registry(ds: DumpSet, reg: dict) -> None:
    timeline.write_json_atomic(_registry_path(ds), {"format": FORMAT, "version": VERSION,
                                                    "imports": reg})


# --- cutting a capture into files -----------------------------------------------------------


def cut_points(ts: np.ndarray, sizes: np.ndarray, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) packet ranges of the files a capture becomes, in file order.

    Cut where the recorder would (size, slot boundary), but only where every packet before the
    cut is earlier than every packet after it plus the readers' slack; out-of-order packets
    may so make a file somewhat larger than `max_bytes` or reach past its slot.
    """
    n = len(ts)
    before_max = np.maximum.accumulate(ts)
    after_min = np.minimum.accumulate(ts[::-1])[::-1]
    allowed = np.flatnonzero(before_max[:-1] < after_min[1:] + SLACK_NS) + 1
    ends = np.cumsum(sizes)
    out = []
    start = 0
    while start < n:
        by_size = int(np.searchsorted(ends, ends[start] - sizes[start] + max_bytes, "right"))
        by_size = min(max(by_size, start + 1), n)
        slot_end = (int(ts[start]) // SLOT_NS + 1) * SLOT_NS
        late = np.flatnonzero(ts[start + 1 : by_size] >= slot_end)
        want = start + 1 + int(late[0]) if len(late) else by_size
        k = int(np.searchsorted(allowed, want))
        stop = int(allowed[k]) if want < n and k < len(allowed) else n
        out.append((start, stop))
        start = stop
    return out


def _unfindable(name: str, ts: np.ndarray, parts: list[tuple[int, int]]) -> str:
    """Why a capture is so out of order that a file would reach beyond the one slot of
    look-back readers allow (its late packets could not be found by time), or ''."""
    for s, e in parts:
        lo, hi = int(ts[s:e].min()), int(ts[s:e].max())
        if (hi - SLACK_NS) // SLOT_NS > lo // SLOT_NS + 1:
            return (f"{name}: packets go back and forth in time over more than 10 minutes "
                    f"({format_time(lo)} to {format_time(hi)}); nothing was imported: sort it "
                    "first (reordercap IN OUT) and import the sorted capture")
    return ""


# --- overlaps ---------------------------------------------------------------------------------


def _overlap(ds: DumpSet, names: str, lo: int, hi: int, recording: bool) -> None:
    """Refuse captures spanning [lo, hi] that overlap a file of the dump set in time (or the
    file a recorder writes, when `recording`)."""
    writing = recording_from(ds, recording)
    if writing is not None and hi >= writing:
        raise ImportRefused(
            f"{names} reach {format_time(hi)}, past the start of the file a running "
            f"recorder is writing ({format_time(writing)}); nothing was imported: import "
            "them into another dump set")
    for sf in files_overlapping(ds, lo, hi + 1):
        last = last_packet_ns(sf) or sf.first_ns
        raise ImportRefused(
            f"{names} ({format_time(lo)} to {format_time(hi)}) overlap "
            f"{sf.pcap.relative_to(ds.root)} ({format_time(sf.first_ns)} to "
            f"{format_time(last)}) of the dump set; nothing was imported: a dump set's files "
            "must not overlap in time, so import overlapping captures in one run (they are "
            "merged), or into another dump set")


# --- importing --------------------------------------------------------------------------------


@dataclass
class ImportedCapture:
    """A capture to import, as the first pass saw it."""

    path: Path
    digest: str
    packets: int
    lo: int  # earliest packet, ns in the dump set's precision
    hi: int  # latest
    size: int  # bytes, decompressed
    # Why it cannot be imported alone (packets back and forth over more than a slot); merged
    # with overlapping captures (sorted by time) it can.
    disorder: str = ""


@dataclass
class Cluster:
    """Captures overlapping each other in time (often just one): merged in time order."""

    sources: list[ImportedCapture]

    @property
    def lo(self) -> int:
        return min(s.lo for s in self.sources)

    @property
    def hi(self) -> int:
        return max(s.hi for s in self.sources)

    @property
    def names(self) -> str:
        """The captures, for messages: a cluster of the whole corpus would fill the screen."""
        return _names(self.sources)


def _names(srcs: list[ImportedCapture]) -> str:
    paths = [str(s.path) for s in srcs]
    more = f" and {len(paths) - 3} more captures merged with them" if len(paths) > 3 else ""
    return ", ".join(paths[:3]) + more


TEMP_PREFIX = ".import-"


def undo_partial(ds: DumpSet) -> list[str]:
    """Remove the files of imports stopped halfway (they are imported again), and what such
    a run left under temporary names; returns their sources."""
    for e in os.scandir(ds.root):  # one import at a time (.manage.lock): these are no one's
        if e.name.startswith(TEMP_PREFIX) and e.name.endswith(".part") and e.is_file(
                follow_symlinks=False):
            os.unlink(e.path)
    reg = load_registry(ds)
    stale = {d: e for d, e in reg.items() if not e.get("complete")}
    if not stale:
        return []
    by_name = {sf.name: sf for sf in ds.files()}
    for e in stale.values():
        for name in e.get("files", []):
            if name in by_name:
                ds.delete(by_name.pop(name))
    _store_registry(ds, {d: e for d, e in reg.items() if d not in stale})
    return sorted({e["source"] for e in stale.values()})


def survey(ds: DumpSet, paths: list[Path], report: Callable[[str], None] = lambda line: None,
           recording: bool = False, max_bytes: int = DEFAULT_FILE_BYTES) -> list[Cluster]:
    """First pass: read every capture, skip those imported before, refuse what cannot be
    imported (nothing is written), and group the rest into clusters overlapping in time."""
    reg = load_registry(ds)
    want = int(ds.meta.get("linktype", 1))
    seen: dict[str, Path] = {}
    found: list[ImportedCapture] = []
    for path in paths:
        try:
            cap = open_capture(path, ds.root)
        except FormatError as e:
            raise ImportRefused(f"{e}; nothing was imported: leave it out") from None
        if cap.digest in reg:
            e = reg[cap.digest]
            report(f"{path}: already imported (as {e['source']} on {e['imported']}); skipped")
            continue
        if cap.digest in seen:
            report(f"{path}: the same capture as {seen[cap.digest]}; skipped")
            continue
        seen[cap.digest] = path
        if cap.linktype != want:
            raise ImportRefused(
                f"{path}: link type {cap.linktype} differs from the dump set's {want}; nothing "
                "was imported: import it into a dump set of its link type")
        if not len(cap):
            report(f"{path}: no packets; nothing to import")
            continue
        ts = _in_precision(ds, cap)
        lo, hi = int(ts.min()), int(ts.max())
        if lo < 0 or hi >= PCAP_TIME_END:
            raise ImportRefused(f"{path}: timestamps outside what a pcap holds (1970 to 2106); "
                                "nothing was imported: leave it out")
        disorder = ""
        if (np.diff(ts) < 0).any():  # cut alone as the second pass will: can it be found?
            sizes = record_sizes(np.minimum(cap.caplen, _snaplen(ds)))
            disorder = _unfindable(str(path), ts, cut_points(ts, sizes, max_bytes))
        found.append(ImportedCapture(path, cap.digest, len(cap), lo, hi, len(cap.data),
                                     disorder))
        del cap, ts
    found.sort(key=lambda s: s.lo)
    clusters: list[Cluster] = []
    for src in found:
        if clusters and src.lo <= clusters[-1].hi:
            clusters[-1].sources.append(src)
        else:
            clusters.append(Cluster([src]))
    given = {p: i for i, p in reversed(list(enumerate(paths)))}
    for c in clusters:
        c.sources.sort(key=lambda s: given[s.path])
        if len(c.sources) == 1 and c.sources[0].disorder:
            raise ImportRefused(c.sources[0].disorder)
        _overlap(ds, c.names, c.lo, c.hi, recording)
    return clusters


def _in_precision(ds: DumpSet, cap: Capture) -> np.ndarray:
    return cap.ts_ns if ds.nanosecond else cap.ts_ns // 1000 * 1000


def _snaplen(ds: DumpSet) -> int:
    return min(int(ds.meta.get("snaplen", MAX_CAPLEN)), MAX_CAPLEN)


# --- the second pass: groups of captures, written and made durable together ------------------

# A group is imported as one: its files are written, synced together, then placed, and its
# captures recorded as complete; a stop undoes at most one group. Bounded in bytes (what a
# stop costs again) and in captures (each stays mapped until its group is written).
GROUP_BYTES = 1 << 30
GROUP_CAPTURES = 1000


def groups(clusters: list[Cluster]) -> Iterator[list[Cluster]]:
    """The clusters (in time order) in groups; once over its bounds a group ends where the next
    cluster starts in a later slot (no file of the recorder's would join the two), or at
    twice its bounds."""
    group: list[Cluster] = []
    size = count = 0
    for i, c in enumerate(clusters):
        group.append(c)
        size += sum(s.size for s in c.sources)
        count += len(c.sources)
        nxt = clusters[i + 1] if i + 1 < len(clusters) else None
        over = size >= GROUP_BYTES or count >= GROUP_CAPTURES
        if nxt is None or over and (nxt.lo // SLOT_NS > c.hi // SLOT_NS or size >= 2 * GROUP_BYTES
                                    or count >= 2 * GROUP_CAPTURES):
            yield group
            group, size, count = [], 0, 0


@dataclass
class _GroupPackets:
    """The packets of a group, in the order they are stored: which capture, where in it."""

    caps: list[Capture]
    which: np.ndarray  # int64: index into caps
    pos: np.ndarray  # int64: packet number in that capture
    ts: np.ndarray  # int64: ns, the dump set's precision
    sizes: np.ndarray  # int64: record sizes
    parts: list[tuple[int, int]]  # [start, stop) of each file


def _open_sources(ds: DumpSet, cluster: Cluster, snaplen: int,
                  report: Callable[[str], None]) -> list[Capture]:
    caps = []
    for src in cluster.sources:
        cap = open_capture(src.path, ds.root)
        if cap.digest != src.digest:
            raise ImportRefused(f"{src.path} changed while being imported; run again")
        # The dump set keeps `snaplen` bytes of a packet, as the recorder would have, and
        # extraction's output says so in its header: longer packets are cut, and said to be.
        longer = int((cap.caplen > snaplen).sum())
        if longer:
            np.minimum(cap.caplen, snaplen, out=cap.caplen)
            report(f"{src.path}: {longer} packets longer than the dump set's snapshot length "
                   f"({snaplen} bytes) are cut to it, as the recorder cuts them")
        if cap.torn_bytes:
            report(f"{src.path}: {cap.torn_bytes} bytes after the last complete packet (a "
                   "capture cut short) are left out")
        caps.append(cap)
    return caps


def _group_packets(ds: DumpSet, group: list[Cluster], max_bytes: int,
                   report: Callable[[str], None]) -> _GroupPackets:
    """The group's packets in file order (a cluster of several captures merged in time order),
    cut into files as the recorder would cut them.

    Clusters in time order, each in time order itself, make one run in time order, cut as a
    whole: small captures share files, filled up to the file size. A capture whose packets go
    back in time is cut on its own, as the first pass cut it to check it can be found.
    """
    snaplen = _snaplen(ds)
    caps: list[Capture] = []
    cols: list[list[np.ndarray]] = [[], [], [], []]
    runs = [0]  # where each run to cut as a whole starts
    ordered = False
    n = 0
    for cluster in group:
        mine = _open_sources(ds, cluster, snaplen, report)
        which = np.concatenate([np.full(len(c), len(caps) + i, dtype=np.int64)
                                for i, c in enumerate(mine)])
        pos = np.concatenate([np.arange(len(c), dtype=np.int64) for c in mine])
        ts = np.concatenate([_in_precision(ds, c) for c in mine])
        sizes = np.concatenate([record_sizes(c.caplen) for c in mine])
        if len(mine) > 1:  # merged in time order; ties keep the order the captures were given
            order = np.argsort(ts, kind="stable")
            which, pos, ts, sizes = which[order], pos[order], ts[order], sizes[order]
            report(f"merged in time order, as they overlap: {cluster.names}")
        in_order = not (np.diff(ts) < 0).any()
        if n and not (in_order and ordered):
            runs.append(n)
        ordered = in_order
        for col, a in zip(cols, (which, pos, ts, sizes), strict=True):
            col.append(a)
        caps += mine
        n += len(ts)
    which, pos, ts, sizes = (np.concatenate(c) for c in cols)
    parts = [(r + s, r + e) for r, stop in zip(runs, [*runs[1:], n], strict=True)
             for s, e in cut_points(ts[r:stop], sizes[r:stop], max_bytes)]
    return _GroupPackets(caps, which, pos, ts, sizes, parts)


def _pcap_body(ds: DumpSet, pk: _GroupPackets, s: int, e: int) -> tuple[np.ndarray, RecordTable]:
    """The pcap of packets [s, e), and where its records are (so it is indexed without being
    walked again): one vectorised copy per capture it takes packets from."""
    head = global_header(int(ds.meta.get("linktype", 1)), _snaplen(ds), ds.nanosecond)
    sizes = pk.sizes[s:e]
    body = np.empty(len(head) + int(sizes.sum()), dtype=np.uint8)
    body[: len(head)] = np.frombuffer(head, np.uint8)
    at = len(head) + np.cumsum(sizes) - sizes
    which, pos, ts = pk.which[s:e], pk.pos[s:e], pk.ts[s:e]
    wirelen = np.empty(e - s, dtype=np.uint32)
    order = np.argsort(which, kind="stable")
    starts = np.flatnonzero(np.diff(which[order], prepend=-1))
    for a, b in zip(starts, [*starts[1:], len(order)], strict=True):
        mine = order[a:b]
        c = pk.caps[int(which[mine[0]])]
        p = pos[mine]
        wirelen[mine] = c.wirelen[p]
        put_records(body, at[mine], c.data, c.data_offset[p], c.caplen[p], wirelen[mine],
                    ts[mine], ds.nanosecond)
    stored_ts = ts if ds.nanosecond else ts // 1000 * 1000
    return body, RecordTable(at.astype(np.uint64), stored_ts, (sizes - RECORD_HEADER_LEN).astype(
        np.uint32), wirelen, len(body), False)


def _write_new(path: Path, data: bytes | np.ndarray, mode: int) -> None:
    """Write a new file under a temporary name (never through a planted link); synced later,
    with the rest of its group."""
    fd = create_new(path, mode)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _sync(paths: Iterable[Path], directory: bool = False) -> None:
    """fsync each of `paths`: files written earlier (their writes were left to the kernel, so
    the group's data goes to the disk in one stream), or directories after renames."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    for p in paths:
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def import_group(ds: DumpSet, group: list[Cluster], max_bytes: int, file_mode: int,
                 report: Callable[[str], None] = lambda line: None) -> int:
    """Second pass for a group of clusters: write its files, sync them, place, index and
    link them; returns how many.

    Its captures are recorded as pending, each with the names of the files holding its
    packets (collisions included, `DumpSet.placements`), before any file is placed, and as
    complete once every file is placed, indexed, on disk and linked: a stop in between is
    undone by the next run.
    """
    pk = _group_packets(ds, group, max_bytes, report)
    firsts = [int(pk.ts[s:e].min()) for s, e in pk.parts]
    where = ds.placements(firsts)
    srcs = [src for c in group for src in c.sources]  # in the order of pk.caps
    files: list[list[str]] = [[] for _ in srcs]
    for sf, (s, e) in zip(where, pk.parts, strict=True):
        for i in np.unique(pk.which[s:e]):
            files[i].append(sf.name)
    reg = load_registry(ds)
    for src, names in zip(srcs, files, strict=True):
        reg[src.digest] = {"source": os.path.abspath(src.path),
                           "imported": format_time(time.time_ns()), "packets": src.packets,
                           "files": names, "complete": False}
    _store_registry(ds, reg)
    temps = []
    tag = f"{TEMP_PREFIX}{os.getpid()}"
    try:
        for k, (s, e) in enumerate(pk.parts):
            body, table = _pcap_body(ds, pk, s, e)
            temp = ds.root / f"{tag}-{k}.pcap.part"
            _write_new(temp, body, file_mode)
            temps.append(temp)
            # Indexed from memory: the file is not read back, nor its records walked again.
            head = parse_global_header(bytes(body[:GLOBAL_HEADER_LEN]), str(temp))
            idx = index_records(body, head, table)
            del body, table
            _write_new(temp.with_suffix(".idx.part"), encode_index(idx), file_mode)
            temps.append(temp.with_suffix(".idx.part"))
        del pk
        _sync(temps)
        for k, sf in enumerate(where):
            ds.place(temps[2 * k], sf.first_ns, at=sf)
            os.rename(temps[2 * k + 1], sf.index)
        _sync({ds.root, *(sf.pcap.parent for sf in where)}, directory=True)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
    for sf in where:
        ds.link_if_present(sf)
    for src in srcs:
        reg[src.digest]["complete"] = True
    _store_registry(ds, reg)
    return len(where)


def sources(paths: tuple[Path, ...], ds: DumpSet,
            report: Callable[[str], None] = lambda line: None) -> list[Path]:
    """The files given, and the capture files under the directories given (sorted).

    In a directory, what is not a regular file (a FIFO, a device, through a link too) is
    skipped with a warning: reading it would hang or never end. The dump set's own files
    are refused when given, and left out of a directory holding them: imported, they would
    be doubled (an unfinished file of the recorder is placed by npcaprepair too).
    """
    own = [os.path.realpath(ds.root), os.path.realpath(ds.timeline)]

    def inside(p: str | Path) -> str | None:
        real = os.path.realpath(p)
        return next((o for o in own if real == o or real.startswith(o + os.sep)), None)

    out: list[Path] = []
    for p in paths:
        if not p.exists():
            raise click.UsageError(f"{p} does not exist; give capture files or directories")
        if inside(p):
            raise ImportRefused(f"{p} is inside the dump set {ds.root} (or its timeline): its "
                                "packets are the dump set's already; nothing was imported")
        if not p.is_dir():
            out.append(p)
            continue
        for dirpath, dirs, files in os.walk(p):
            for d in list(dirs):
                if inside(Path(dirpath) / d):
                    report(f"{Path(dirpath) / d}: the dump set's own directory; skipped")
                    dirs.remove(d)
            dirs.sort()
            for n in sorted(files):
                if n.startswith(".") or not n.removesuffix(".gz").removesuffix(
                        ".zst").endswith(CAPTURE_SUFFIXES):
                    continue
                f = Path(dirpath) / n
                try:
                    regular = stat.S_ISREG(f.stat().st_mode)
                except OSError as e:  # a dangling or looping link
                    report(f"{f}: {e.strerror}; skipped")
                    continue
                if not regular:
                    report(f"{f}: not a regular file (a FIFO or device); skipped")
                elif inside(f):
                    report(f"{f}: a link into the dump set; skipped")
                else:
                    out.append(f)
    return out


EPILOG = """\b
Examples:
  npcapimport -t /var/lib/pcapvault/eth0 /srv/old-captures/
  npcapimport -t /var/lib/pcapvault/eth0 incident-2024.pcapng.gz day1.pcap.zst

Takes pcap (either byte order, micro- or nanosecond), pcapng with one interface, and either
compressed with gzip or zstd (recognised by content); from a directory, every *.pcap,
*.pcapng, *.cap and *.dmp (also .gz/.zst) below it that is a regular file (FIFOs, devices
and the dump set itself are skipped). The captures, in time order, are cut into files at the
recorder's file size (-p) and 10-minute slots (small captures share files), in the dump set's
precision, indexed and linked like recorded files, and counted by the recorder's disk
budget (which deletes the oldest files first: imported old captures go first when the dump
set is over its limit). A capture imported
before is skipped (DS/imports.json records each by its SHA-256). Captures overlapping
each other in time are merged in time order. A capture that overlaps the dump set's files
in time, has another link type, or several interfaces is refused, and nothing is imported.
Run it as the dump set's owner, or as root (it becomes the owner, who must be able to read
the captures).
"""


@click.command("npcapimport", epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-t", "--dumpset", "dumpset", required=True, type=click.Path(path_type=Path),
              help="The dump set (the recorder's -o) or its timeline.")
@click.option("-p", "--max-file-size", "max_size", default=None, metavar="SIZE",
              help="Cut files at this size (e.g. 256M; at least 16K).  [default: the "
                   "recorder's -p, kept in the dump set; 256M before a recorder has run]")
@click.option("--file-mode", default="0640", show_default=True, callback=_mode,
              help="Permissions of the pcap and index files (octal).")
@click.option("--dir-mode", default="0750", show_default=True, callback=_mode,
              help="Permissions of new storage directories (octal).")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path),
                metavar="FILE|DIR...")
@click.version_option(package_name="pcapvault", prog_name="npcapimport")
def command(dumpset: Path, max_size: str | None, file_mode: int, dir_mode: int,
            paths: tuple[Path, ...]) -> None:
    """Import existing capture files into a dump set."""
    try:
        given = parse_size(max_size, "-p", 16 << 10) if max_size else None
    except PcapVaultError as e:
        raise click.UsageError(str(e)) from None
    ds = DumpSet.open(dumpset)
    files = sources(paths, ds, report=click.echo)
    max_bytes = given or ds.file_bytes or DEFAULT_FILE_BYTES
    become_owner(ds)
    os.umask(0o777 & ~dir_mode)
    recording = writer_lock(ds)
    for name in undo_partial(ds):
        click.echo(f"{name}: its import was stopped halfway; its files were removed and it "
                   "is imported again if given")
    clusters = survey(ds, files, report=click.echo, recording=recording, max_bytes=max_bytes)
    nfiles = npackets = 0
    for g in groups(clusters):
        nfiles += import_group(ds, g, max_bytes, file_mode, report=click.echo)
        for src in (src for c in g for src in c.sources):
            npackets += src.packets
            click.echo(f"{src.path}: {src.packets} packets, {format_time(src.lo)} to "
                       f"{format_time(src.hi)}")
    click.echo(f"imported {npackets} packets into {nfiles} file(s) of {ds.root}")


def main() -> None:
    from pcapvault.index.cliutil import run

    run(command, "npcapimport")

