"""Classic libpcap file primitives shared by the recorder, the indexer and extraction.

Everything that needs to know the byte layout of a classic pcap lives here, so that the
recorder, the indexer and the extractor agree on it. Reading accepts both byte orders and both
timestamp precisions because `npcapindex` must index pcaps written by other tools; writing
always produces the little-endian version 2.4 files described in docs/FORMAT.md.

The record walk (`locate_records`, `scan_records`) is the one inherently sequential step of
indexing: each record's position depends on the previous record's length. It therefore only
follows lengths (many segments of a large file in lockstep, verified to form the one true
chain); every other header field is gathered afterwards with vectorised numpy operations.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .compressed import CompressedReader, is_compressed
from .errors import FormatError
from .pcaplayout import (
    _HEADER,
    GLOBAL_HEADER_LEN,
    LINKTYPE_MASK,
    MAGIC_NS,
    MAGIC_US,
    MAX_CAPLEN,
    RECORD_HEADER_LEN,
    global_header,
    record_header,
)

_MAGIC_MODIFIED = 0xA1B2CD34  # Kuznetzov's patched libpcap: longer record headers
_MAGIC_PCAPNG = 0x0A0D0D0A

# Whole-file readers touch every page, so they map them all at once. (On a cached file a fault
# per page measures no slower today: docs/BENCHMARKS.md, D18.)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

# Record header, as one 16-byte item so that a batch of them is gathered with one numpy call.
_REC_DTYPE = np.dtype((np.void, RECORD_HEADER_LEN))


def pcap_bytes(
    packets: Iterable[tuple[int, bytes] | tuple[int, bytes, int]],
    linktype: int = 1,
    snaplen: int = MAX_CAPLEN,
    nanosecond: bool = True,
) -> bytes:
    """A whole little-endian pcap holding `packets`: (ts_ns, frame[, wire length]) tuples."""
    parts = [global_header(linktype, snaplen, nanosecond)]
    for ts_ns, frame, *wire in packets:
        parts.append(record_header(ts_ns, len(frame), wire[0] if wire else len(frame), nanosecond))
        parts.append(bytes(frame))
    return b"".join(parts)


@dataclass(frozen=True)
class PcapHeader:
    """What a pcap's global header says about how to read its records."""

    nanosecond: bool
    linktype: int
    snaplen: int
    big_endian: bool = False
    version: tuple[int, int] = (2, 4)

    @property
    def byteorder(self) -> str:
        """numpy/struct byte-order character for this file's integers."""
        return ">" if self.big_endian else "<"


def parse_global_header(data: bytes, name: str) -> PcapHeader:
    """Decode a pcap global header, or explain in one line why the file is not usable."""
    if len(data) == 0:
        raise FormatError(f"{name}: empty file, not a pcap")
    if len(data) < 4:
        raise FormatError(f"{name}: not a pcap file (only {len(data)} bytes)")
    for order in ("<", ">"):
        (magic,) = struct.unpack_from(order + "I", data)
        if magic in (MAGIC_US, MAGIC_NS):
            break
    else:
        magics = struct.unpack_from("<I", data) + struct.unpack_from(">I", data)
        if _MAGIC_PCAPNG in magics:
            raise FormatError(
                f"{name}: pcapng is not supported; convert it with 'editcap -F pcap'"
            )
        if _MAGIC_MODIFIED in magics:
            raise FormatError(f"{name}: modified (Kuznetzov) pcap format is not supported")
        raise FormatError(f"{name}: not a pcap file (magic 0x{data[:4].hex()})")
    if len(data) < GLOBAL_HEADER_LEN:
        raise FormatError(f"{name}: truncated pcap header ({len(data)} of 24 bytes)")
    _, major, minor, _, _, snaplen, linktype = struct.unpack_from(
        order + _HEADER.format[1:], data
    )
    if major != 2 or minor > 4:
        # libpcap refuses minor versions above 4 too: tcpdump would not read such a file.
        raise FormatError(f"{name}: unsupported pcap version {major}.{minor} (need 2.4 or older)")
    return PcapHeader(
        nanosecond=magic == MAGIC_NS,
        linktype=linktype & LINKTYPE_MASK,
        snaplen=snaplen,
        big_endian=order == ">",
        version=(major, minor),
    )


@dataclass
class RecordTable:
    """Where the complete records of a pcap are, with their header fields as columns."""

    offset: np.ndarray  # uint64: offset of each 16-byte record header
    ts_ns: np.ndarray  # int64: nanoseconds since the epoch
    caplen: np.ndarray  # uint32
    wirelen: np.ndarray  # uint32
    complete_end: int  # byte offset just after the last complete record
    torn: bool  # bytes after complete_end: a partial record or a corrupt length

    def __len__(self) -> int:
        return len(self.offset)


def as_bytes_array(buf: bytes | bytearray | memoryview | mmap.mmap | np.ndarray) -> np.ndarray:
    """View any byte buffer as a flat uint8 array without copying."""
    if isinstance(buf, np.ndarray):
        return buf.reshape(-1).view(np.uint8)
    return np.frombuffer(buf, dtype=np.uint8)


def walk_offsets(arr: np.ndarray, start: int, end: int, big_endian: bool) -> np.ndarray:
    """Offsets of the records chained from `start` (int64).

    The chain is followed until no further record header fits before `end`; it may end with
    records that are incomplete or have an absurd caplen (anything after the first such record
    is meaningless): the caller validates the lengths it gathers, vectorised.

    Small buffers are walked by a plain loop. Large ones are cut into segments walked in
    lockstep by many vectorised walkers, each started at a plausible record header found near
    its segment start; a segment is only accepted when the walker of the previous accepted
    segment lands exactly on its start, so the result is the serial chain, whatever the data.
    """
    unpack = struct.Struct(">I" if big_endian else "<I").unpack_from
    head, nxt = _walk_serial(arr, start, end, unpack, _SAMPLE_RECORDS)
    if len(head) < _SAMPLE_RECORDS or nxt > end - RECORD_HEADER_LEN:
        return np.array(head, dtype=np.int64)
    sample = np.array(head, dtype=np.int64)
    fields = gather_record_headers(arr, sample, big_endian)
    if (fields[:, 2] > MAX_CAPLEN).any():
        return sample
    return np.concatenate(
        (sample, _walk_parallel(arr, nxt, end, big_endian, fields, _MAX_RESYNCS))
    )


# Records walked serially before going parallel; they also size the segments.
_SAMPLE_RECORDS = 256
# Records per parallel walker: fewer means more walkers per numpy call, but more segment
# starts to search for, and past a few thousand walkers every step touches more pages than
# the TLB holds (docs/BENCHMARKS.md, D11).
_RECORDS_PER_SEGMENT = 512
_MIN_SEGMENTS = 16
# A wrong segment start costs a restart of the parallel walk; past this many, walk serially.
_MAX_RESYNCS = 8
# Below this many active walkers, the rest of their segments is walked serially.
_MIN_WALKERS = 32


def _walk_serial(
    arr: np.ndarray, o: int, end: int, unpack: Callable[..., tuple[int]], limit: int | None
) -> tuple[list[int], int]:
    """Follow the chain one record at a time: (offsets, offset after the last one)."""
    last = end - RECORD_HEADER_LEN
    offsets: list[int] = []
    append = offsets.append
    if limit is None:
        while o <= last:
            append(o)
            o += RECORD_HEADER_LEN + unpack(arr, o + 8)[0]
    else:
        for _ in range(limit):
            if o > last:
                break
            append(o)
            o += RECORD_HEADER_LEN + unpack(arr, o + 8)[0]
    return offsets, o


def _u32_view(arr: np.ndarray, big_endian: bool) -> np.ndarray:
    """uint32 at every byte position (unaligned, zero-copy)."""
    dtype = ">u4" if big_endian else "<u4"
    return np.ndarray((max(len(arr) - 3, 0),), dtype=dtype, buffer=arr, strides=(1,))


def _walk_parallel(
    arr: np.ndarray, start: int, end: int, big_endian: bool, sample: np.ndarray, resyncs: int
) -> np.ndarray:
    """The chain from `start` (a record header), walked by lockstep walkers; see walk_offsets.

    `sample` holds the header fields of records seen before, to recognise plausible headers.
    """
    unpack = struct.Struct(">I" if big_endian else "<I").unpack_from
    sizes = sample[:, 2].astype(np.int64) + RECORD_HEADER_LEN
    seg_len = int(sizes.mean() * _RECORDS_PER_SEGMENT)
    window = min(int(sizes.max() * 1.25) + 64, seg_len - RECORD_HEADER_LEN)
    nseg = (end - start) // max(seg_len, 1)
    if resyncs <= 0 or nseg < _MIN_SEGMENTS or window <= 0:
        return np.array(_walk_serial(arr, start, end, unpack, None)[0], dtype=np.int64)
    starts = _segment_starts(arr, start, seg_len, nseg, window, end, big_endian, sample)
    positions, walker, final, bad = _lockstep(arr, starts, end, big_endian)
    # Walker i is on the true chain if walker i-1 was and ended exactly on starts[i].
    ok = ~bad[:-1] & (final[:-1] == starts[1:])
    if ok.all():
        return np.sort(positions)
    first = int(np.argmin(ok))
    chain = np.sort(positions[walker <= first])
    if bad[first]:
        return chain  # the chain really ends (or turns to garbage) in this segment
    # starts[first + 1] was not a record header: go on from where walker `first` stopped.
    rest = _walk_parallel(arr, int(final[first]), end, big_endian, sample, resyncs - 1)
    return np.concatenate((chain, rest))


def _segment_starts(
    arr: np.ndarray,
    start: int,
    seg_len: int,
    nseg: int,
    window: int,
    end: int,
    big_endian: bool,
    sample: np.ndarray,
) -> np.ndarray:
    """`start` followed by, for each further segment, the first plausible record header in the
    `window` bytes at its beginning (segments where none is found are merged into the previous
    one). Plausible means: seconds close to the sample's, valid fraction and lengths, and the
    next two records plausible as well."""
    bounds = start + seg_len * np.arange(1, nseg, dtype=np.int64)
    # The median resists a few garbage headers in the sample; a file spanning longer than the
    # allowed range only loses segment starts (slower, never wrong).
    sec_mid = int(np.median(sample[:, 0]))
    sec_lo, sec_hi = sec_mid - 86400, sec_mid + 7 * 86400
    # Cheap first filter, one byte per position (fast contiguous uint8 compares): the most
    # significant byte of the seconds, which changes every 194 days.
    top = np.ndarray(
        (nseg - 1, window), dtype=np.uint8, buffer=arr,
        offset=int(bounds[0]) + (0 if big_endian else 3), strides=(seg_len, 1),
    )
    top_lo = max(sec_lo, 0) >> 24
    hits = np.flatnonzero((top - np.uint8(top_lo)) <= np.uint8((sec_hi >> 24) - top_lo))
    seg, col = np.divmod(hits, window)
    cand = bounds[seg] + col
    u32 = _u32_view(arr, big_endian)
    ok = np.ones(len(cand), dtype=bool)
    q = cand
    for _ in range(3):
        inside = q + RECORD_HEADER_LEN <= end
        qq = np.where(inside, q, start)
        sec = u32[qq].astype(np.int64)
        caplen = u32[qq + 8].astype(np.int64)
        wirelen = u32[qq + 12]
        ok &= (
            inside
            & (sec >= sec_lo)
            & (sec <= sec_hi)
            & (u32[qq + 4] < 1_000_000_000)
            & (caplen <= MAX_CAPLEN)
            & (caplen <= wirelen)
        )
        q = q + RECORD_HEADER_LEN + caplen
    seg = seg[ok]
    first = np.flatnonzero(np.diff(seg, prepend=-1) != 0)  # candidates are in (seg, col) order
    return np.concatenate(([start], cand[ok][first]))


def _lockstep(
    arr: np.ndarray, starts: np.ndarray, end: int, big_endian: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Walk every segment at once: (positions, walker of each, where each stopped, stopped
    on a bad record). Walker i stops on reaching starts[i + 1] (the last one: the end)."""
    caplen_at = _u32_view(arr, big_endian)[8:]
    k = len(starts)
    limit = np.append(starts[1:], end - RECORD_HEADER_LEN + 1)
    pos = starts.copy()
    wid = np.arange(k, dtype=np.int32)
    final = np.zeros(k, dtype=np.int64)
    bad = np.zeros(k, dtype=bool)
    out_pos: list[np.ndarray] = []
    out_wid: list[np.ndarray] = []
    while len(pos) >= _MIN_WALKERS:
        caplen = caplen_at[pos].astype(np.int64)
        out_pos.append(pos)
        out_wid.append(wid)
        nxt = pos + caplen
        nxt += RECORD_HEADER_LEN
        stop = nxt >= limit
        stop |= caplen > MAX_CAPLEN
        if stop.any():
            stopped = wid[stop]
            final[stopped] = nxt[stop]
            bad[stopped] = (caplen[stop] > MAX_CAPLEN) | (nxt[stop] > end)
            keep = ~stop
            pos, wid, limit = nxt[keep], wid[keep], limit[keep]
        else:
            pos = nxt
    # A few long segments left (merged after failed syncs): numpy calls would cost more per
    # record than a plain loop.
    unpack = struct.Struct(">I" if big_endian else "<I").unpack_from
    for p, w, lim in zip(pos.tolist(), wid.tolist(), limit.tolist(), strict=True):
        rest, final[w], bad[w] = _walk_serial_until(arr, p, lim, end, unpack)
        out_pos.append(np.array(rest, dtype=np.int64))
        out_wid.append(np.full(len(rest), w, dtype=np.int32))
    return np.concatenate(out_pos), np.concatenate(out_wid), final, bad


def _walk_serial_until(
    arr: np.ndarray, o: int, limit: int, end: int, unpack: Callable[..., tuple[int]]
) -> tuple[list[int], int, bool]:
    """One walker of `_lockstep`, serially: (offsets, where it stopped, on a bad record)."""
    offsets: list[int] = []
    append = offsets.append
    while True:
        append(o)
        caplen = unpack(arr, o + 8)[0]
        o += RECORD_HEADER_LEN + caplen
        if o >= limit or caplen > MAX_CAPLEN:
            return offsets, o, caplen > MAX_CAPLEN or o > end


def gather_bytes(arr: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """(n, width) copy of the bytes at each position, zero-padded past the buffer end."""
    pos = np.asarray(pos, dtype=np.int64)
    safe = pos <= len(arr) - width
    if safe.all():
        return sliding_window_view(arr, width)[pos]
    rows = np.zeros((len(pos), width), dtype=np.uint8)
    if len(arr) >= width:
        rows[safe] = sliding_window_view(arr, width)[pos[safe]]
    for i in np.flatnonzero(~safe).tolist():  # only records in the last `width` bytes
        tail = arr[int(pos[i]) : int(pos[i]) + width]
        rows[i, : len(tail)] = tail
    return rows


def gather_record_headers(arr: np.ndarray, offsets: np.ndarray, big_endian: bool) -> np.ndarray:
    """The four uint32 header fields (sec, frac, caplen, wirelen) of records at `offsets`."""
    if len(offsets) == 0:
        return np.zeros((0, 4), dtype=np.uint32)
    items = np.ndarray(
        shape=(len(arr) - RECORD_HEADER_LEN + 1,), dtype=_REC_DTYPE, buffer=arr, strides=(1,)
    )
    raw = items[offsets].view(">u4" if big_endian else "<u4").reshape(-1, 4)
    return raw if not big_endian else raw.astype(np.uint32)


def headers_disagree(
    arr: np.ndarray, at: np.ndarray, caplen: np.ndarray, wirelen: np.ndarray,
    ts_ns: np.ndarray, header: PcapHeader,
) -> np.ndarray:
    """Which records at offsets `at` of `arr` have a header other than the index says.

    Why: output copies the stored header with the index's length of bytes, so a record whose
    header disagrees (a flipped bit, an index of another file) would make the output
    unreadable. One gather per batch of records; offsets must leave room for a header."""
    h = gather_record_headers(arr, at, header.big_endian)
    if sys.byteorder == "little":
        # As two uint64 per record: (sec, frac) and (caplen, wirelen) pairs, fewer passes.
        h = h.view(np.uint64)
        pair = np.asarray(wirelen, np.int64) << 32
        pair |= caplen
        bad = h[:, 1] != pair.view(np.uint64)
        ts = (h[:, 0] & np.uint64(0xFFFFFFFF)).view(np.int64) * 1_000_000_000
        frac = (h[:, 0] >> np.uint64(32)).view(np.int64)
        ts += frac if header.nanosecond else frac * 1000
    else:
        bad = (h[:, 2] != caplen) | (h[:, 3] != wirelen)
        ts = timestamps_ns(h[:, 0], h[:, 1], header.nanosecond)
    bad |= ts != ts_ns
    return bad


@dataclass
class RecordLocations:
    """Where the complete records of a pcap are: what the record walk alone can tell."""

    offset: np.ndarray  # int64: offset of each 16-byte record header
    caplen: np.ndarray  # int64
    complete_end: int  # byte offset just after the last complete record
    torn: bool  # bytes after complete_end: a partial record or a corrupt length

    def __len__(self) -> int:
        return len(self.offset)


def locate_records(
    buf: bytes | bytearray | memoryview | mmap.mmap | np.ndarray,
    header: PcapHeader,
    start: int = GLOBAL_HEADER_LEN,
    end: int | None = None,
) -> RecordLocations:
    """Walk the records of an in-memory pcap without reading any other header field.

    Captured lengths come for free: within the chain each record ends where the next begins.
    A record whose caplen exceeds MAX_CAPLEN or runs past the end stops the walk: what follows
    is a torn or corrupt tail, reported through `torn` and `complete_end`. Never raises.
    """
    arr = as_bytes_array(buf)
    end = len(arr) if end is None else min(end, len(arr))
    offsets = walk_offsets(arr, start, end, header.big_endian)
    caplen = np.empty(len(offsets), dtype=np.int64)
    if len(offsets):
        np.subtract(offsets[1:], offsets[:-1] + RECORD_HEADER_LEN, out=caplen[:-1])
        caplen[-1] = struct.unpack_from(header.byteorder + "I", arr, int(offsets[-1]) + 8)[0]
    bad = (caplen > MAX_CAPLEN) | (offsets + RECORD_HEADER_LEN + caplen > end)
    stop = int(np.argmax(bad)) if bad.any() else len(offsets)
    offsets, caplen = offsets[:stop], caplen[:stop]
    complete_end = int(offsets[-1] + RECORD_HEADER_LEN + caplen[-1]) if stop else min(start, end)
    return RecordLocations(offsets, caplen, complete_end, complete_end < end)


def scan_records(
    buf: bytes | bytearray | memoryview | mmap.mmap | np.ndarray,
    header: PcapHeader,
    start: int = GLOBAL_HEADER_LEN,
    end: int | None = None,
) -> RecordTable:
    """Every complete record of an in-memory pcap with its header fields; never raises.

    See `locate_records` for how the walk ends on a torn or corrupt tail.
    """
    arr = as_bytes_array(buf)
    loc = locate_records(arr, header, start, end)
    fields = gather_record_headers(arr, loc.offset, header.big_endian)
    return RecordTable(
        offset=loc.offset.astype(np.uint64),
        ts_ns=timestamps_ns(fields[:, 0], fields[:, 1], header.nanosecond),
        caplen=loc.caplen.astype(np.uint32),
        wirelen=np.ascontiguousarray(fields[:, 3], dtype=np.uint32),
        complete_end=loc.complete_end,
        torn=loc.torn,
    )


def timestamps_ns(sec: np.ndarray, frac: np.ndarray, nanosecond: bool) -> np.ndarray:
    """Combine record header seconds and fractions into int64 nanoseconds.

    Seconds are unsigned (valid until 2106), as current libpcap reads them.
    """
    ts = sec.astype(np.int64) * 1_000_000_000
    ts += frac.astype(np.int64) if nanosecond else frac.astype(np.int64) * 1000
    return ts


class PcapReader:
    """An open pcap, plain or compressed (`.pcap.zst`): header, whole-file bytes, positioned reads.

    One class for every source, so extraction, the index builder, repair and replay read both
    kinds the same way; offsets are always positions in the uncompressed pcap. A plain file is
    memory-mapped and `array()` is a zero-copy uint8 view of it; a compressed one is
    decompressed whole for `array()` and frame by frame for `pread`/`read_into`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._z: CompressedReader | None = None
        self._fd = -1
        if is_compressed(self.path):
            try:
                self._z = CompressedReader(self.path)
            except OSError as e:
                raise FormatError(f"{self.path}: cannot open: {e.strerror}") from None
            self.size = self._z.size
            try:
                self.header = parse_global_header(self._z.pread(0, GLOBAL_HEADER_LEN),
                                                  str(self.path))
            except FormatError:
                self.close()
                raise
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open: {e.strerror}") from None
        self._fd = fd
        try:
            self.size = os.fstat(fd).st_size
            self.header = parse_global_header(os.pread(fd, GLOBAL_HEADER_LEN, 0), str(self.path))
        except OSError as e:
            self.close()
            raise FormatError(f"{self.path}: cannot read: {e.strerror}") from None
        except FormatError:
            self.close()
            raise

    @property
    def compressed(self) -> bool:
        return self._z is not None

    def array(self) -> np.ndarray:
        """The whole file as a read-only uint8 array (memory-mapped when plain)."""
        if self._z is not None:
            return np.frombuffer(self._z.read_all(), dtype=np.uint8)
        if self._map is None:
            try:
                self._map = mmap.mmap(
                    self._fd, self.size, flags=mmap.MAP_SHARED | _MAP_POPULATE, prot=mmap.PROT_READ
                )
            except OSError as e:
                raise FormatError(f"{self.path}: cannot map: {e.strerror}") from None
        return np.frombuffer(self._map, dtype=np.uint8)

    def pread(self, offset: int, size: int) -> bytes:
        """Read `size` bytes at `offset` (fewer at the end of the file)."""
        if self._z is not None:
            return self._z.pread(offset, size)
        try:
            return os.pread(self._fd, size, offset)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror}") from None

    def read_into(self, view: memoryview, offset: int) -> int:
        """Fill `view` from `offset` without an intermediate copy; return the bytes read."""
        if self._z is not None:
            data = self._z.pread(offset, len(view))
            view[: len(data)] = data
            return len(data)
        try:
            return os.preadv(self._fd, [view], offset)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror}") from None

    def scan(self) -> RecordTable:
        """The record table of the whole file."""
        return scan_records(self.array(), self.header)

    def close(self) -> None:
        """Release the file; a mapping still referenced by arrays is freed with them."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views still alive: the mapping goes away with the last of them
            self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._z is not None:
            self._z.close()
            self._z = None

    def __enter__(self) -> PcapReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
