"""The numpy-free side of the `.pcap.idx` file: its header and its address postings.

A host query (`host 10.0.0.51`) can go straight from the index to the pcap records of that
address: the postings directory names, for every address, the small compressed frame that
holds the offsets and lengths of its packets (those it sent, then those it received), and
its block time table tells which of them a time window keeps. That path must answer before
numpy could even be imported (docs/BENCHMARKS.md, D10), so the header, the directory and the
frames are read here with the standard library only; `indexfile` (numpy) re-exports the
header pieces and writes what this reads.

docs/FORMAT.md ("Index files") is the contract.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate
from operator import add

from .errors import FormatError
from .zstdlib import zstd

MAGIC = b"PVIDX\x00\r\n"
VERSION = 5
# Version 1 differs from 2 only in recording no addresses for ARP/RARP rows, which later
# readers take as "addresses unknown"; version 2 has no postings, version 3 no per-flow
# totals, version 4 no time bins. All still read, never rewritten.
READABLE_VERSIONS = (1, 2, 3, 4, 5)
FIRST_POSTINGS_VERSION = 3
FIRST_TOTALS_VERSION = 4  # the summary's per-flow wire bytes, first and last timestamp
FIRST_BINS_VERSION = 5  # the directory's packets and wire bytes per time bin
HEADER_LEN = 80
HEADER_LEN_V2 = 64  # versions 1 and 2
# magic, version, flags, linktype, count, first_ns, last_ns, pcap_size,
# nflows, summary_len, packets_len, crc
_HEADER_V2 = struct.Struct("<8sHHIQqqQIIII")
# directory_len, keys, frames_len, directory_crc
_HEADER_V3 = struct.Struct("<IIII")
CRC_AT = 60
HEADER_FLAG_NS = 1

# Postings layout (FORMAT.md "Address postings").
KEY_LEN = 40
KEY_SORT_LEN = 20  # address, ethertype, key flags: what keys are sorted and found by
FRAME_ENTRY_LEN = 16
BLOCK_ENTRY_LEN = 24  # first record offset, minimum and maximum timestamp
# The packets of a file, in pcap order, are cut into blocks of this many for the block time
# table: what tells a reader which postings a time window keeps, without timestamps in them.
BLOCK = 1024
# Lists are packed into frames of at least this many entries; a longer list gets a frame of
# its own, so a small list never costs the decompression of a large one.
FRAME_ENTRIES = 8192
KEY_UNKNOWN = 0x0001  # key flag: the list of packets whose addresses were not captured
LENGTH_WIDTHS = (2, 4)  # bytes of a frame's record lengths: u16 when every length fits
LINKTYPE_ETHERNET = 1
# The ethertypes whose addresses `host ADDR` compares on Ethernet: IPv4, ARP, RARP, IPv6.
POSTED_ETHERTYPES = (0x0800, 0x0806, 0x8035, 0x86DD)

# First read of Postings.read: header and directory of all but the largest files at once.
READ_AHEAD = 256 * 1024

# Time bins (FORMAT.md "Time bins"): whole seconds, or a power of two of them when a file
# spans more than MAX_BINS seconds, so the table stays small whatever the file's span.
MAX_BINS = 4096
BINS_ENTRY_LEN = 16
NS = 1_000_000_000

_KEY_TAIL = struct.Struct("<IIII")  # count, sources, frame, first
_FRAME_ENTRY = struct.Struct("<QII")  # offset, compressed length, entries
_BLOCK_ENTRY = struct.Struct("<Qqq")  # first record offset, min and max timestamp
_TYPECODES = {2: "H", 4: "I" if array("I").itemsize == 4 else "L", 8: "Q"}
_SWAP = sys.byteorder != "little"


@dataclass(frozen=True)
class IndexHeader:
    """The fixed header (64 bytes in versions 1 and 2, 80 from version 3 on), decoded.

    Versions without postings read as having an empty postings region.
    """

    version: int
    nanosecond: bool
    linktype: int
    count: int
    first_ns: int
    last_ns: int
    pcap_size: int
    nflows: int
    summary_len: int
    packets_len: int
    crc: int
    directory_len: int = 0
    keys: int = 0
    frames_len: int = 0
    directory_crc: int = 0

    @property
    def header_len(self) -> int:
        return HEADER_LEN if self.version >= FIRST_POSTINGS_VERSION else HEADER_LEN_V2

    @property
    def summary_offset(self) -> int:
        return self.header_len + self.directory_len

    @property
    def packets_offset(self) -> int:
        return self.summary_offset + self.summary_len

    @property
    def frames_offset(self) -> int:
        """Where the postings frames start; also the end of what the header CRC covers."""
        return self.packets_offset + self.packets_len

    @property
    def file_size(self) -> int:
        return self.frames_offset + self.frames_len

    @property
    def blocks(self) -> int:
        """Entries of the block time table: one per BLOCK packets (none before version 3)."""
        if self.version < FIRST_POSTINGS_VERSION:
            return 0
        return -(-self.count // BLOCK)

    @property
    def frame_count(self) -> int:
        """Entries of the frame table (valid once `check_directory` passed)."""
        return self.frame_table_len // FRAME_ENTRY_LEN

    @property
    def blocks_at(self) -> int:
        """Where the block time table starts within the directory."""
        return KEY_LEN * self.keys + self.frame_table_len

    @property
    def frame_table_len(self) -> int:
        """Bytes of the frame table: the directory less the keys, the time blocks and the
        time bins."""
        return (self.directory_len - KEY_LEN * self.keys - BLOCK_ENTRY_LEN * self.blocks
                - self.bins_len)

    @property
    def offset_width(self) -> int:
        """Bytes of a record offset in the postings frames: 4 for a pcap under 4 GiB."""
        return offset_width(self.pcap_size)

    @property
    def bins(self) -> int:
        """Time bins in the directory (none before version 5, nor without packets)."""
        if self.version < FIRST_BINS_VERSION or not self.count:
            return 0
        return time_bins(self.first_ns, self.last_ns)[2]

    @property
    def bins_at(self) -> int:
        """Where the time-bin table (its head entry, then the bins) starts in the directory."""
        return self.blocks_at + BLOCK_ENTRY_LEN * self.blocks

    @property
    def bins_len(self) -> int:
        """Bytes of the time-bin table: a head entry and one entry per bin."""
        return BINS_ENTRY_LEN * (self.bins + 1) if self.bins else 0


def time_bins(first_ns: int, last_ns: int) -> tuple[int, int, int]:
    """(start, width, count) of the time bins of packets from `first_ns` to `last_ns`:
    the first bin's start and the width in seconds, bins aligned on multiples of the width
    since the epoch. The width is the smallest power of two that needs at most MAX_BINS."""
    lo, hi = first_ns // NS, last_ns // NS
    width = 1
    while hi // width - lo // width >= MAX_BINS:
        width *= 2
    return lo // width * width, width, hi // width - lo // width + 1


def parse_header(data: bytes, name: str) -> IndexHeader:
    """Decode the header; the version is checked before anything else is interpreted, so a
    newer format may change everything after it and still get the version message."""
    if len(data) < 10 or data[:8] != MAGIC:
        if len(data) < 8 and MAGIC.startswith(data):
            raise FormatError(f"{name}: truncated index ({len(data)} bytes)")
        raise FormatError(f"{name}: not a pcapvault index (bad magic)")
    (version,) = struct.unpack_from("<H", data, 8)
    if version not in READABLE_VERSIONS:
        newer = "newer than" if version > VERSION else "unknown to"
        readable = ", ".join(map(str, READABLE_VERSIONS[:-1])) + f" and {VERSION}"
        raise FormatError(
            f"{name}: index format version {version} is {newer} this pcapvault, "
            f"which reads versions {readable}"
        )
    length = HEADER_LEN if version >= FIRST_POSTINGS_VERSION else HEADER_LEN_V2
    if len(data) < length:
        raise FormatError(f"{name}: truncated index ({len(data)} bytes, header is {length})")
    (_, version, flags, linktype, count, first_ns, last_ns, pcap_size, nflows,
     slen, plen, crc) = _HEADER_V2.unpack_from(data)
    postings = _HEADER_V3.unpack_from(data, HEADER_LEN_V2) if length == HEADER_LEN else ()
    if count and not 0 <= first_ns <= last_ns:
        # The header's CRC is checked only by readers of the sections; the time bins' count,
        # and with it every offset in the directory, comes from these two.
        raise FormatError(f"{name}: damaged index (packet times {first_ns} to {last_ns} ns "
                          "are not a range of times since 1970)")
    return IndexHeader(
        version, bool(flags & HEADER_FLAG_NS), linktype, count, first_ns, last_ns, pcap_size,
        nflows, slen, plen, crc, *postings,
    )


def pack_header(h: IndexHeader) -> bytes:
    """The header bytes of `h` (version 3 and 4 layout); the CRC field is written as given."""
    return _HEADER_V2.pack(
        MAGIC, h.version, HEADER_FLAG_NS if h.nanosecond else 0, h.linktype, h.count,
        h.first_ns, h.last_ns, h.pcap_size, h.nflows, h.summary_len, h.packets_len, h.crc,
    ) + _HEADER_V3.pack(h.directory_len, h.keys, h.frames_len, h.directory_crc)


def offset_width(pcap_size: int) -> int:
    """Bytes of a record offset in the postings frames of a pcap of `pcap_size` bytes."""
    return 4 if pcap_size < 1 << 32 else 8


def file_crc(head: bytes | memoryview, *sections: bytes | memoryview) -> int:
    """CRC-32 the header stores at byte 60, of an index given as its first `frames_offset`
    bytes or as its header and the sections after it: every byte before the postings frames
    but the CRC field itself (bytes 60..63), in file order. The frames are left out: each
    carries its own checksum, and a reader of the flow table and packet section never reads
    them (in versions 1 and 2 there are none, so the CRC covers the whole file)."""
    view = memoryview(head)
    crc = zlib.crc32(view[HEADER_LEN_V2:], zlib.crc32(view[:CRC_AT]))
    for section in sections:
        crc = zlib.crc32(section, crc)
    return crc


def check_size(h: IndexHeader, size: int, name: str) -> None:
    """The lengths in the header must add up to the file's size."""
    if size != h.file_size:
        what = "truncated" if size < h.file_size else "trailing garbage in"
        raise FormatError(f"{name}: {what} index ({size} bytes, header says {h.file_size})")


def check_directory(h: IndexHeader, directory: bytes | memoryview, name: str) -> None:
    """The postings directory's shape, checksum and frame table: what a reader of the header
    and the directory alone can verify."""
    rest = h.frame_table_len
    if (not 0 <= rest <= len(directory) or rest % FRAME_ENTRY_LEN or (h.keys and not rest)
            or len(directory) != h.directory_len):
        raise FormatError(
            f"{name}: damaged index (a postings directory of {h.directory_len} bytes cannot "
            f"hold {h.keys} keys, a frame table, {h.blocks} time blocks and {h.bins} time "
            "bins)"
        )
    if zlib.crc32(directory) != h.directory_crc:
        raise FormatError(f"{name}: damaged index (postings directory checksum mismatch)")
    # Frames follow one another without gaps and fill the frames section: checked here, a
    # key or packet count damaged in the header (which the directory's checksum does not
    # cover) shows.
    end = 0
    for offset, length, _ in _FRAME_ENTRY.iter_unpack(directory[KEY_LEN * h.keys : h.blocks_at]):
        if offset != end:
            break
        end += length
    else:
        if end == h.frames_len:
            return
    raise FormatError(
        f"{name}: damaged index (postings frame table does not match the frames section)"
    )


def decompress_exact(blob: bytes | memoryview, expected: int | tuple[int, ...], what: str,
                     name: str) -> bytes:
    """Decompress one zstd frame of known size (or one of a few sizes), never producing more
    than it should hold (a damaged or hostile frame must not make the reader allocate
    whatever size it claims)."""
    sizes = expected if isinstance(expected, tuple) else (expected,)
    d = zstd.ZstdDecompressor()
    try:
        raw = d.decompress(blob, max_length=max(sizes) + 1)
    except zstd.ZstdError as e:
        raise FormatError(f"{name}: damaged index ({what} does not decompress: {e})") from None
    if len(raw) not in sizes or not d.eof or d.unused_data:
        size = f"{len(raw)}+" if len(raw) > max(sizes) else str(len(raw))
        raise FormatError(
            f"{name}: damaged index ({what} is {size} bytes, expected "
            f"{' or '.join(map(str, sorted(set(sizes))))})"
        )
    return raw


def frame_sizes(entries: int, offset_bytes: int) -> tuple[int, ...]:
    """The sizes a postings frame of `entries` entries may decompress to: offsets and lengths,
    the lengths 2 or 4 bytes wide."""
    return tuple(entries * (offset_bytes + w) for w in LENGTH_WIDTHS)


def list_columns(frame: bytes | memoryview, entries: int, first: int, count: int,
                 offset_bytes: int) -> tuple[array, array]:
    """The stored offsets (delta-coded per part) and lengths of `count` entries from entry
    `first` of a decompressed frame of `entries` entries, as arrays of numbers.

    Each column is byte-transposed: byte k of entry i is at k x entries + i within it. An
    entry's bytes are gathered with one slice assignment per byte plane, no loop per entry.
    """
    length_bytes = len(frame) // entries - offset_bytes
    if length_bytes not in LENGTH_WIDTHS:  # decompress_exact took only these sizes
        raise ValueError(f"a postings frame of {entries} entries is not {len(frame)} bytes")
    columns = []
    base = 0
    for width in (offset_bytes, length_bytes):
        out = bytearray(count * width)
        for k in range(width):
            start = base + k * entries + first
            out[k::width] = frame[start : start + count]
        col = array(_TYPECODES[width])
        col.frombytes(out)
        if _SWAP:
            col.byteswap()
        columns.append(col)
        base += width * entries
    return columns[0], columns[1]


def key_bytes(address: bytes, ethertype: int, unknown: bool = False) -> bytes:
    """The 20 bytes a key is sorted and found by. The "address unknown" list of an ethertype
    is keyed by 16 zero bytes, whatever `address` says."""
    if unknown:
        address = bytes(16)
    elif len(address) != 16:
        raise ValueError(f"an index address is 16 bytes, not {len(address)}")
    return address + struct.pack(">HH", ethertype, KEY_UNKNOWN if unknown else 0)


class NoPostings(FormatError):
    """A readable index written before postings existed (version 1 or 2): the caller falls
    back to the flow table."""


def require_postings(h: IndexHeader, name: str) -> None:
    if h.version < FIRST_POSTINGS_VERSION:
        raise NoPostings(
            f"{name}: index format version {h.version} has no address postings "
            f"(added in version {FIRST_POSTINGS_VERSION})"
        )


@dataclass
class PostingList:
    """The packets of one key: first those where its address is the source, then those where
    it is the destination (a packet from an address to itself in both), each part in pcap
    order. An "address unknown" list has only the first part."""

    offset: list[int]  # offset of the 16-byte record header in the pcap
    length: list[int]  # 16 + caplen: the record's bytes
    sources: int  # entries of the source part: offset[:sources]


class Postings:
    """An index file's header and postings directory; lists are read frame by frame.

    Reads the header and the directory only: the flow table and the packet section are
    never touched, and a list costs one pread and the decompression of one small frame.
    """

    def __init__(self, path: str, fd: int, own_fd: bool, header: IndexHeader,
                 directory: bytes):
        self.path = path
        self.version = header.version
        self.linktype = header.linktype
        self.nanosecond = header.nanosecond
        self.count = header.count
        self.first_ns = header.first_ns
        self.last_ns = header.last_ns
        self.pcap_size = header.pcap_size
        self.keys = header.keys
        self.frames = header.frame_count
        self.frames_len = header.frames_len
        self.block_count = header.blocks
        self._header = header
        self._fd = fd
        self._own_fd = own_fd
        self._dir = directory
        self._cache: dict[int, bytes] = {}

    @classmethod
    def read(cls, path: str, fd: int | None = None) -> Postings:
        """Header and directory of the index at `path` (read through `fd` when given, which
        stays the caller's to close).

        Raises NoPostings for a version 1 or 2 index, FormatError (one line naming the file)
        for anything unreadable, damaged or of an unknown version.
        """
        name = str(path)
        own = fd is None
        try:
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, READ_AHEAD, 0)
                h = parse_header(head, name)
                require_postings(h, name)
                check_size(h, size, name)
                end = h.header_len + h.directory_len
                if len(head) < end:
                    head += os.pread(fd, end - len(head), len(head))
                if len(head) < end:  # the file shrank under us
                    raise FormatError(f"{name}: truncated index ({len(head)} bytes read)")
                directory = head[h.header_len : end]
                check_directory(h, directory, name)
            except BaseException:
                if own:
                    os.close(fd)
                raise
        except OSError as e:
            raise FormatError(f"{name}: cannot read index: {e.strerror}") from None
        return cls(name, fd, own, h, directory)

    def close(self) -> None:
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1
        self._cache.clear()

    def __enter__(self) -> Postings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sort_bytes(self, key: int) -> bytes:
        pos = key * KEY_LEN
        return self._dir[pos : pos + KEY_SORT_LEN]

    def find(self, address: bytes, ethertype: int, unknown: bool = False) -> int | None:
        """The key number of (address, ethertype), or of the ethertype's "address unknown"
        list, or None when no packet is posted under it."""
        want = key_bytes(address, ethertype, unknown)
        i = bisect_left(range(self.keys), want, key=self._sort_bytes)
        return i if i < self.keys and self._sort_bytes(i) == want else None

    def key(self, key: int) -> tuple[bytes, int, bool]:
        """(address, ethertype, unknown) of key number `key`."""
        raw = self._sort_bytes(self._check_key(key))
        ethertype, flags = struct.unpack_from(">HH", raw, 16)
        return raw[:16], ethertype, bool(flags & KEY_UNKNOWN)

    def size(self, key: int) -> int:
        """Entries in the key's list (from the directory: no frame is read)."""
        return self._key_entry(key)[0]

    def sources(self, key: int) -> int:
        """Entries of the key's source part (from the directory: no frame is read)."""
        return self._key_entry(key)[1]

    def blocks(self) -> list[tuple[int, int, int]]:
        """The block time table: per BLOCK packets in pcap order, the offset of the block's
        first record and the minimum and maximum timestamp (ns) of its packets. A posting
        whose offset lies in a block entirely inside (outside) a time window is inside
        (outside) it."""
        h = self._header
        return list(_BLOCK_ENTRY.iter_unpack(self._dir[h.blocks_at : h.bins_at]))

    @property
    def header(self) -> IndexHeader:
        return self._header

    @property
    def directory(self) -> bytes:
        """The directory's bytes, checked (shape, checksum, frame table)."""
        return self._dir

    def directory_span(self) -> tuple[int, int]:
        """(file offset, length) of the header and the directory: for page-cache hints."""
        return 0, self._header.header_len + self._header.directory_len

    def frame_span(self, key: int) -> tuple[int, int]:
        """(file offset, length) of the compressed frame holding the key's list."""
        offset, length, _ = self._frame_entry(key, self._key_entry(key)[2])
        return self._header.frames_offset + offset, length

    def entries(self, key: int) -> PostingList:
        """The key's list, decoded; FormatError when its frame is damaged or a record it names
        lies beyond the pcap size."""
        count, sources, frame, first = self._key_entry(key)
        if sources > count:
            raise FormatError(
                f"{self.path}: damaged index (postings key {key} has {sources} sources in a "
                f"list of {count})"
            )
        offset, length, m = self._frame_entry(key, frame)
        if first + count > m:
            raise FormatError(
                f"{self.path}: damaged index (postings key {key} lies beyond its frame)"
            )
        raw = self._cache.get(frame)
        if raw is None:
            raw = self._read_frame(frame, offset, length, m)
            self._cache[frame] = raw
        deltas, lengths = list_columns(raw, m, first, count, self._header.offset_width)
        offsets = list(accumulate(deltas[:sources]))
        offsets += accumulate(deltas[sources:])
        if max(map(add, offsets, lengths), default=0) > self.pcap_size:
            raise FormatError(
                f"{self.path}: damaged index (postings key {key} names a record beyond the "
                f"pcap's {self.pcap_size} bytes)"
            )
        return PostingList(offset=offsets, length=lengths.tolist(), sources=sources)

    def _check_key(self, key: int) -> int:
        if not 0 <= key < self.keys:
            raise IndexError(f"postings key {key} out of range (0..{self.keys - 1})")
        return key

    def _key_entry(self, key: int) -> tuple[int, int, int, int]:
        return _KEY_TAIL.unpack_from(self._dir, self._check_key(key) * KEY_LEN + KEY_SORT_LEN)

    def _frame_entry(self, key: int, frame: int) -> tuple[int, int, int]:
        if frame >= self.frames:
            raise FormatError(
                f"{self.path}: damaged index (postings key {key} names frame {frame} of "
                f"{self.frames})"
            )
        # inside the frames section: check_directory saw the whole frame table
        return _FRAME_ENTRY.unpack_from(self._dir, self.keys * KEY_LEN + frame * FRAME_ENTRY_LEN)

    def _read_frame(self, frame: int, offset: int, length: int, entries: int) -> bytes:
        if self._fd < 0:
            raise ValueError("Postings is closed")
        try:
            blob = os.pread(self._fd, length, self._header.frames_offset + offset)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read index: {e.strerror}") from None
        if len(blob) != length:
            raise FormatError(f"{self.path}: truncated index (postings frame {frame} cut short)")
        return decompress_exact(blob, frame_sizes(entries, self._header.offset_width),
                                f"postings frame {frame}", self.path)
