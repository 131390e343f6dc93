"""A small plan read record by record and written as plain pcap, without numpy.

The engine (engine.py) reads plans in chunks with numpy and writes every output format; a
command that asks one host's packets of one dump set as plain pcap would spend a good part of
its time importing numpy for it (docs/BENCHMARKS.md, "Extraction"). A postings plan
(postingsplan.py) is bounded in size, so its records are read here one by one instead: every
candidate's byte range is announced to the kernel at once (the disk serves thousands of
scattered records in parallel), each record is checked against its plan (its length, and its
timestamp where the window cuts its block), confirmed by libpcap unless the index proves it,
held in memory and written in capture order with one writev.

Nothing is written until every record has been read: a record that disagrees with its plan
(a stale or damaged index) makes `run` return None, and the engine then answers the query,
skipping and reporting the damage as it does for any plan.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from pcapvault.index.libpcap import Filter
from pcapvault.index.pcaplayout import (
    GLOBAL_HEADER_LEN,
    RECORD_HEADER_LEN,
    global_header,
    is_own_header,
)

from .outfile import create, writev_all
from .plan import FilePlan
from .postingsplan import PostingsPlan
from .readahead import Prefetcher
from .report import Stats

_RECORD = struct.Struct("<IIII")


@dataclass
class Result:
    stats: Stats
    written: int = 0
    bytes_out: int = 0
    files: list[tuple[str, int]] = field(default_factory=list)  # -l: path, matches


def run(pp: PostingsPlan, begin_ns: int, end_ns: int, output: str | None, empty: bool,
        list_only: bool, stats: Stats) -> Result | None:
    """Read, check and confirm the plan's records, then write or list them; None (nothing
    written) when a record disagrees with its plan."""
    t = pp.target
    stats.count_files(t.ds, pp.considered)
    stats.skipped_summary += pp.skipped
    res = Result(stats)
    kept: list[bytes] = []
    hints = Prefetcher()
    try:
        # Every candidate's bytes announced at once, file after file; the reading below
        # starts on a file once its records are announced.
        jobs = [hints.submit(fp.file.pcap, fp.rec,
                             [c + RECORD_HEADER_LEN for c in fp.caplen]) for fp in pp.files]
        for fp, job in zip(pp.files, jobs, strict=True):
            hints.announced(job)
            n = _take(fp, t.filter, t.linktype, t.nanosecond, begin_ns, end_ns, stats, kept,
                      list_only)
            hints.done(job)
            if n is None:
                return None
            if list_only and n:
                res.files.append((os.path.realpath(fp.file.pcap), n))
    finally:
        hints.close()
    if list_only:
        res.written = stats.packets_matched = sum(n for _, n in res.files)
        return res
    stats.packets_matched = res.written = len(kept)
    if kept or empty:
        fd = 1 if output == "-" else create(output)
        try:
            header = global_header(t.linktype, t.snaplen, t.nanosecond)
            writev_all(fd, [header, *kept])
        finally:
            if fd != 1:
                os.close(fd)
        res.bytes_out = len(header) + sum(map(len, kept))
    return res


def _take(fp: FilePlan, flt: Filter, linktype: int, nanosecond: bool, begin: int, end: int,
          stats: Stats, kept: list[bytes], list_only: bool) -> int | None:
    """Matches of one file (appended to `kept` unless listing); None on a record that
    disagrees with the plan, or a pcap header other than the dump set's (the engine opens
    the file as tcpdump would, and skips and reports one it cannot read)."""
    scale = 1 if nanosecond else 1000
    match = flt.match
    edges = fp.edge if fp.edge is not None else [False] * len(fp.rec)
    n = 0
    try:
        fd = os.open(fp.file.pcap, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            if not is_own_header(os.pread(fd, GLOBAL_HEADER_LEN, 0), linktype, nanosecond,
                                 max(fp.caplen, default=0)):
                return None
        except OSError:
            return None
        for off, cap, sure, edge in zip(fp.rec, fp.caplen, fp.sure, edges, strict=True):
            if list_only and sure and not edge:
                n += 1
                continue
            ln = cap + RECORD_HEADER_LEN
            try:
                data = os.pread(fd, ln, off)
            except OSError:
                return None  # an offset or length out of range: the engine decides
            stats.packets_read += 1
            stats.bytes_read += len(data)
            if len(data) != ln:
                return None
            sec, frac, caplen, wirelen = _RECORD.unpack_from(data)
            if caplen != cap:
                return None
            if edge and not begin <= sec * 1_000_000_000 + frac * scale < end:
                continue
            if not sure and not match(data[RECORD_HEADER_LEN:], wirelen):
                continue
            n += 1
            if not list_only:
                kept.append(data)
    finally:
        os.close(fd)
    return n
