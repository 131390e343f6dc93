"""The reader and driver of every query: read the plans' candidates, confirm them with libpcap,
merge dump sets in time order, write them to the output.

A plan (plan.py) comes from either strategy, the flow-table plan (flowplan.py) or the
address-postings plan (postingsplan.py); RequestRun chooses per dump set. A postings plan
does not know its records' timestamps and wire lengths: they are taken from the stored
record headers as the records are read (`_Plan._verify`).

Each file's candidates are planned before they are read, and files are planned ahead of
reading (up to AHEAD_BYTES of planned reads) so the disk works on the next files while the main
thread matches and writes the current one. A plan reads its file one of two ways:

* sparse candidates through the page cache: records closer than GAP bytes share one read
  range, and the ranges are announced to the kernel at once by the read-ahead thread
  (readahead.py), so thousands of scattered reads are served in parallel;
* dense candidates with O_DIRECT, one aligned span per chunk, read by a thread one chunk
  ahead (direct.py): no page-cache work, which dominated the CPU of a broad query.

Chunks of about CHUNK_BYTES keep memory bounded on any file size. Candidates of flow rows the
index decides YES are passed without running the filter (the decision is exact: flowmatch
proves every packet of the row matches, and the tests hold it to libpcap packet by packet);
the others are confirmed by the compiled program, one vectorised call per chunk.

When the output is a pipe or a socket that takes records unmodified (Output.takes_file_runs),
batches of a page-cache plan also carry the file offsets of their records, and a chunk whose
candidates need no filter and lie in long runs is not read at all: the output sends it from
the page cache with sendfile (output.FileRuns), so its bytes never enter this process (only
its record headers are looked at, through a mapping of the file). O_DIRECT plans keep
reading: their bytes are not in the page cache for sendfile to take.

Every candidate's record header is compared with the index before it goes out
(`_Plan._agree`): a record that disagrees would make the output unreadable, so it is skipped
and reported. The comparison of O_DIRECT and unread chunks runs on a thread of its own
(`_checker`), beside the reads and the writes.
"""

from __future__ import annotations

import mmap
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pcapvault.index.directio import ALIGN, align_down, align_up, open_direct
from pcapvault.index.dumpset import StoredFile
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.pcapfile import (
    RECORD_HEADER_LEN,
    PcapReader,
    gather_record_headers,
    headers_disagree,
    timestamps_ns,
)
from pcapvault.index.pcaplayout import snapshot

from . import postingsplan
from .direct import DirectReader, Span, cached
from .flowplan import Source, Stats
from .outfile import ClosedPipe
from .output import Batch, Interface, Output, long_runs
from .plan import FilePlan, Planner, Warn
from .readahead import LOOKAHEAD_BYTES, Job, Prefetcher

if TYPE_CHECKING:
    from .output import SharedBuffers
    from .request import Request

CHUNK_BYTES = 32 << 20
CHUNK_PACKETS = 1 << 18
GAP = 4 << 10
SPLIT_BYTES = 16 << 20  # longest read range: a dense file is read in pieces, not in one go
# O_DIRECT for a file whose page-cache ranges would cover at least this share of the span from
# its first to its last candidate: reading the whole span sequentially then costs little more.
DENSE_SHARE = 4
# ... and whose span is at least this long: a small cluster is better announced early with the
# other files' scattered ranges than read on its own when its turn comes.
DIRECT_MIN_BYTES = 1 << 20
AHEAD_BYTES = LOOKAHEAD_BYTES  # planned but unread bytes before planning stops
AHEAD_FILES = 64

Progress = Callable[[int, int], None]
# _Plan._verify: disagreeing, wire lengths, timestamps, outside the window (None: none)
Checked = tuple[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"]
TakesFileRuns = Callable[[bool, bool], bool]  # Output.takes_file_runs


@dataclass
class Query:
    begin_ns: int
    end_ns: int
    list_only: bool = False


_CHECKER: ThreadPoolExecutor | None = None


def _checker() -> ThreadPoolExecutor:
    """The thread that checks O_DIRECT chunks' record headers (_Plan._check_span)."""
    global _CHECKER
    if _CHECKER is None:
        _CHECKER = ThreadPoolExecutor(1, thread_name_prefix="record-check")
    return _CHECKER


def _arrays(c: FilePlan) -> FilePlan:
    """The plan with numpy arrays (a postings plan comes with lists)."""
    def arr(v, dtype):  # noqa: ANN001, ANN202
        return None if v is None else np.asarray(v, dtype)

    return FilePlan(c.file, arr(c.rec, np.int64), arr(c.caplen, np.int64), arr(c.sure, bool),
                    arr(c.wirelen, np.int64), arr(c.ts_ns, np.int64), arr(c.edge, bool),
                    c.indexed)


def _subset(c: FilePlan, sel: np.ndarray) -> FilePlan:
    def part(v):  # noqa: ANN001, ANN202
        return None if v is None else v[sel]

    return FilePlan(c.file, c.rec[sel], c.caplen[sel], c.sure[sel], part(c.wirelen),
                    part(c.ts_ns), part(c.edge), c.indexed)


def _pick(sel: np.ndarray, *columns: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(col[sel] for col in columns)


def _range_bytes(rec: np.ndarray, end: np.ndarray, new: np.ndarray) -> int:
    """Bytes the ranges starting at `new` cover (what the page-cache path would read)."""
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(rec)) - 1
    return int((end[last] - rec[first]).sum())


def _drop_past_end(c: FilePlan, size: int, warn: Warn) -> FilePlan:
    """A pcap shorter than its index says (a torn tail): keep the complete records.

    The index path has warned already (flowplan compares the file size with the index)."""
    ok = c.rec + RECORD_HEADER_LEN + c.caplen <= size
    if ok.all():
        return c
    if not c.indexed:
        warn(f"{c.file.pcap}: truncated at byte {size}; extracting the complete records before it")
    return _subset(c, ok)


class _Buffers:
    """One read buffer for every chunk when the consumer is done with a batch before asking
    for the next (no fresh pages to fault in each time); a new one per chunk otherwise."""

    def __init__(self, reuse: bool):
        self.reuse = reuse
        self.spare: np.ndarray | None = None

    def get(self, size: int) -> np.ndarray:
        if not self.reuse:
            return np.empty(size, np.uint8)
        if self.spare is None or len(self.spare) < size:
            self.spare = np.empty(max(size, CHUNK_BYTES), np.uint8)
        return self.spare[:size]


class _Plan:
    """The reads of one file's candidates, in chunks: through the page cache with read-ahead
    (sparse candidates) or with O_DIRECT (dense ones, see direct.py)."""

    def __init__(
        self, src: Planner, c: FilePlan, reader: PcapReader, pf: Prefetcher, dr: DirectReader,
        warn: Warn, window: tuple[int, int],
    ):
        self.src = src
        # A postings plan: timestamps and wire lengths come from the records (_verify).
        self.learn = c.ts_ns is None
        self.begin, self.end = window
        self.reader = reader
        self.warn = warn
        self.headers: np.ndarray | None = None  # the file mapped, for unread records' headers
        self.pf = pf
        self.dr = dr
        self.c = c = _drop_past_end(c, reader.size, warn)
        self.job: Job | None = None
        self.direct_fd: int | None = None
        self.send_fd: int | None = None  # for sendfile by the output, opened when needed
        self.spans: dict[int, Span] = {}  # direct reads started, by chunk
        self.checks: dict[int, Future] = {}  # chunks' records checked against the index
        self.unread_chunks: dict[int, bool] = {}  # _unread's answers
        # Whether chunks inside the selection may be read into the client's shared buffers:
        # as far as the plan tells (adjacent records, no filter to run), then with the output.
        self.shareable = False
        self.share = False
        self.cuts: list[int] = []  # chunk k holds candidates cuts[k]:cuts[k + 1]
        self.unread = 0
        n = len(c.rec)
        if not c.indexed or n == 0:
            return
        rec, end = c.rec, c.rec + RECORD_HEADER_LEN + c.caplen
        new = np.ones(n, bool)
        new[1:] = rec[1:] - end[:-1] > GAP
        span = int(end[-1] - rec[0])
        if (
            not reader.compressed
            and span >= DIRECT_MIN_BYTES
            and _range_bytes(rec, end, new) * DENSE_SHARE >= span
            and not cached(reader.path, int(rec[0]), int(end[-1]))
        ):
            self.direct_fd = open_direct(reader.path)
        if self.direct_fd is not None:
            self.shareable = (
                dr.shared is not None
                and not self.learn
                and bool((rec[1:] == end[:-1]).all())
                and self._unfiltered(c.sure)
            )
            # Chunks of contiguous file bytes, a new one every CHUNK_BYTES (or the shared
            # buffers' chunk size) or CHUNK_PACKETS.
            size = dr.shared.chunk_bytes if self.shareable else CHUNK_BYTES
            key = (rec - rec[0]) // size * (n // CHUNK_PACKETS + 1)
            key += np.arange(n) // CHUNK_PACKETS
            cnew = np.ones(n, bool)
            cnew[1:] = key[1:] != key[:-1]
            if self.shareable:
                # Small first and last chunks: a chunk may go to the client's shared buffers
                # only if its read, widened to the alignment, stays inside the selection.
                lo, hi = int(rec[0]), int(end[-1])
                cnew[min(n - 1, int(np.searchsorted(rec, align_down(lo) + ALIGN)))] = True
                cnew[min(n - 1, int(np.searchsorted(end, align_down(hi), "right")))] = True
            self.cuts = [*np.flatnonzero(cnew).tolist(), n]
            self.unread = span
            return
        # Split ranges longer than SPLIT_BYTES at a record boundary.
        seg = (rec - rec[new][np.cumsum(new) - 1]) // SPLIT_BYTES
        new[1:] |= seg[1:] != seg[:-1]
        first = np.flatnonzero(new)
        last = np.append(first[1:], n) - 1
        self.starts = rec[first]
        self.lens = end[last] - rec[first]
        self.rid = np.cumsum(new) - 1
        # Chunks: consecutive ranges, a new chunk every CHUNK_BYTES of reads or CHUNK_PACKETS.
        before = np.cumsum(self.lens) - self.lens
        key = before // CHUNK_BYTES * (n // CHUNK_PACKETS + 1) + first // CHUNK_PACKETS
        cnew = np.ones(len(first), bool)
        cnew[1:] = key[1:] != key[:-1]
        self.chunk_ranges = [*np.flatnonzero(cnew).tolist(), len(first)]
        self.cuts = [int(first[r]) for r in self.chunk_ranges[:-1]] + [n]
        self.unread = int(self.lens.sum())
        if not reader.compressed:
            self.job = pf.submit(reader.path, self.starts.tolist(), self.lens.tolist())

    def close(self) -> None:
        if self.job is not None:
            self.pf.done(self.job)
        for sp in self.spans.values():
            sp.settle()  # its descriptor is about to close
            if sp.slot is not None:
                self.dr.shared.release(sp.slot)
        self.spans.clear()
        self.checks.clear()
        for fd in (self.direct_fd, self.send_fd):
            if fd is not None:
                os.close(fd)
        self.direct_fd = self.send_fd = None
        self.headers = None  # its mapping goes with the last view of it
        self.reader.close()

    def start_direct(self, k: int) -> None:
        """Start reading chunk k with O_DIRECT (no-op when started or not a direct plan)."""
        if self.direct_fd is None or k in self.spans or k + 1 >= len(self.cuts):
            return
        i, j = self.cuts[k], self.cuts[k + 1]
        c = self.c
        stop = int(c.rec[j - 1] + RECORD_HEADER_LEN + c.caplen[j - 1])
        share = self.share and self._inside(int(c.rec[i]), stop)
        span = self.spans[k] = self.dr.read(self.direct_fd, c.file.pcap, int(c.rec[i]), stop,
                                            share)
        self.checks[k] = _checker().submit(self._check_span, span, i, j)

    def _check_span(self, span: Span, i: int, j: int) -> Checked | None:
        """As soon as chunk [i, j) is read, on a thread of its own: _verify. numpy lets go
        of the GIL for it, so the check of a broad query overlaps the main thread's work and
        the next read instead of adding to them. None when the read failed (the main thread
        meets the error itself)."""
        try:
            buf = span.result()
        except BaseException:  # noqa: BLE001 - reported by the main thread
            return None
        return self._verify(buf, self.c.rec[i:j] - span.base, i, j)

    def _verify(self, buf: np.ndarray, local: np.ndarray, i: int, j: int) -> Checked:
        """Candidates [i, j), stored at `local` in `buf`, against their plan: which disagree
        with the index (see _agree), their wire lengths and timestamps, and which lie outside
        the window (None: none do). A flow-table plan knows the lengths and times; a postings
        plan learns them here and knows only the captured length, and its `edge` records are
        kept or dropped by their own timestamp."""
        c, hdr = self.c, self.reader.header
        if not self.learn:
            wire, ts = c.wirelen[i:j], c.ts_ns[i:j]
            return headers_disagree(buf, local, c.caplen[i:j], wire, ts, hdr), wire, ts, None
        h = gather_record_headers(buf, local, hdr.big_endian)
        ts = timestamps_ns(h[:, 0], h[:, 1], hdr.nanosecond)
        bad = h[:, 2] != c.caplen[i:j]
        edge = c.edge[i:j] & ~bad
        outside = edge & ((ts < self.begin) | (ts >= self.end)) if edge.any() else None
        return bad, h[:, 3].astype(np.int64), ts, outside

    def _read_ahead(self, k: int) -> None:
        """Shared chunks from k on into the slots free right now: reads overlap the client's
        writes however their speeds vary (the slots are small, and one read ahead ran dry)."""
        if not self.share:
            return
        shared = self.dr.shared
        for ahead in range(k, min(k + len(shared.engine_holds), len(self.cuts) - 2)):
            if ahead not in self.spans:
                if not shared.free_now():
                    return
                self.start_direct(ahead)

    def _inside(self, start: int, stop: int) -> bool:
        """Whether reading [start, stop) widened to the alignment takes in only bytes of the
        selection (or nothing, past the end of the file): the test for the shared buffers."""
        c = self.c
        lo = int(c.rec[0])
        hi = int(c.rec[-1] + RECORD_HEADER_LEN + c.caplen[-1])
        return align_down(start) >= lo and (align_up(stop) <= hi or hi >= self.reader.size)

    def _sendable(self, takes: TakesFileRuns | None, nanosecond: bool, raw_ok: bool
                  ) -> int | None:
        """A descriptor the output may sendfile this file's records from, or None."""
        if (
            takes is None
            or self.direct_fd is not None
            or self.reader.compressed
            or not takes(nanosecond, raw_ok)
        ):
            return None
        if self.send_fd is None:
            try:
                self.send_fd = os.open(self.reader.path, os.O_RDONLY)
            except OSError:
                return None  # read it as usual; the reader has it open
        return self.send_fd

    def batches(
        self, stats: Stats, bufs: _Buffers, between: Callable[[], None],
        following: Callable[[], _Plan | None], takes: TakesFileRuns | None = None,
    ) -> Iterator[Batch]:
        """The confirmed matches, in capture order, one batch per chunk.

        `following` gives the plan read after this one, whose first O_DIRECT read starts while
        this plan's last chunk is processed. `takes`: the output's takes_file_runs, when its
        batches may come unread (see the module's docstring)."""
        c, src = self.c, self.src
        hdr = self.reader.header
        raw_ok = not hdr.big_endian
        if not c.indexed:
            yield from self._scanned(stats, raw_ok)
            return
        fd = self._sendable(takes, hdr.nanosecond, raw_ok)
        self.share = self.shareable and takes is not None and takes(hdr.nanosecond, raw_ok)
        for k in range(len(self.cuts) - 1):
            i, j = self.cuts[k], self.cuts[k + 1]
            at, cap, sure = c.rec[i:j], c.caplen[i:j], c.sure[i:j]
            if self.direct_fd is not None:
                self.start_direct(k)
                if k + 2 < len(self.cuts):
                    self.start_direct(k + 1)
                    self._read_ahead(k + 2)
                elif (nxt := following()) is not None:
                    nxt.start_direct(0)
                span = self.spans[k]
                buf = span.result()
                local = at - span.base
                size = len(buf)
                checked = self.checks.pop(k).result()
            else:
                span = None
                a, z = self.chunk_ranges[k], self.chunk_ranges[k + 1]
                if fd is not None and self._unread(k):
                    buf, local, size = None, at, self._consume(a, z)  # the output sends it
                    self._check_mapped(k)
                    if k + 2 < len(self.cuts):
                        self._check_mapped(k + 1)  # while the output sends this one
                    elif (nxt := following()) is not None:
                        nxt.check_ahead(takes)
                    checked = self.checks.pop(k).result()
                else:
                    buf, local = self._read(a, z, i, j, bufs)
                    size = len(buf)
                    checked = self._verify(buf, local, i, j)
            self.unread -= size
            bad, wire, ts, outside = checked
            if outside is not None:
                local, at, cap, wire, ts, bad, sure = _pick(~outside, local, at, cap, wire, ts,
                                                            bad, sure)
            good = self._agree(buf, local, at, cap, wire, ts, stats, bad)
            if good is not None:
                local, at, cap, wire, ts, sure = _pick(good, local, at, cap, wire, ts, sure)
            m = None if buf is None else self._confirm(buf, local, cap, wire, sure)
            stats.packets_read += j - i
            stats.bytes_read += size
            sel = slice(None) if m is None else m
            yield Batch(buf, local[sel], cap[sel], wire[sel], ts[sel], src.number,
                        hdr.nanosecond, raw_ok, fd, None if fd is None else at[sel])
            if span is not None:
                del self.spans[k]
                if bufs.reuse:  # the consumer is done with the batch: recycle the buffer
                    self.dr.release(span)
            between()

    def _unread(self, k: int) -> bool:
        """Whether chunk k of a page-cache plan goes to a sendfile output unread: its
        candidates need no filter and lie in long runs."""
        if k + 1 >= len(self.cuts):
            return False
        if k not in self.unread_chunks:
            i, j = self.cuts[k], self.cuts[k + 1]
            c = self.c
            self.unread_chunks[k] = not self.learn and self._unfiltered(c.sure[i:j]) and long_runs(
                c.rec[i:j], c.caplen[i:j])
        return self.unread_chunks[k]

    def check_ahead(self, takes: TakesFileRuns | None) -> None:
        """Start checking this plan's first chunk while the plan before is written, when
        it goes to a sendfile output unread."""
        hdr = self.reader.header
        if self.c.indexed and self._sendable(takes, hdr.nanosecond, not hdr.big_endian) is not None:
            self._check_mapped(0)

    def _check_mapped(self, k: int) -> None:
        """Start checking the record headers of unread chunk k (see _agree) on the checking
        thread, through a mapping of the file that touches only their pages."""
        if k in self.checks or not self._unread(k):
            return
        if self.headers is None:
            self.headers = np.frombuffer(
                mmap.mmap(self.send_fd, self.reader.size, prot=mmap.PROT_READ), np.uint8)
        i, j = self.cuts[k], self.cuts[k + 1]
        self.checks[k] = _checker().submit(self._verify, self.headers, self.c.rec[i:j], i, j)

    def _agree(
        self, buf: np.ndarray | None, local: np.ndarray, at: np.ndarray, cap: np.ndarray,
        wire: np.ndarray, ts: np.ndarray, stats: Stats, bad: np.ndarray,
    ) -> np.ndarray | None:
        """Which candidates' stored headers agree with the index (None: all of them), given
        the disagreeing ones (`bad`, from _verify).

        The output copies stored headers with the index's length of bytes: a record that
        disagrees would make it unreadable, so it is skipped and reported (the result is then
        incomplete). Records left unread for sendfile (`buf` None) were checked through a
        mapping of the file (_check_mapped)."""
        if buf is None:
            buf = self.headers
        hdr = self.reader.header
        if not bad.any():
            return None
        k = np.flatnonzero(bad)
        f = int(k[0])
        got = gather_record_headers(buf, local[f : f + 1], hdr.big_endian)[0]
        stats.damaged_records += len(k)
        self.warn(
            f"{self.c.file.pcap}: {len(k)} record(s) disagree with the index, skipped (first at "
            f"byte {int(at[f])}: captured/wire length {int(got[2])}/{int(got[3])} in the pcap, "
            f"{int(cap[f])}/{int(wire[f])} in the index; npcaprepair repairs the file)"
        )
        return ~bad

    def _read(
        self, a: int, b: int, i: int, j: int, bufs: _Buffers
    ) -> tuple[np.ndarray, np.ndarray]:
        """Read ranges [a, b) into one buffer; the buffer positions of candidates [i, j)."""
        starts, lens = self.starts[a:b], self.lens[a:b]
        base = np.zeros(b - a + 1, np.int64)
        np.cumsum(lens, out=base[1:])
        buf = bufs.get(int(base[-1]))
        mv = memoryview(buf)
        read_into = self.reader.read_into
        for s, ln, o in zip(starts.tolist(), lens.tolist(), base[:-1].tolist(), strict=True):
            if read_into(mv[o : o + ln], s) != ln:
                raise PcapVaultError(f"{self.c.file.pcap}: short read at byte {s}")
        self._consume(a, b)
        r = self.rid[i:j] - a
        return buf, self.c.rec[i:j] - starts[r] + base[r]

    def _consume(self, a: int, b: int) -> int:
        """Ranges [a, b) are done with (read, or left to the output): the read-ahead may move
        on. Their byte count."""
        total = int(self.lens[a:b].sum())
        if self.job is not None:
            self.pf.consumed(self.job, total)
        return total

    def _unfiltered(self, sure: np.ndarray) -> bool:
        """Whether every one of these candidates matches without running the filter."""
        return self.src.filter.matches_everything or bool(sure.all())

    def _confirm(
        self, buf: np.ndarray, local: np.ndarray, cap: np.ndarray, wire: np.ndarray,
        sure: np.ndarray,
    ) -> np.ndarray | None:
        """Which candidates match (None: all of them); only the unsure ones run the filter."""
        if self._unfiltered(sure):
            return None
        flt = self.src.filter
        m = sure.copy()
        u = np.flatnonzero(~sure)
        m[u] = flt.match_many(buf, local[u] + RECORD_HEADER_LEN, cap[u], wire[u])
        return m

    def _scanned(self, stats: Stats, raw_ok: bool) -> Iterator[Batch]:
        """A file without a usable index: its records are in the mapped file already."""
        c, src = self.c, self.src
        arr = self.reader.array()
        nanosecond = self.reader.header.nanosecond
        for i in range(0, len(c.rec), CHUNK_PACKETS):
            s = slice(i, i + CHUNK_PACKETS)
            rec, cap, wire = c.rec[s], c.caplen[s], c.wirelen[s]
            stats.packets_read += len(rec)
            m = self._confirm(arr, rec, cap, wire, c.sure[s])
            if m is None:
                yield Batch(arr, rec, cap, wire, c.ts_ns[s], src.number, nanosecond, raw_ok)
            else:
                yield Batch(arr, rec[m], cap[m], wire[m], c.ts_ns[s][m], src.number,
                            nanosecond, raw_ok)


@dataclass
class _Planned:
    file: StoredFile
    plan: _Plan | None  # None: nothing to read
    sure: int = 0  # candidates known to match and left out of the plan (listing)


class _Pipeline:
    """The files of one dump set in the window, planned ahead of reading them.

    `listing` plans only the candidates the index cannot decide (the others are counted).
    """

    def __init__(self, src: Planner, q: Query, stats: Stats, warn: Warn, listing: bool = False,
                 shared: SharedBuffers | None = None):
        self.src, self.q, self.stats, self.warn = src, q, stats, warn
        self.listing = listing
        self.files = src.files(q.begin_ns, q.end_ns, stats)
        self.next = 0
        self.queue: deque[_Planned] = deque()
        self.pf = Prefetcher()
        self.dr = DirectReader(shared)
        # What planning reads comes first and is small: ask for the first files' now, before
        # any pcap range is queued (a sequential read behind thousands of scattered ones
        # waits). The strategy knows what that is (a postings plan read its indexes already).
        for sf in self.files[:AHEAD_FILES]:
            src.announce(sf)

    def top_up(self) -> None:
        """Plan further files while little is planned and unread."""
        while self.next < len(self.files) and (
            not self.queue
            or (
                len(self.queue) < AHEAD_FILES
                and sum(p.plan.unread for p in self.queue if p.plan) < AHEAD_BYTES
            )
        ):
            self.queue.append(self._plan(self.files[self.next]))
            self.next += 1

    def _plan(self, sf: StoredFile) -> _Planned:
        if self.next + AHEAD_FILES < len(self.files):
            self.src.announce(self.files[self.next + AHEAD_FILES])
        c = self.src.candidates(sf, self.q.begin_ns, self.q.end_ns, self.stats, self.warn)
        if c is None:
            return _Planned(sf, None)
        c = _arrays(c)
        try:
            reader = PcapReader(c.file.pcap)
        except PcapVaultError as e:
            self.warn(f"{c.file.pcap}: unreadable, skipped ({e})")
            self.stats.damaged_files += 1
            return _Planned(sf, None)
        # A damaged header, or a foreign file: tcpdump would read the records as its link
        # type (the filter and the index read the dump set's), and cut those longer than its
        # snapshot length (the index has them whole).
        h = reader.header
        longest = int(c.caplen.max()) if len(c.caplen) else 0
        why = (f"its header gives link type {h.linktype}, the dump set's is "
               f"{self.src.linktype}" if h.linktype != self.src.linktype else
               f"its header's snapshot length {h.snaplen} is below its records' {longest}"
               if longest > snapshot(h.snaplen) else "")
        if why:
            self.warn(f"{c.file.pcap}: unreadable, skipped ({why})")
            self.stats.damaged_files += 1
            reader.close()
            return _Planned(sf, None)
        sure = 0
        if self.listing:
            # Counted unread, so first dropped if the file does not hold them (a pcap cut
            # short, even to nothing, keeps its index's counts).
            c = _drop_past_end(c, reader.size, self.warn)
            decided = c.sure if c.edge is None else c.sure & ~c.edge
            sure = int(decided.sum())
            if sure:
                c = _subset(c, ~decided)
            if not len(c.rec):
                reader.close()
                return _Planned(sf, None, sure)
        try:
            plan = _Plan(self.src, c, reader, self.pf, self.dr, self.warn,
                         (self.q.begin_ns, self.q.end_ns))
        except BaseException:
            reader.close()
            raise
        return _Planned(sf, plan, sure)

    def __iter__(self) -> Iterator[_Planned]:
        try:
            while True:
                self.top_up()
                if not self.queue:
                    return
                p = self.queue[0]
                try:
                    yield p
                finally:
                    self.queue.popleft()
                    if p.plan:
                        p.plan.close()
        finally:
            self.close()

    def close(self) -> None:
        while self.queue:
            p = self.queue.popleft()
            if p.plan:
                p.plan.close()
        self.pf.close()
        self.dr.close()

    def following(self) -> _Plan | None:
        """The plan read after the current one, if planned already."""
        return self.queue[1].plan if len(self.queue) > 1 else None


def source_batches(
    src: Planner, q: Query, stats: Stats, warn: Warn, tick: Callable[[], None], single: bool,
    takes: TakesFileRuns | None = None, shared: SharedBuffers | None = None,
) -> Iterator[Batch]:
    """Every confirmed match of one dump set in the window, in stored order.

    `single`: the consumer is done with each batch before asking for the next, so one read
    buffer serves every chunk. `takes`: as for _Plan.batches. `shared`: buffers the output
    passes on by reference (extraction service), for dense reads that may go there."""
    pipe = _Pipeline(src, q, stats, warn, shared=shared if single else None)
    bufs = _Buffers(single)
    for p in pipe:
        if p.plan is not None:
            for b in p.plan.batches(stats, bufs, pipe.top_up, pipe.following, takes):
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
    sources: list[Planner],
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
        if out.reader_gone():
            raise ClosedPipe("the output's reader has gone")
        if progress:
            progress(done[0], max(total[0], done[0]))

    if progress:
        total[0] = sum(len(s.ds.files_in_window(q.begin_ns, q.end_ns)) for s in sources)
    single = len(sources) == 1
    streams = [source_batches(s, q, stats, warn, tick, single, out.takes_file_runs, out.shared)
               for s in sources]
    batches = streams[0] if len(streams) == 1 else merge(streams)
    for b in batches:
        out.write(b)
        if out.full:
            break


def list_files(
    sources: list[Planner], q: Query, stats: Stats, warn: Warn
) -> list[tuple[str, int]]:
    """Files holding matches and how many; only rows the index cannot decide are read."""
    found: list[tuple[int, str, int]] = []
    bufs = _Buffers(True)
    for src in sources:
        pipe = _Pipeline(src, q, stats, warn, listing=True)
        for p in pipe:
            n = p.sure
            if p.plan is not None:
                n += sum(len(b) for b in p.plan.batches(stats, bufs, pipe.top_up,
                                                        pipe.following))
            if n:
                stats.packets_matched += n
                found.append((p.file.first_ns, str(p.file.pcap.resolve()), n))
    return [(path, n) for _, path, n in sorted(found)]


MakeOutput = Callable[..., Output]  # (interfaces, pcapng=, snap=, caps...) -> Output


class RequestRun:
    """One request through the engine: what npcapextract, npcapextractd and npcapserve all
    run, so that a result is the same by construction whichever way it was asked. The caller
    chooses where the output goes (`make_output`) and keeps `out` to close it or count what
    left.

    Each dump set is planned from its address postings where they can plan it exactly, else
    from its flow tables (`postings=False`: the caller tried the postings already)."""

    def __init__(self, req: Request, sources: list[Source], stats: Stats, warn: Warn,
                 postings: bool = True):
        if not req.pcapng and len({s.linktype for s in sources}) > 1:
            raise PcapVaultError(
                "the dump sets have different link types; use --pcapng to combine them"
            )
        self.req, self.stats, self.warn = req, stats, warn
        self.sources: list[Planner] = [
            self._strategy(s) if postings else s for s in sources
        ]
        self.query = Query(req.begin_ns, req.end_ns, req.list_only)
        self.out: Output | None = None

    def _strategy(self, src: Source) -> Planner:
        pp = postingsplan.plan(src.target, self.req.begin_ns, self.req.end_ns)
        return src if pp is None else postingsplan.PostingsSource(src.path, src.number, pp)

    def listing(self) -> list[tuple[str, int]]:
        """-l: the files holding matches and how many."""
        return list_files(self.sources, self.query, self.stats, self.warn)

    def write(self, make_output: MakeOutput, progress: Progress | None = None) -> Output:
        """Every match into the output `make_output` builds for these dump sets."""
        r = self.req
        ifaces = [Interface(f"{s.interface} ({s.path})", s.linktype, s.snaplen, s.nanosecond)
                  for s in self.sources]
        self.out = out = make_output(ifaces, pcapng=r.pcapng, snap=r.snaplen,
                                     split_bytes=r.split_bytes, split_packets=r.split_packets,
                                     max_bytes=r.max_bytes, max_packets=r.max_packets)
        extract(self.sources, self.query, out, self.stats, self.warn, progress)
        if r.empty and out.sink is None:
            out.ensure_open()
        return out
