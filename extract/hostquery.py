"""The fast path for host queries: one dump set, a filter whose every match names an address,
answered from the indexes' address postings without numpy.

Why a second path: the analyst's everyday question is one host's packets in a short window.
The general engine (engine.py) answers it by decoding the window's flow tables and packet
columns with numpy, whose import alone takes a good part of the time such a query should take
(docs/BENCHMARKS.md, "Extraction"). Here libpcap compiles the filter, hostkeys.py reads the
posting lists it needs off the compiled program, and each index file gives those lists from a
small directory and one compressed frame (index/postings.py). The packets' byte ranges are then
announced to the kernel at once, read, checked against their postings, confirmed by libpcap
where the index does not decide, and written in capture order.

The path answers only what it can answer exactly as the engine would, and says so before
writing anything: a plan is None (the engine takes over) for several dump sets, pcapng,
slicing, splitting, caps, link types other than Ethernet, compressed pcaps, indexes without
postings (versions 1 and 2), damaged or missing indexes, torn pcaps (the engine warns and
goes on for these), filters without an address on every accepting path, and results beyond
MAX_PACKETS or MAX_BYTES (held in memory until written). Packets whose record header does not
agree with the index also hand the query over, since nothing has been written yet.

The entry point (early.py) starts planning on a thread before click is imported, so that the
disk reads the index directories and then the packets while the interpreter imports the rest;
the command takes that plan (`take`) if the request it parsed is the same.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from pcapvault.index.compressed import is_compressed
from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import FormatError
from pcapvault.index.libpcap import Filter, compile_filter
from pcapvault.index.pcaplayout import RECORD_HEADER_LEN, global_header
from pcapvault.index.postings import Postings

from .access import open_dumpset
from .hostkeys import MAYBE, NO, YES, decide, posting_keys
from .outfile import create, writev_all
from .report import Stats

MAX_PACKETS = 250_000
MAX_BYTES = 128 << 20
DIRECTORY_GUESS = 256 << 10  # what Postings.read reads first
_RECORD = struct.Struct("<IIII")
_UNKNOWN = bytes(16)


@dataclass(frozen=True)
class Request:
    """What a plan answers; the early plan is used only for an identical request."""

    dumpset: str
    begin_ns: int
    end_ns: int
    expr: str


@dataclass
class FilePlan:
    """The candidate records of one pcap, in capture order."""

    pcap: str
    first_ns: int
    fd: int
    offset: list[int]
    length: list[int]
    ts_ns: list[int]
    sure: list[bool]  # the index alone proves the match


@dataclass
class Plan:
    ds: DumpSet
    linktype: int
    snaplen: int
    nanosecond: bool
    filter: Filter
    files: list[FilePlan]
    stats: Stats = field(default_factory=Stats)

    def close(self) -> None:
        for fp in self.files:
            os.close(fp.fd)
        self.files = []


class _NotHere(Exception):
    """The engine must answer this request."""


def plan(req: Request) -> Plan | None:
    """The candidates of `req`, their page-cache reads already started; None when the engine
    must answer. Errors the engine would report the same way (a dump set that does not exist
    or may not be read, a bad filter) are raised."""
    ds = open_dumpset(req.dumpset)
    meta = ds.meta
    linktype = int(meta.get("linktype", 1))
    snaplen = int(meta.get("snaplen", 262144))
    flt = compile_filter(req.expr, linktype, max(snaplen, 65535))  # as select.Source does
    keys = posting_keys(flt.program) if linktype == 1 else None
    if not keys:
        return None
    stats = Stats(count_timeline=False)  # the timeline walk is for -v only: add_timeline
    files = ds.files_in_window(req.begin_ns, req.end_ns)
    stats.count_files(ds, len(files))
    for sf in files:
        _hint(str(sf.index), 0, DIRECTORY_GUESS)
    out = Plan(ds, linktype, snaplen, ds.nanosecond, flt, [], stats)
    decisions: dict[tuple[bytes, int, int], int] = {}
    total = nbytes = 0
    try:
        for sf in files:
            fp = _file_plan(sf, req, flt, keys, decisions, ds.nanosecond, stats)
            if fp is None:
                continue
            out.files.append(fp)
            total += len(fp.offset)
            nbytes += sum(fp.length)
            if total > MAX_PACKETS or nbytes > MAX_BYTES:
                raise _NotHere
            _will_need(fp)
    except (_NotHere, FormatError, OSError):
        out.close()
        return None
    return out


def _file_plan(sf: StoredFile, req: Request, flt: Filter, keys: set[tuple[bytes, int]],
               decisions: dict[tuple[bytes, int, int], int], nanosecond: bool,
               stats: Stats) -> FilePlan | None:
    if is_compressed(sf.pcap):
        raise _NotHere
    with Postings.read(str(sf.index)) as p:  # NoPostings and damage: FormatError
        if p.linktype != 1 or p.nanosecond != nanosecond:
            raise _NotHere
        if p.count == 0 or p.last_ns < req.begin_ns or p.first_ns >= req.end_ns:
            stats.skipped_summary += 1
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
        chosen: dict[int, list] = {}
        for addr, etype, k in lists:
            pl = p.entries(k)
            for ts, off, ln, roles in zip(pl.ts_ns, pl.offset, pl.length, pl.roles,
                                          strict=True):
                if not req.begin_ns <= ts < req.end_ns:
                    continue
                if addr is None:
                    dec = MAYBE
                else:
                    dec = decisions.get((addr, etype, roles))
                    if dec is None:
                        dec = decisions[(addr, etype, roles)] = decide(
                            flt.program, addr, etype, roles)
                if dec == NO:
                    continue
                if off + ln > p.pcap_size:
                    raise FormatError(f"{sf.index}: a posting points past the pcap's end")
                have = chosen.get(off)
                if have is None:
                    chosen[off] = [ln, ts, dec == YES]
                elif dec == YES:
                    have[2] = True
    if not chosen:
        stats.skipped_summary += 1
        return None
    order = sorted(chosen) if len(lists) > 1 else list(chosen)
    fd = os.open(sf.pcap, os.O_RDONLY)
    return FilePlan(str(sf.pcap), sf.first_ns, fd, order, [chosen[o][0] for o in order],
                    [chosen[o][1] for o in order], [chosen[o][2] for o in order])


def _hint(path: str, offset: int, length: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def _will_need(fp: FilePlan) -> None:
    """Announce every candidate's bytes at once: the disk serves them in parallel (one read
    after the other, a cold 6,000-packet query reads for 0.45 s instead of 0.1 s)."""
    advise = os.posix_fadvise
    for off, ln in zip(fp.offset, fp.length, strict=True):
        advise(fp.fd, off, ln, os.POSIX_FADV_WILLNEED)


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
        for fp in p.files:
            n = _take(p, fp, stats, kept, list_only)
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
    match = p.filter.match
    n = 0
    for off, ln, ts, sure in zip(fp.offset, fp.length, fp.ts_ns, fp.sure, strict=True):
        if list_only and sure:
            n += 1
            continue
        data = os.pread(fp.fd, ln, off)
        stats.packets_read += 1
        stats.bytes_read += len(data)
        if len(data) != ln:
            return None
        sec, frac, caplen, wirelen = _RECORD.unpack_from(data)
        if caplen + RECORD_HEADER_LEN != ln or sec * 1_000_000_000 + frac * scale != ts:
            return None
        if not sure and not match(data[RECORD_HEADER_LEN:], wirelen):
            continue
        n += 1
        if not list_only:
            kept.append(data)
    return n


def take(req: Request) -> Plan | None:
    """The plan early.plan_ahead made, if it was made for `req`, else a plan made now."""
    from .early import planned_ahead

    ahead = planned_ahead()
    if ahead is not None:
        areq, p = ahead
        if areq == req:
            return p
        if p is not None:
            p.close()
    return plan(req)
