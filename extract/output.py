"""Where extracted packets go: pcap or pcapng, one stream or numbered split files, with caps.

Packets arrive in batches that point into read buffers, so the common case, a pcap copy at the
stored precision without slicing, writes runs of adjacent source records straight from the
buffer and never copies a packet in Python. Slicing, a change of timestamp precision, a
big-endian source or pcapng rewrite the headers (built with numpy) and still pass the packet
bytes by reference.

Writes go out as `Pieces`: (address, length) pairs built with numpy and handed to libc's
writev through ctypes, 1024 at a time. A broad extraction writes a million runs; one Python
object per run (a memoryview slice for os.writev) cost more than the writes themselves.

To a pipe or a socket (stdout into another tool, the extraction service's connection), long
runs of unmodified records go as `FileRuns` instead: sendfile(2) from the source file's page
cache, so the kernel hands the pages on without copying them into the pipe or socket. The
engine then need not read such runs at all (a Batch without `buf`): on the service path that
removes both of the service's copies of every byte, the read and the write. Short runs still
go through writev, where one call carries a thousand of them.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pcapvault.index.pcaplayout import RECORD_HEADER_LEN, global_header

from .outfile import DIR_MODE, OutputError, create, is_stream, write_error, writev_all, writev_table


class SharedBuffers(Protocol):
    """Buffers a dense chunk may be read into so that the output passes it on by reference
    (the extraction service's memory shared with its client, service/shared.py): the only
    hook the engine has for the service."""

    chunk_bytes: int  # the engine cuts shareable plans at this size
    engine_holds: list[bool]  # per buffer: read into, not yet released

    def acquire(self, size: int) -> tuple[int, np.ndarray] | None: ...

    def free_now(self) -> bool: ...

    def release(self, slot: int) -> None: ...


# Mean run length from which a batch goes by sendfile: one call per run must cost less than
# the copy it saves (docs/BENCHMARKS.md, D15), and writev sends a thousand short runs at once.
SEND_MIN_RUN = 64 << 10


@dataclass
class Batch:
    """Selected packets of one source file, in output order.

    `rec` are offsets of the 16-byte record headers in `buf`; the data follows each header.
    With `fd`, `at` are the same records' offsets in the source file open there, so an output
    may send them from the file instead (sendfile); `buf` is None when the engine left them
    unread for that reason (only records copied unmodified, see `copies_raw`).
    """

    buf: np.ndarray | None
    rec: np.ndarray  # int64
    caplen: np.ndarray  # int64
    wirelen: np.ndarray  # int64
    ts_ns: np.ndarray  # int64
    iface: int  # which dump set (pcapng interface)
    nanosecond: bool  # precision of the source timestamps
    raw_ok: bool  # source record headers are little-endian and may be copied as they are
    fd: int | None = None  # the source file, readable through the page cache
    at: np.ndarray | None = None  # int64 file offsets of the records, with `fd`

    def __len__(self) -> int:
        return len(self.rec)

    def take(self, sel: slice | np.ndarray) -> Batch:
        return Batch(
            self.buf,
            self.rec[sel],
            self.caplen[sel],
            self.wirelen[sel],
            self.ts_ns[sel],
            self.iface,
            self.nanosecond,
            self.raw_ok,
            self.fd,
            None if self.at is None else self.at[sel],
        )


def copies_raw(nanosecond: bool, raw_ok: bool, *, pcapng: bool, snap: int | None,
               out_nanosecond: bool) -> bool:
    """Whether records of a source with this precision and byte order go to an output with
    these settings byte for byte (the only records that may be sent straight from the file)."""
    return raw_ok and not pcapng and not snap and nanosecond == out_nanosecond


def _runs(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the records that start and that end a run of adjacent ones."""
    first = np.ones(len(start), bool)
    first[1:] = start[1:] != end[:-1]
    return first, np.append(first[1:], True)


def long_runs(at: np.ndarray, caplen: np.ndarray) -> bool:
    """Whether these records, at these file offsets, form runs long enough for sendfile."""
    if not len(at):
        return False
    end = at + RECORD_HEADER_LEN + caplen
    runs = 1 + int(np.count_nonzero(at[1:] != end[:-1]))
    return int((end - at).sum()) >= runs * SEND_MIN_RUN


@dataclass
class Interface:
    """What a pcapng interface block says about one dump set."""

    name: str
    linktype: int
    snaplen: int
    nanosecond: bool


class Pieces:
    """Memory pieces written in order: `iov` is an (n, 2) uint64 array laid out as
    `struct iovec` (address, length); `keep` holds the arrays the addresses point into.

    len() is the byte count, so code that frames each write (extract/service/framed.py) handles it
    like any other buffer."""

    def __init__(self, iov: np.ndarray, keep: tuple):
        self.iov = iov
        self.keep = keep
        self.total = int(iov[:, 1].sum())

    def __len__(self) -> int:
        return self.total

    @classmethod
    def of(cls, buf: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> Pieces:
        """Ranges of `buf` given by byte offsets and lengths."""
        iov = np.empty((len(offsets), 2), np.uint64)
        iov[:, 0] = offsets
        iov[:, 0] += buf.ctypes.data
        iov[:, 1] = lengths
        return cls(iov, (buf,))

    def write_to(self, fd: int) -> None:
        writev_table(fd, self.iov)


class FileRuns:
    """Runs of a source file written in order with sendfile: (offset, length) pairs.

    len() is the byte count, as for Pieces, so framing handles it like any other buffer."""

    def __init__(self, fd: int, offsets: np.ndarray, lengths: np.ndarray):
        self.fd = fd
        self.offsets = offsets.tolist()
        self.lengths = lengths.tolist()
        self.total = int(lengths.sum())

    def __len__(self) -> int:
        return self.total

    @classmethod
    def of(cls, b: Batch) -> FileRuns:
        start = b.at
        end = b.at + RECORD_HEADER_LEN + b.caplen
        first, last = _runs(start, end)
        return cls(b.fd, start[first], end[last] - start[first])

    def write_to(self, fd: int) -> None:
        for i, (off, n) in enumerate(zip(self.offsets, self.lengths, strict=True)):
            while n:
                try:
                    k = os.sendfile(fd, self.fd, off, n)
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) and i == 0 \
                            and n == self.lengths[0]:
                        self._copy_to(fd)  # this output refuses sendfile: copy instead
                        return
                    raise write_error(e.errno) from None
                if not k:
                    raise OutputError("cannot write the output: the source file ended early")
                off += k
                n -= k

    def _copy_to(self, fd: int) -> None:
        for off, n in zip(self.offsets, self.lengths, strict=True):
            while n:
                data = os.pread(self.fd, min(n, 4 << 20), off)
                if not data:
                    raise OutputError("cannot write the output: the source file ended early")
                writev_all(fd, [data])
                off += len(data)
                n -= len(data)


class Sink:
    """One output stream (a file or stdout) in pcap or pcapng."""

    def __init__(self, fd: int, pcapng: bool, ifaces: list[Interface], snap: int | None):
        self.fd = fd
        self.pcapng = pcapng
        self.ifaces = ifaces
        self.snap = snap
        self.nanosecond = _nanosecond(ifaces)
        self.stream = is_stream(fd)
        self.bytes = 0
        self.packets = 0
        self._write_header()

    def _write(self, bufs: list) -> None:
        """Write buffers, Pieces and FileRuns in order; every call is a whole number of
        records."""
        plain: list = []
        for b in bufs:
            if isinstance(b, Pieces | FileRuns):
                if plain:
                    writev_all(self.fd, plain)
                    plain = []
                b.write_to(self.fd)
            else:
                plain.append(b)
        if plain:
            writev_all(self.fd, plain)
        self.bytes += sum(map(len, bufs))

    def _write_header(self) -> None:
        if not self.pcapng:
            lt = self.ifaces[0].linktype if self.ifaces else 1
            snaplen = max((i.snaplen for i in self.ifaces), default=262144)
            if self.snap:
                snaplen = min(snaplen, self.snap)
            self._write([global_header(lt, snaplen, self.nanosecond)])
            return
        shb_opts = _opt(4, b"pcapvault npcapextract") + _opt_end()
        shb_body = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_opts
        blocks = [_block(0x0A0D0D0A, shb_body)]
        for i in self.ifaces:
            snaplen = min(i.snaplen, self.snap) if self.snap else i.snaplen
            opts = _opt(2, i.name.encode()) + _opt(9, bytes([9 if i.nanosecond else 6]))
            body = struct.pack("<HHI", i.linktype, 0, snaplen) + opts + _opt_end()
            blocks.append(_block(1, body))
        self._write(blocks)

    def record_sizes(self, b: Batch) -> np.ndarray:
        """Bytes each packet of `b` will take in this output."""
        cap = b.caplen if not self.snap else np.minimum(b.caplen, self.snap)
        if self.pcapng:
            return 32 + ((cap + 3) & ~3)
        return RECORD_HEADER_LEN + cap

    def write(self, b: Batch) -> None:
        if not len(b):
            return
        if copies_raw(b.nanosecond, b.raw_ok, pcapng=self.pcapng, snap=self.snap,
                      out_nanosecond=self.nanosecond):
            if b.fd is not None and (b.buf is None or self.stream and long_runs(b.at, b.caplen)):
                self._write([FileRuns.of(b)])
            else:
                self._write_raw(b)
        elif self.pcapng:
            self._write_pcapng(b)
        else:
            self._write_rebuilt(b)
        self.packets += len(b)

    def _write_raw(self, b: Batch) -> None:
        """Copy runs of adjacent records straight from the source."""
        start = b.rec
        end = b.rec + RECORD_HEADER_LEN + b.caplen
        first, last = _runs(start, end)
        self._write([Pieces.of(b.buf, start[first], end[last] - start[first])])

    def _headers(self, b: Batch, cap: np.ndarray) -> np.ndarray:
        sec, frac = np.divmod(b.ts_ns, 1_000_000_000)
        if not self.nanosecond:
            frac //= 1000
        h = np.empty((len(b), 4), dtype="<u4")
        h[:, 0], h[:, 1], h[:, 2], h[:, 3] = sec, frac, cap, b.wirelen
        return h

    def _write_rebuilt(self, b: Batch) -> None:
        cap = b.caplen if not self.snap else np.minimum(b.caplen, self.snap)
        hdrs = self._headers(b, cap)
        n = len(b)
        iov = np.empty((2 * n, 2), np.uint64)
        iov[0::2, 0] = hdrs.ctypes.data + 16 * np.arange(n, dtype=np.uint64)
        iov[0::2, 1] = 16
        iov[1::2, 0] = b.buf.ctypes.data + (b.rec + RECORD_HEADER_LEN).astype(np.uint64)
        iov[1::2, 1] = cap
        self._write([Pieces(iov, (hdrs, b.buf))])

    def _write_pcapng(self, b: Batch) -> None:
        iface = self.ifaces[b.iface]
        cap = b.caplen if not self.snap else np.minimum(b.caplen, self.snap)
        pad = (-cap) & 3
        total = 32 + cap + pad
        units = b.ts_ns if iface.nanosecond else b.ts_ns // 1000
        h = np.empty((len(b), 7), dtype="<u4")
        h[:, 0] = 6
        h[:, 1] = total
        h[:, 2] = b.iface
        h[:, 3] = units >> 32
        h[:, 4] = units & 0xFFFFFFFF
        h[:, 5] = cap
        h[:, 6] = b.wirelen
        # Trailer of packet i: its `pad` zero bytes then the block length, i.e. the last
        # pad + 4 bytes of the pair (0, total).
        tail = np.zeros((len(b), 2), dtype="<u4")
        tail[:, 1] = total
        n = len(b)
        step = np.arange(n, dtype=np.uint64)
        iov = np.empty((3 * n, 2), np.uint64)
        iov[0::3, 0] = h.ctypes.data + 28 * step
        iov[0::3, 1] = 28
        iov[1::3, 0] = b.buf.ctypes.data + (b.rec + RECORD_HEADER_LEN).astype(np.uint64)
        iov[1::3, 1] = cap
        iov[2::3, 0] = tail.ctypes.data + 8 * step + (4 - pad).astype(np.uint64)
        iov[2::3, 1] = pad + 4
        self._write([Pieces(iov, (h, tail, b.buf))])

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
            self.fd = -1


def _nanosecond(ifaces: list[Interface]) -> bool:
    """The output's timestamp precision: nanoseconds as soon as one dump set has them."""
    return any(i.nanosecond for i in ifaces)


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * ((-len(value)) & 3)


def _opt_end() -> bytes:
    return b"\0\0\0\0"


def _block(btype: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


class Output:
    """The whole output: stdout or a file, or numbered split files; applies the caps.

    Nothing is created until the first packet arrives unless `empty_ok` asks for an empty
    capture when nothing matches (-0).
    """

    shared: SharedBuffers | None = None  # read buffers passed on by reference

    def __init__(
        self,
        target: str,
        ifaces: list[Interface],
        *,
        pcapng: bool = False,
        snap: int | None = None,
        split_bytes: int | None = None,
        split_packets: int | None = None,
        max_bytes: int | None = None,
        max_packets: int | None = None,
    ):
        self.target = target
        self.ifaces = ifaces
        self.pcapng = pcapng
        self.snap = snap
        self.split_bytes = split_bytes
        self.split_packets = split_packets
        self.max_bytes = max_bytes
        self.max_packets = max_packets
        self.sink: Sink | None = None
        self.files: list[str] = []
        self.packets = 0
        self.bytes = 0
        self.full = False  # a cap was reached: the caller may stop early
        self._closed_bytes = 0
        # Only stdout is looked at: a named pipe as -o keeps the plain path.
        self.stream = target == "-" and is_stream(1)
        if self.split and target == "-":
            raise OutputError("-P/-N split the output into files: give -o a directory, not -")
        if self.split:
            d = Path(target)
            try:
                d.mkdir(DIR_MODE, parents=True, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create output directory {d}: {e.strerror}") from None

    @property
    def split(self) -> bool:
        return bool(self.split_bytes or self.split_packets)

    @property
    def ext(self) -> str:
        return ".pcapng" if self.pcapng else ".pcap"

    def takes_file_runs(self, nanosecond: bool, raw_ok: bool) -> bool:
        """Whether records of such a source may come unread, to be sent from their file: the
        output is a pipe or socket and copies them unmodified."""
        return self.stream and copies_raw(nanosecond, raw_ok, pcapng=self.pcapng,
                                          snap=self.snap, out_nanosecond=_nanosecond(self.ifaces))

    def _open(self) -> Sink:
        if self.target == "-":
            fd = 1
            name = "-"
        else:
            if self.split:
                name = str(Path(self.target) / f"extract-{len(self.files) + 1:06d}{self.ext}")
            else:
                name = self.target
            fd = create(name)
        self.files.append(name)
        return Sink(fd, self.pcapng, self.ifaces, self.snap)

    def _roll(self) -> Sink:
        if self.sink is not None:
            self._closed_bytes += self.sink.bytes
            self.sink.close()
        self.sink = self._open()
        return self.sink

    def ensure_open(self) -> None:
        if self.sink is None:
            self._roll()

    def reader_gone(self) -> bool:
        """Whether the output's reader has left although nothing was written lately: asked
        between files, so that a query that writes nothing for a while (a filter matching
        little over months of files) stops when its client does. Only an output that knows
        its reader can tell (server/pcap.py's pipe); False otherwise."""
        return False

    def write(self, b: Batch) -> None:
        """Write a batch, honouring the caps and the split sizes."""
        if self.full or not len(b):
            return
        if self.sink is None:
            self._roll()
        sizes = self.sink.record_sizes(b)
        n = len(b)
        if self.max_packets is not None:
            n = min(n, self.max_packets - self.packets)
        if self.max_bytes is not None:
            room = self.max_bytes - self.bytes
            n = min(n, int(np.searchsorted(np.cumsum(sizes), room, side="right")))
        if n < len(b):
            self.full = True
            b, sizes = b.take(slice(0, n)), sizes[:n]
        for part, psize in self._split(b, sizes):
            self.sink.write(part)
            self.packets += len(part)
            self.bytes += int(psize.sum())

    def _split(self, b: Batch, sizes: np.ndarray) -> Iterator[tuple[Batch, np.ndarray]]:
        i = 0
        while i < len(b):
            sink = self.sink
            n = len(b) - i
            if self.split_packets:
                n = min(n, self.split_packets - sink.packets)
            if self.split_bytes:
                room = self.split_bytes - sink.bytes
                fit = int(np.searchsorted(np.cumsum(sizes[i : i + n]), room, side="right"))
                n = min(n, fit)
            if n <= 0:
                if sink.packets == 0:
                    n = 1  # a packet larger than the split size still gets a file of its own
                else:
                    self._roll()
                    continue
            yield b.take(slice(i, i + n)), sizes[i : i + n]
            i += n

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
