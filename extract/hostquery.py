"""The fast path for host queries: one dump set, a filter whose every match names an address,
answered from the indexes' address postings without numpy.

Why a second path: the analyst's everyday question is one host's packets in a short window.
The general engine (engine.py) answers it by decoding the window's flow tables and packet
columns with numpy, whose import alone takes a good part of the time such a query should take
(docs/BENCHMARKS.md, "Extraction"). Here libpcap compiles the filter, hostkeys.py reads the
posting lists it needs off the compiled program, and each index file gives those lists from a
small directory and one compressed frame (index/postings.py). The packets' byte ranges are then
announced to the kernel at once, read, checked against their postings (record length, and the
timestamp where the index's block time table leaves it open), confirmed by libpcap where the
index does not decide, and written in capture order.

The path answers only what it can answer exactly as the engine would, and says so before
writing anything: a plan is None (the engine takes over) for several dump sets, pcapng,
slicing, splitting, caps, link types other than Ethernet, compressed pcaps, indexes without
postings (versions 1 and 2), damaged or missing indexes, torn pcaps (the engine warns and
goes on for these), filters without an address on every accepting path, and results beyond
MAX_PACKETS or MAX_BYTES (held in memory until written). Packets whose record header does not
agree with the index, another file's index and postings that cannot be read also hand the
query over, since nothing has been written yet: the engine skips and reports the damage.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from pcapvault.index.compressed import is_compressed
from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import FormatError
from pcapvault.index.libpcap import Filter
from pcapvault.index.pcaplayout import RECORD_HEADER_LEN, global_header
from pcapvault.index.postings import READ_AHEAD, Postings

from .access import open_query
from .hostkeys import MAYBE, NO, YES, decide, posting_keys
from .outfile import create, writev_all
from .readahead import Job, Prefetcher, will_need
from .report import Stats
from .request import Request

MAX_PACKETS = 250_000
MAX_BYTES = 128 << 20
_RECORD = struct.Struct("<IIII")
_UNKNOWN = bytes(16)


@dataclass
class FilePlan:
    """The candidate records of one pcap, in capture order."""

    pcap: str
    fd: int
    offset: list[int]
    length: list[int]
    sure: list[bool]  # the index alone proves the match
    edge: list[bool]  # in a block the window cuts: the record's timestamp decides


@dataclass
class Plan:
    req: Request
    ds: DumpSet
    linktype: int
    snaplen: int
    nanosecond: bool
    filter: Filter
    files: list[FilePlan]
    stats: Stats = field(default_factory=Stats)

    hints: Prefetcher | None = None
    jobs: list[Job] = field(default_factory=list)  # the announcements of each file

    def close(self) -> None:
        if self.hints is not None:
            self.hints.close()
            self.hints = None
        for fp in self.files:
            os.close(fp.fd)
        self.files = []


def applies(req: Request) -> bool:
    """Whether a request may go to this path at all, before any file is looked at: one dump
    set and plain pcap output, without slicing, splitting or caps (the engine's Output does
    those). The one place that decides it (cli.py asks); `plan` then decides by the data."""
    return len(req.dumpsets) == 1 and not (
        req.pcapng or req.snaplen or req.split_bytes or req.split_packets or req.max_bytes
        or req.max_packets
    )


class _NotHere(Exception):
    """The engine must answer this request."""


def plan(req: Request) -> Plan | None:
    """The candidates of `req`, their page-cache reads started on a thread; None when the
    engine must answer. Errors the engine would report the same way (a dump set that does
    not exist or may not be read, a bad filter) are raised."""
    t = open_query(req.dumpsets[0], req.filter)
    ds, linktype, flt = t.ds, t.linktype, t.filter
    keys = posting_keys(flt.program) if linktype == 1 else None
    if not keys:
        return None
    stats = Stats(count_timeline=False)  # the timeline walk is for -v only: add_timeline
    files = ds.files_in_window(req.begin_ns, req.end_ns)
    stats.count_files(ds, len(files))
    out = Plan(req, ds, linktype, t.snaplen, t.nanosecond, flt, [], stats)
    # Each step's reads are announced for every file before the first is waited for: cold,
    # the files' directories, then their frames, come in one round trip each.
    for sf in files:
        will_need(str(sf.index), 0, READ_AHEAD)  # what Postings.read reads first
    opened: list[tuple[StoredFile, Postings, list]] = []
    try:
        for sf in files:
            found = _lists(sf, req, keys, ds.nanosecond)
            if found is None:
                stats.skipped_summary += 1
            else:
                opened.append((sf, *found))
        for _, p, lists in opened:
            for _, _, k in lists:
                will_need(p.path, *p.frame_span(k))
        decisions: dict[tuple[bytes, int, int], int] = {}
        total = nbytes = 0
        for sf, p, lists in opened:
            fp = _candidates(sf, p, lists, req, flt, decisions)
            if fp is None:
                stats.skipped_summary += 1
                continue
            out.files.append(fp)
            total += len(fp.offset)
            nbytes += sum(fp.length)
            if total > MAX_PACKETS or nbytes > MAX_BYTES:
                raise _NotHere
    except (_NotHere, FormatError, OSError):
        out.close()
        return None
    finally:
        for _, p, _ in opened:
            p.close()
    # Every candidate's bytes announced at once, file after file: the disk serves thousands of
    # scattered records in parallel (a cold 6,000-record query: 0.1 s instead of 0.45 s one
    # read after the other); the reader starts on a file once its records are announced.
    out.hints = Prefetcher()
    out.jobs = [out.hints.submit(fp.pcap, fp.offset, fp.length) for fp in out.files]
    return out


def _lists(sf: StoredFile, req: Request, keys: set[tuple[bytes, int]], nanosecond: bool
           ) -> tuple[Postings, list] | None:
    """`sf`'s index opened and the posting lists of `keys` (with the "address unknown" lists
    of their types) found in its directory; None if the file lies outside the window."""
    if is_compressed(sf.pcap):
        raise _NotHere
    p = Postings.read(str(sf.index))  # NoPostings and damage: FormatError
    try:
        if p.linktype != 1 or p.nanosecond != nanosecond:
            raise _NotHere
        if p.count and not p.first_ns // 1000 * 1000 <= sf.first_ns <= p.last_ns:
            raise _NotHere  # another file's index (flowplan.py's check): the engine scans
        if p.count == 0 or p.last_ns < req.begin_ns or p.first_ns >= req.end_ns:
            p.close()
            return None
        if os.stat(sf.pcap).st_size < p.pcap_size:
            raise _NotHere  # torn: the engine extracts what is complete and warns
        lists = []
        for addr, etype in sorted(keys):
            k = p.find(addr, etype)
            if k is not None:
                lists.append((addr, etype, k))
        for etype in sorted({e for _, e in keys}):
            k = p.find(_UNKNOWN, etype, unknown=True)
            if k is not None:
                lists.append((None, etype, k))
        if sum(p.size(k) for _, _, k in lists) > MAX_PACKETS:
            raise _NotHere
    except BaseException:
        p.close()
        raise
    return p, lists


def _candidates(sf: StoredFile, p: Postings, lists: list, req: Request, flt: Filter,
                decisions: dict[tuple[bytes, int, int], int]) -> FilePlan | None:
    """The postings of `lists` that can match inside the window, in capture order.

    A posting is dropped when one of its lists proves libpcap rejects it (NO), taken without
    libpcap when one proves it accepts it (YES); both are facts about the packet, so they
    never disagree. Postings in blocks the window cuts are read and their timestamps
    checked (`edge`)."""
    where = _window_blocks(p, req)
    length: dict[int, int] = {}
    state: dict[int, int] = {}  # offset -> YES/NO/MAYBE, combined over the lists
    for addr, etype, k in lists:
        pl = p.entries(k)
        roles: dict[int, int] = {}
        for i, (off, ln) in enumerate(zip(pl.offset, pl.length, strict=True)):
            roles[off] = roles.get(off, 0) | (1 if i < pl.sources else 2)
            length[off] = ln
        for off, r in roles.items():
            if addr is None:
                dec = MAYBE
            else:
                dec = decisions.get((addr, etype, r))
                if dec is None:
                    dec = decisions[(addr, etype, r)] = decide(flt.program, addr, etype, r)
            have = state.get(off, MAYBE)
            state[off] = dec if have == MAYBE else have
    order: list[int] = []
    edge: list[bool] = []
    for off in sorted(state):
        if state[off] == NO:
            continue
        place = where(off)
        if place is not None:
            order.append(off)
            edge.append(place)
    if not order:
        return None
    fd = os.open(sf.pcap, os.O_RDONLY)
    return FilePlan(str(sf.pcap), fd, order, [length[o] for o in order],
                    [state[o] == YES for o in order], edge)


def _window_blocks(p: Postings, req: Request) -> Callable[[int], bool | None]:
    """For a record offset: None if the window surely excludes the record, False if it surely
    includes it, True if only its timestamp can tell (a block of the index's time table that
    the window cuts)."""
    if req.begin_ns <= p.first_ns and p.last_ns < req.end_ns:
        return lambda off: False
    blocks = p.blocks()
    starts = [b[0] for b in blocks]
    verdict = [
        None if hi < req.begin_ns or lo >= req.end_ns
        else not (req.begin_ns <= lo and hi < req.end_ns)
        for _, lo, hi in blocks
    ]
    return lambda off: verdict[bisect_right(starts, off) - 1]


@dataclass
class Result:
    stats: Stats
    written: int = 0
    bytes_out: int = 0
    files: list[tuple[str, int]] = field(default_factory=list)  # -l: path, matches


def run(p: Plan, output: str | None, empty: bool, list_only: bool) -> Result | None:
    """Read, check and confirm the plan's records, then write or list them; None (nothing
    written) when a record disagrees with its index."""
    stats = p.stats
    res = Result(stats)
    kept: list[bytes] = []
    try:
        for i, fp in enumerate(p.files):
            if p.hints is not None:
                p.hints.announced(p.jobs[i])
            n = _take(p, fp, stats, kept, list_only)
            if p.hints is not None:
                p.hints.done(p.jobs[i])
            if n is None:
                return None
            if list_only and n:
                res.files.append((os.path.realpath(fp.pcap), n))
    finally:
        p.close()
    if list_only:
        res.written = sum(n for _, n in res.files)
        stats.packets_matched = res.written
        return res
    stats.packets_matched = res.written = len(kept)
    if kept or empty:
        fd = 1 if output == "-" else create(output)
        try:
            header = global_header(p.linktype, p.snaplen, p.nanosecond)
            writev_all(fd, [header, *kept])
        finally:
            if fd != 1:
                os.close(fd)
        res.bytes_out = len(header) + sum(map(len, kept))
    return res


def _take(p: Plan, fp: FilePlan, stats: Stats, kept: list[bytes], list_only: bool
          ) -> int | None:
    """Matches of one file (appended to `kept` unless listing); None on a stale index."""
    scale = 1 if p.nanosecond else 1000
    begin, end = p.req.begin_ns, p.req.end_ns
    match = p.filter.match
    n = 0
    for off, ln, sure, edge in zip(fp.offset, fp.length, fp.sure, fp.edge, strict=True):
        if list_only and sure and not edge:
            n += 1
            continue
        try:
            data = os.pread(fp.fd, ln, off)
        except OSError:
            return None  # a damaged posting (offset or length out of range): the engine decides
        stats.packets_read += 1
        stats.bytes_read += len(data)
        if len(data) != ln:
            return None
        sec, frac, caplen, wirelen = _RECORD.unpack_from(data)
        if caplen + RECORD_HEADER_LEN != ln:
            return None
        if edge and not begin <= sec * 1_000_000_000 + frac * scale < end:
            continue
        if not sure and not match(data[RECORD_HEADER_LEN:], wirelen):
            continue
        n += 1
        if not list_only:
            kept.append(data)
    return n
