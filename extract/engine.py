"""Read the selected candidates, confirm them with libpcap, merge dump sets in time order.

Reads are planned from the index offsets: candidates closer than GAP bytes are read with one
pread (so dense selections become large sequential reads and sparse ones touch only their
records), in chunks of at most CHUNK_BYTES so memory stays bounded on any file size. Each chunk
is matched with one vectorised call of the compiled filter.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pcapvault.index.errors import PcapVaultError
from pcapvault.index.pcapfile import RECORD_HEADER_LEN, PcapReader

from .output import Batch, Output
from .select import Candidates, Source, Stats, Warn

CHUNK_BYTES = 32 << 20
CHUNK_PACKETS = 1 << 18
GAP = 4 << 10

Progress = Callable[[int, int], None]


@dataclass
class Query:
    begin_ns: int
    end_ns: int
    list_only: bool = False


def _drop_past_end(c: Candidates, size: int, warn: Warn) -> Candidates:
    """A pcap shorter than its index says (a torn tail): keep the complete records.

    The index path has warned already (select compares the file size with the index)."""
    ok = c.rec + RECORD_HEADER_LEN + c.caplen <= size
    if ok.all():
        return c
    if not c.indexed:
        warn(f"{c.file.pcap}: truncated at byte {size}; extracting the complete records before it")
    return _subset(c, ok)


def _subset(c: Candidates, sel: np.ndarray) -> Candidates:
    return Candidates(
        c.file, c.rec[sel], c.caplen[sel], c.wirelen[sel], c.ts_ns[sel], c.sure[sel], c.indexed
    )


def read_matches(
    src: Source, c: Candidates, stats: Stats, warn: Warn, reuse: bool = False
) -> Iterator[Batch]:
    """The confirmed matches among `c`, in capture order, as batches.

    With `reuse` one read buffer serves every chunk (no fresh pages to fault in): only for a
    consumer that is done with a batch before asking for the next.
    """
    try:
        reader = PcapReader(c.file.pcap)
    except PcapVaultError as e:
        warn(f"{c.file.pcap}: unreadable, skipped ({e})")
        return
    with reader:
        hdr = reader.header
        c = _drop_past_end(c, reader.size, warn)
        flt = src.filter
        everything = flt.matches_everything
        raw_ok = not hdr.big_endian
        if not c.indexed:
            # Sequential scan: the records are in the mapped file already.
            arr = reader.array()
            for i in range(0, len(c.rec), CHUNK_PACKETS):
                rec = c.rec[i : i + CHUNK_PACKETS]
                cap, wire = c.caplen[i : i + CHUNK_PACKETS], c.wirelen[i : i + CHUNK_PACKETS]
                stats.packets_read += len(rec)
                m = (
                    np.ones(len(rec), bool)
                    if everything
                    else flt.match_many(arr, rec + RECORD_HEADER_LEN, cap, wire)
                )
                yield Batch(
                    arr, rec[m], cap[m], wire[m], c.ts_ns[i : i + CHUNK_PACKETS][m],
                    src.number, hdr.nanosecond, raw_ok,
                )
            return
        end = c.rec + RECORD_HEADER_LEN + c.caplen
        yield from _read_chunks(src, c, end, reader, stats, hdr.nanosecond, raw_ok, reuse)


def _read_chunks(
    src: Source,
    c: Candidates,
    end: np.ndarray,
    reader: PcapReader,
    stats: Stats,
    nanosecond: bool,
    raw_ok: bool,
    reuse: bool,
) -> Iterator[Batch]:
    """Coalesced preads of the candidates, matched chunk by chunk."""
    flt = src.filter
    everything = flt.matches_everything
    n = len(c.rec)
    i = 0
    spare: np.ndarray | None = None
    dense = n and int((end - c.rec).sum()) > (int(end[-1]) - int(c.rec[0])) // 4
    if dense:
        reader.advise_sequential(int(c.rec[0]), int(end[-1] - c.rec[0]))
    while i < n:
        j = int(np.searchsorted(end, c.rec[i] + CHUNK_BYTES, side="right"))
        j = min(max(j, i + 1), i + CHUNK_PACKETS)
        rec, e = c.rec[i:j], end[i:j]
        # Coalesce records closer than GAP into one read.
        new = np.ones(len(rec), bool)
        new[1:] = rec[1:] - e[:-1] > GAP
        first = np.flatnonzero(new)
        last = np.append(first[1:], len(rec)) - 1
        r_start, r_end = rec[first], e[last]
        lens = r_end - r_start
        base = np.cumsum(np.append(0, lens))
        total = int(base[-1])
        if reuse and spare is not None and len(spare) >= total:
            buf = spare[:total]
        else:
            buf = np.empty(max(total, CHUNK_BYTES if reuse else 0), np.uint8)
            spare = buf if reuse else None
            buf = buf[:total]
        mv = memoryview(buf)
        for s, ln, b in zip(r_start.tolist(), lens.tolist(), base[:-1].tolist(), strict=True):
            got = reader.read_into(mv[b : b + ln], s)
            if got != ln:
                raise PcapVaultError(f"{c.file.pcap}: short read at byte {s}")
        rid = np.cumsum(new) - 1
        local = rec - r_start[rid] + base[rid]
        stats.packets_read += len(rec)
        stats.bytes_read += len(buf)
        cap, wire = c.caplen[i:j], c.wirelen[i:j]
        if everything:
            m = np.ones(len(rec), bool)
        else:
            m = flt.match_many(buf, local + RECORD_HEADER_LEN, cap, wire)
        yield Batch(buf, local[m], cap[m], wire[m], c.ts_ns[i:j][m], src.number, nanosecond,
                    raw_ok)
        i = j


def source_batches(
    src: Source, q: Query, stats: Stats, warn: Warn, tick: Callable[[], None], single: bool
) -> Iterator[Batch]:
    """Every confirmed match of one dump set in the window, in stored order."""
    for sf in src.files(q.begin_ns, q.end_ns, stats):
        c = src.candidates(sf, q.begin_ns, q.end_ns, stats, warn)
        if c is not None:
            for b in read_matches(src, c, stats, warn, reuse=single):
                stats.packets_matched += len(b)
                yield b
        tick()


def merge(streams: list[Iterator[Batch]]) -> Iterator[Batch]:
    """Merge per-dump-set batch streams into timestamp order.

    Each stream keeps its own order (records may step back slightly in time within one
    capture); streams are interleaved by the running maximum of their timestamps, which is
    monotone, so a plain stable merge is exact.
    """
    heads: list[tuple[Batch, np.ndarray] | None] = [None] * len(streams)
    carry = [np.iinfo(np.int64).min] * len(streams)
    live = list(range(len(streams)))

    def refill(s: int) -> bool:
        for b in streams[s]:
            if len(b):
                key = np.maximum.accumulate(np.maximum(b.ts_ns, carry[s]))
                carry[s] = int(key[-1])
                heads[s] = (b, key)
                return True
        heads[s] = None
        return False

    live = [s for s in live if refill(s)]
    while live:
        if len(live) == 1:
            s = live[0]
            yield heads[s][0]
            live = [s] if refill(s) else []
            continue
        horizon = min(int(heads[s][1][-1]) for s in live)
        keys, owners, pos = [], [], []
        for s in live:
            b, key = heads[s]
            k = int(np.searchsorted(key, horizon, side="right"))
            keys.append(key[:k])
            owners.append(np.full(k, s))
            pos.append(np.arange(k))
        key = np.concatenate(keys)
        own = np.concatenate(owners)
        p = np.concatenate(pos)
        order = np.lexsort((p, own, key))
        own, p = own[order], p[order]
        brk = np.flatnonzero(own[1:] != own[:-1]) + 1
        for a, z in zip(np.append(0, brk), np.append(brk, len(own)), strict=True):
            yield heads[int(own[a])][0].take(p[a:z])
        nxt = []
        for s, kk in zip(live, keys, strict=True):
            b, key = heads[s]
            if len(kk) == len(key):
                if refill(s):
                    nxt.append(s)
            else:
                heads[s] = (b.take(slice(len(kk), None)), key[len(kk) :])
                nxt.append(s)
        live = nxt


def extract(
    sources: list[Source],
    q: Query,
    out: Output,
    stats: Stats,
    warn: Warn,
    progress: Progress | None = None,
) -> None:
    """Write every match of the window to `out`, in timestamp order across dump sets."""
    done = [0]
    total = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], max(total[0], done[0]))

    if progress:
        total[0] = sum(len(s.ds.files_in_window(q.begin_ns, q.end_ns)) for s in sources)
    single = len(sources) == 1
    streams = [source_batches(s, q, stats, warn, tick, single) for s in sources]
    batches = streams[0] if len(streams) == 1 else merge(streams)
    for b in batches:
        out.write(b)
        if out.full:
            break


def list_files(
    sources: list[Source], q: Query, stats: Stats, warn: Warn
) -> list[tuple[str, int]]:
    """Files holding matches and how many; only rows the index cannot decide are read."""
    found: list[tuple[int, str, int]] = []
    for src in sources:
        for sf in src.files(q.begin_ns, q.end_ns, stats):
            c = src.candidates(sf, q.begin_ns, q.end_ns, stats, warn)
            if c is None:
                continue
            sure = int(c.sure.sum())
            rest = _subset(c, ~c.sure) if sure else c
            n = sure + sum(len(b) for b in read_matches(src, rest, stats, warn))
            if n:
                stats.packets_matched += n
                found.append((sf.first_ns, str(sf.pcap.resolve()), n))
    heapq.heapify(found)
    return [(p, n) for _, p, n in sorted(found)]


def elapsed_since(t0: float) -> float:
    return time.monotonic() - t0
