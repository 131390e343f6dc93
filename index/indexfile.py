"""The `.pcap.idx` file: in-memory form, flow-row layout, writer and reader.

docs/FORMAT.md ("Index files") is the contract; this module is its only implementation, so
every other part of pcapvault goes through `read_index`/`write_index` and the flow-row helpers
below instead of decoding bytes itself.

Reading is built for extraction, which opens many index files per query and usually needs only
the distinct-flow table to decide that a file cannot match: `read_index(path, packets=False)`
never decompresses the packet section.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .atomicfile import write_atomic
from .errors import FormatError
from .pcapfile import RECORD_HEADER_LEN, RecordTable

# The header (MAGIC, VERSION, READABLE_VERSIONS, parse_header) is defined in the numpy-free
# postings module: a host query reads it before numpy is imported.
from .postings import (
    BINS_ENTRY_LEN,
    BLOCK,
    BLOCK_ENTRY_LEN,
    CRC_AT,
    FIRST_BINS_VERSION,
    FIRST_TOTALS_VERSION,
    FRAME_ENTRIES,
    FRAME_ENTRY_LEN,
    HEADER_LEN,
    KEY_LEN,
    KEY_UNKNOWN,
    LENGTH_WIDTHS,
    LINKTYPE_ETHERNET,
    NS,
    POSTED_ETHERTYPES,
    VERSION,
    IndexHeader,
    NoPostings,
    Postings,
    check_directory,
    check_size,
    decompress_exact,
    file_crc,
    frame_sizes,
    list_columns,
    offset_width,
    pack_header,
    parse_header,
    require_postings,
    time_bins,
)
from .zstdlib import zstd

# zstd level: on byte-transposed columns level 1 compresses about as well as level 3, and
# faster (docs/BENCHMARKS.md, D7).
ZSTD_LEVEL = 1

# Flow-row flag bits (row offset 8).
FLAG_PORTS = 0x01  # sport/dport valid
FLAG_FRAGMENT = 0x02  # non-first IPv4/IPv6 fragment: no transport header in this packet
FLAG_PROTO = 0x04  # proto valid
FLAG_ADDRS = 0x08  # src/dst valid

VLAN_ABSENT = 0xFFFF
# A VLAN tag whose TPID was captured but whose TCI was cut off by the snaplen: the frame is
# tagged (as `tcpdump vlan` sees it) but its id is unknown.
VLAN_UNREADABLE = 0xFFFE

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_ARP = 0x0806
ETHERTYPE_RARP = 0x8035
VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)
# Transport protocols whose first four bytes are source and destination port.
PORT_PROTOCOLS = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite

IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"

# The reserved bytes are named fields so that numpy copies them (it may leave unnamed gaps
# of a structured dtype uninitialised), keeping row bytes exactly as written.
FLOW_DTYPE = np.dtype(
    {
        "names": [
            "ethertype", "vlan1", "vlan2", "ipver", "proto", "flags", "reserved9",
            "sport", "dport", "reserved14", "src", "dst",
        ],
        "formats": [
            "<u2", "<u2", "<u2", "u1", "u1", "u1", "u1", "<u2", "<u2", "<u2", ("u1", 16),
            ("u1", 16),
        ],
        "offsets": [0, 2, 4, 6, 7, 8, 9, 10, 12, 14, 16, 32],
        "itemsize": 48,
    }
)
FLOW_ROW_LEN = FLOW_DTYPE.itemsize
# Per-packet bytes of the uncompressed packet section: ts, offset, caplen, wirelen, flow.
_PACKET_ROW_LEN = 8 + 8 + 4 + 4 + 4
# Per-flow bytes of the uncompressed summary section after the row: its packet count, and
# from version 4 on its wire bytes, first and last timestamp (FORMAT.md "Summary section").
_FLOW_COUNT_LEN = 4
_FLOW_TOTALS_LEN = 8 + 8 + 8
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


@dataclass(eq=False)
class PacketIndex:
    """An index in memory: header fields, distinct-flow table and (optionally) packet columns.

    `flows` is a FLOW_DTYPE array sorted as the file stores it; `flow_packets[i]` is the number
    of packets of flow i; `flow_bytes`, `flow_first_ns` and `flow_last_ns` its wire bytes and
    earliest and latest timestamp, so that totals need no packet column (None when read from
    a version before 4). The packet columns are None when only the summary was read.
    """

    nanosecond: bool
    linktype: int
    count: int
    first_ns: int
    last_ns: int
    pcap_size: int
    flows: np.ndarray
    flow_packets: np.ndarray
    ts_ns: np.ndarray | None = None
    offset: np.ndarray | None = None
    caplen: np.ndarray | None = None
    wirelen: np.ndarray | None = None
    flow: np.ndarray | None = None
    flow_bytes: np.ndarray | None = None
    flow_first_ns: np.ndarray | None = None
    flow_last_ns: np.ndarray | None = None
    version: int = VERSION  # of the file it was read from; writing always writes VERSION

    @property
    def has_packets(self) -> bool:
        return self.flow is not None

    @property
    def has_totals(self) -> bool:
        return self.flow_bytes is not None


def flow_totals(flow: np.ndarray, nflows: int, ts_ns: np.ndarray, wirelen: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(packets, wire bytes, earliest, latest timestamp) per flow number below `nflows` of
    the packets whose flow numbers are `flow` (int64; a flow without packets has the
    largest and smallest int64 as its times)."""
    count = np.bincount(flow, minlength=nflows).astype(np.int64)
    # float64 sums are exact below 2**53 bytes
    wire = np.bincount(flow, weights=wirelen, minlength=nflows).astype(np.int64)
    first = np.full(nflows, _INT64_MAX, np.int64)
    last = np.full(nflows, _INT64_MIN, np.int64)
    np.minimum.at(first, flow, ts_ns)
    np.maximum.at(last, flow, ts_ns)
    return count, wire, first, last


def flows_as_version(flows: np.ndarray, version: int) -> np.ndarray:
    """The rows a writer of index `version` records where this one wrote `flows`: what a
    stored older index is compared with after a fresh build (npcapprintindex -c)."""
    if version >= 2:
        return flows
    out = flows.copy()
    arp = (out["ethertype"] == ETHERTYPE_ARP) | (out["ethertype"] == ETHERTYPE_RARP)
    out["flags"][arp] &= 0xFF & ~FLAG_ADDRS
    out["src"][arp] = 0
    out["dst"][arp] = 0
    return out


def empty_flows(count: int = 0) -> np.ndarray:
    """A zeroed flow table with absent VLANs: the row of a packet nothing could be read from."""
    rows = np.zeros(count, dtype=FLOW_DTYPE)
    rows["vlan1"] = VLAN_ABSENT
    rows["vlan2"] = VLAN_ABSENT
    return rows


def take_flows(flows: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """flows[rows] of a FLOW_DTYPE array, through a plain bytes view: numpy copies
    structured rows field by field, twenty times slower."""
    whole = np.dtype((np.void, FLOW_ROW_LEN))
    return np.ascontiguousarray(flows).view(whole)[rows].view(FLOW_DTYPE)


def flows_of_packets(idx: PacketIndex, packets: np.ndarray | slice | None = None) -> np.ndarray:
    """The flow row of each packet (or of the selected packets), as a FLOW_DTYPE array."""
    if idx.flow is None:
        raise ValueError("packet columns were not read (read_index(..., packets=True))")
    flow = idx.flow if packets is None else idx.flow[packets]
    return idx.flows[flow]


def address_bytes(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """The 16-byte flow-row encoding of an address (IPv4 as ::ffff:a.b.c.d)."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if ip.version == 4:
        return IPV4_MAPPED_PREFIX + ip.packed
    return ip.packed


def address_array(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> np.ndarray:
    """`address_bytes` as a (16,) uint8 array, to compare against flows['src'] / ['dst']."""
    return np.frombuffer(address_bytes(address), dtype=np.uint8)


def address_text(raw: bytes | np.ndarray, ipver: int) -> str:
    """Printable form of a 16-byte flow-row address of an IPv`ipver` packet."""
    raw = bytes(raw)
    if ipver == 4:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


def matches_address(flows: np.ndarray, field: str, address: str) -> np.ndarray:
    """Boolean mask of flow rows whose `field` ('src' or 'dst') is `address`."""
    hit = (flows[field] == address_array(address)).all(axis=1)
    return hit & ((flows["flags"] & FLAG_ADDRS) != 0)


# ---------------------------------------------------------------------------------------------
# Encoding


def _packet_columns(idx: PacketIndex) -> list[np.ndarray]:
    """The five packet-section columns, coded for compression (see FORMAT.md).

    Delta coding turns timestamps into small numbers; coding offsets as the gap after the
    previous record and wire lengths as the excess over the captured length turns both into
    zeros for ordinary pcaps.
    """
    ts = np.asarray(idx.ts_ns, dtype="<i8")
    off = np.asarray(idx.offset, dtype="<u8")
    caplen = np.asarray(idx.caplen, dtype="<u4")
    ts_delta = np.empty_like(ts)
    ts_delta[:1] = ts[:1]
    np.subtract(ts[1:], ts[:-1], out=ts_delta[1:])
    gap = off.copy()
    gap[1:] -= off[:-1]
    gap[1:] -= caplen[:-1]
    gap[1:] -= np.uint64(RECORD_HEADER_LEN)
    excess = np.asarray(idx.wirelen, dtype="<u4") - caplen
    return [ts_delta, gap, caplen, excess, np.asarray(idx.flow, dtype="<u4")]


def _byte_planes(columns: list[np.ndarray]) -> np.ndarray:
    """Columns one after the other, each byte-transposed: all least significant bytes first.

    The high bytes of small numbers are zeros; grouped together they compress to almost
    nothing, and zstd runs faster than on interleaved bytes (docs/BENCHMARKS.md, D7).
    """
    out = np.empty(sum(c.nbytes for c in columns), dtype=np.uint8)
    pos = 0
    for col in columns:
        _put_planes(out[pos : pos + col.nbytes].reshape(col.itemsize, len(col)), col)
        pos += col.nbytes
    return out


def _put_planes(planes: np.ndarray, column: np.ndarray) -> None:
    """Write the byte planes of `column` (little-endian numbers) into the rows of `planes`:
    row k gets byte k of every number, cut out with a shift. (With today's numpy a byte
    transposition measures faster: docs/BENCHMARKS.md, D8.)"""
    values = column.view(f"<u{column.itemsize}")
    for k in range(column.itemsize):
        planes[k] = values >> 8 * k


def _summary_section(idx: PacketIndex) -> bytes:
    """Rows, packet counts, then the totals (version 4): those `idx` has, else those of its
    packet columns (an index read from an older version and written again).

    The totals are coded as the packet columns are (byte planes, times as differences):
    first times after the file's first, last times after the flow's first. Nanosecond times
    barely compress, but their high bytes do (docs/FORMAT.md, "Summary section")."""
    flows = np.ascontiguousarray(idx.flows, dtype=FLOW_DTYPE)
    if idx.has_totals:
        wire, first, last = idx.flow_bytes, idx.flow_first_ns, idx.flow_last_ns
    else:
        wire, first, last = flow_totals(idx.flow, len(flows), idx.ts_ns, idx.wirelen)[1:]
    if not len(wire) == len(first) == len(last) == len(flows):
        raise ValueError("flow totals and flows differ in length")
    first = np.asarray(first, dtype="<i8")
    totals = [np.asarray(wire, dtype="<u8"), first - np.int64(idx.first_ns),
              np.asarray(last, dtype="<i8") - first]
    return b"".join([flows.tobytes(), np.asarray(idx.flow_packets, dtype="<u4").tobytes(),
                     _byte_planes(totals).tobytes()])


def summary_size(nflows: int, version: int) -> int:
    """Bytes of the uncompressed summary section of `nflows` flows in index `version`."""
    per_flow = FLOW_ROW_LEN + _FLOW_COUNT_LEN
    if version >= FIRST_TOTALS_VERSION:
        per_flow += _FLOW_TOTALS_LEN
    return nflows * per_flow


# Postings directory entries (FORMAT.md "Address postings").
KEY_DTYPE = np.dtype(
    {
        "names": ["address", "ethertype", "flags", "count", "sources", "frame", "first",
                  "reserved"],
        "formats": [("u1", 16), ">u2", ">u2", "<u4", "<u4", "<u4", "<u4", "<u4"],
        "offsets": [0, 16, 18, 20, 24, 28, 32, 36],
        "itemsize": KEY_LEN,
    }
)
# A directory entry's 20 sort bytes as numbers that compare as memcmp compares the bytes.
_KEY_ORDER = np.dtype({"names": ["hi", "lo", "tail"], "formats": [">u8", ">u8", ">u4"],
                       "offsets": [0, 8, 16], "itemsize": KEY_LEN})
FRAME_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("entries", "<u4")])
assert FRAME_DTYPE.itemsize == FRAME_ENTRY_LEN
BLOCK_DTYPE = np.dtype([("offset", "<u8"), ("min_ns", "<i8"), ("max_ns", "<i8")])
BINS_DTYPE = np.dtype([("packets", "<u8"), ("bytes", "<u8")])
_BINS_HEAD = struct.Struct("<qII")  # first bin's start (s), width (s), bins
assert BLOCK_DTYPE.itemsize == BLOCK_ENTRY_LEN
_FRAME_OPTIONS = {
    zstd.CompressionParameter.compression_level: ZSTD_LEVEL,
    zstd.CompressionParameter.checksum_flag: 1,
}
# The posted ethertypes as an array, ascending: a key's ethertype and flags compare as its
# position here (times two, plus the "address unknown" flag) does.
_POSTED = np.array(sorted(POSTED_ETHERTYPES), np.uint16)


@dataclass(eq=False)
class PostingsSection:
    """Address postings before compression: what a writer stores and `postings_problem`
    compares (compressed bytes depend on the zstd release, their content does not)."""

    keys: np.ndarray  # KEY_DTYPE, in stored order
    frames: list[bytes | memoryview]  # each decompressed: offsets, then lengths, byte-transposed
    entries: np.ndarray  # entries of each frame
    blocks: np.ndarray  # BLOCK_DTYPE: the block time table
    offset_bytes: int = 4  # width of the frames' record offsets
    bins: bytes = b""  # the time-bin table as stored (head entry, then BINS_DTYPE entries)


@dataclass
class TimeBins:
    """Packets and wire bytes per time bin of one index file (FORMAT.md "Time bins"): bin k
    covers [start_ns + k width_ns, + width_ns)."""

    start_ns: int
    width_ns: int
    packets: np.ndarray  # uint64
    bytes: np.ndarray


def time_bin_table(idx: PacketIndex) -> bytes:
    """The time-bin table of an index with packet columns, as stored: empty without packets."""
    if not idx.count:
        return b""
    start, width, n = time_bins(idx.first_ns, idx.last_ns)
    k = (np.asarray(idx.ts_ns, dtype=np.int64) // NS - start) // width
    table = np.zeros(n, BINS_DTYPE)
    table["packets"] = np.bincount(k, minlength=n)
    # weights are float64: exact for sums below 2**53 bytes in one bin
    table["bytes"] = np.bincount(k, weights=idx.wirelen, minlength=n)
    return _BINS_HEAD.pack(start, width, n) + table.tobytes()


def decode_bins(h: IndexHeader, directory: bytes | memoryview, name: str) -> TimeBins:
    """The time bins of a version 5 index from its checked directory; FormatError when they
    contradict the header (a header damaged where its own checksum was not verified)."""
    if not h.bins:
        return TimeBins(0, NS, np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    view = memoryview(directory)[h.bins_at : h.bins_at + h.bins_len]
    start, width, n = _BINS_HEAD.unpack_from(view)
    table = np.frombuffer(view, BINS_DTYPE, offset=BINS_ENTRY_LEN)
    if (start, width, n) != time_bins(h.first_ns, h.last_ns) or int(
            table["packets"].sum()) != h.count:
        raise FormatError(f"{name}: damaged index (time bins contradict the header)")
    return TimeBins(start * NS, width * NS, table["packets"], table["bytes"])


def block_table(idx: PacketIndex) -> np.ndarray:
    """The block time table of an index with packet columns: per BLOCK packets in pcap order,
    the first one's record offset and the blocks' minimum and maximum timestamp."""
    starts = np.arange(0, idx.count, BLOCK)
    blocks = np.empty(len(starts), BLOCK_DTYPE)
    if len(starts):
        ts = np.asarray(idx.ts_ns, dtype=np.int64)
        blocks["offset"] = np.asarray(idx.offset)[starts]
        blocks["min_ns"] = np.minimum.reduceat(ts, starts)
        blocks["max_ns"] = np.maximum.reduceat(ts, starts)
    return blocks


def _ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value's rank among the distinct values, ascending, and the position of one
    occurrence of each distinct value (np.unique's inverse and index, cheaper).

    When every value leaves room for its position in a 64-bit word, the pairs are sorted as
    plain numbers (faster than an argsort: docs/BENCHMARKS.md, D3)."""
    n = len(values)
    bits = max(n - 1, 1).bit_length()
    if n and int(values.max()) < 1 << (64 - bits):
        packed = np.sort(values.astype(np.uint64) << np.uint64(bits) | np.arange(
            n, dtype=np.uint64))
        order = (packed & np.uint64((1 << bits) - 1)).astype(np.intp)
        ordered = packed >> np.uint64(bits)
    else:
        order = np.argsort(values)
        ordered = values[order]
    new = np.empty(n, bool)
    new[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    rank = np.empty(n, np.int64)
    rank[order] = np.cumsum(new, dtype=np.int32) - 1  # int32: faster (docs/BENCHMARKS.md, D4)
    return rank, order[new]


def _flow_keys(flows: np.ndarray, present: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per flow row the number of the key its packets are posted under as the source, and
    as the destination, nkeys when none; and the key table (KEY_DTYPE, sorted, counts and
    frames not filled in). Only rows marked `present` (with packets) make keys.

    A row without addresses posts under its ethertype's "address unknown" key, as the
    source only. The keys (a few per row, never per packet) are numbered in their sort
    order through exact ranks of their address halves.
    """
    ethertype = flows["ethertype"]
    posted = present & (flows["vlan1"] == VLAN_ABSENT) & np.isin(ethertype, _POSTED)
    known = posted & ((flows["flags"] & FLAG_ADDRS) != 0)
    # Candidate keys: the source side of every posted row, the destination side of rows
    # with addresses. Address halves as big-endian numbers compare as their bytes do.
    words = np.ascontiguousarray(flows, dtype=FLOW_DTYPE).view("<u8").reshape(-1, 6)
    side = np.concatenate([posted, known])
    unknown = np.concatenate([~known, np.zeros_like(known)])[side]
    hi = np.concatenate([words[:, 2], words[:, 4]])[side].byteswap()
    lo = np.concatenate([words[:, 3], words[:, 5]])[side].byteswap()
    hi[unknown] = 0
    lo[unknown] = 0
    tail = np.searchsorted(_POSTED, np.concatenate([ethertype, ethertype])[side]) * 2 + unknown
    # Most high halves are zero (IPv4-mapped addresses): only the others need ranking. The
    # low halves are taken as they are (less their minimum) when that leaves room, as for
    # IPv4-mapped addresses, which differ in 32 bits; else by rank. Either way the combined
    # numbers compare as the keys do.
    rank_hi = np.zeros(len(hi), np.uint64)
    high = np.flatnonzero(hi)
    rank_hi[high] = _ranks(hi[high])[0] + 1
    low = lo - (lo.min() if len(lo) else np.uint64(0))
    span = int(low.max(initial=0)) + 1
    if (int(rank_hi.max(initial=0)) + 1) * span * 8 >= 1 << 62:
        low = _ranks(lo)[0].astype(np.uint64)
        span = int(low.max(initial=0)) + 1
    combined = (rank_hi * np.uint64(span) + low) * np.uint64(8) + tail.astype(np.uint64)
    number, first = _ranks(combined)
    nkeys = len(first)
    key = np.full(2 * len(flows), nkeys, np.int64)
    key[side] = number
    table = np.zeros(nkeys, KEY_DTYPE)
    address = table["address"].view(">u8").reshape(-1, 2)
    address[:, 0] = hi[first]
    address[:, 1] = lo[first]
    table["ethertype"] = _POSTED[tail[first] >> 1]
    table["flags"] = tail[first] & KEY_UNKNOWN
    return key[: len(flows)], key[len(flows) :], table


def _stable_order(row_keys: list[np.ndarray], flow: np.ndarray, nkeys: int) -> np.ndarray:
    """The slots of the packets of `flow` (slot i x n + p: packet p with the key numbers of
    `row_keys[i]`, given per flow row) in order of key number, stably: each key's slots in
    slot order.

    numpy's stable sort of 16-bit integers is a radix sort: one pass over the low 16 bits of
    the key numbers; from 65536 keys on, a second one over the high bits (LSD), which hold
    only a few values, so that a stable partition by each is cheaper than a sort.
    """
    n = len(flow)

    def digits(shift: int) -> np.ndarray:
        out = np.empty(len(row_keys) * n, np.uint16)
        for i, keys in enumerate(row_keys):
            np.take((keys >> shift).astype(np.uint16), flow, out=out[i * n : (i + 1) * n])
        return out

    order = np.argsort(digits(0), kind="stable")
    if nkeys >= 1 << 16:
        high = digits(16)[order]
        if nkeys < 1 << 20:
            order = np.concatenate([order[high == v] for v in range((nkeys >> 16) + 1)])
        else:
            order = order[np.argsort(high, kind="stable")]
    return order


def _entry_packets(src_key: np.ndarray, dst_key: np.ndarray, flow: np.ndarray,
                   sources: np.ndarray, dests: np.ndarray) -> np.ndarray:
    """The packet of every entry, in stored order: key by key, its source part then its
    destination part, each in pcap order; a packet number p may come as p + n (n packets).

    Below 65536 keys one sort does it all: key numbers of both parts side by side, sorted
    stably, put each key's source entries before its destination entries. From 65536 keys on
    each part is sorted on its own by its own key numbers (usually below 65536 again: one
    pass each instead of two over both), and the parts are then interleaved key by key.
    """
    nkeys = len(sources)
    total = int(sources.sum() + dests.sum())
    if nkeys < 1 << 16:
        return _stable_order([src_key, dst_key], flow, nkeys)[:total]
    orders = []
    for keys, counts in ((src_key, sources), (dst_key, dests)):
        used = counts > 0
        nused = int(np.count_nonzero(used))
        number = np.full(nkeys + 1, nused, np.int64)  # keys without this part: none
        number[:nkeys][used] = np.arange(nused)
        orders.append(_stable_order([number[keys]], flow, nused)[: int(counts.sum())])
    source = np.repeat(np.tile([True, False], nkeys), np.stack([sources, dests], 1).ravel())
    packets = np.empty(total, np.intp)
    packets[source] = orders[0]
    packets[~source] = orders[1]
    return packets


def _part_deltas(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Delta coding per part: each value minus the previous one, the first of each part (at
    `starts`) absolute."""
    out = np.empty_like(values)
    out[:1] = values[:1]
    np.subtract(values[1:], values[:-1], out=out[1:])
    out[starts] = values[starts]
    return out


def _frame_bounds(counts: np.ndarray) -> list[tuple[int, int]]:
    """[first key, end key) of each frame: lists in key order, a frame closed once it holds
    FRAME_ENTRIES entries, and a list of FRAME_ENTRIES or more alone in its frame."""
    ends = np.cumsum(counts, dtype=np.int64)
    long = np.flatnonzero(counts >= FRAME_ENTRIES)
    bounds = []
    k, nkeys = 0, len(counts)
    while k < nkeys:
        if counts[k] >= FRAME_ENTRIES:
            end = k + 1
        else:
            start = int(ends[k] - counts[k])
            end = int(np.searchsorted(ends, start + FRAME_ENTRIES, side="left")) + 1
            later_long = long[np.searchsorted(long, k) :]
            end = min(end, nkeys, int(later_long[0]) if len(later_long) else nkeys)
        bounds.append((k, end))
        k = end
    return bounds


def build_postings(idx: PacketIndex) -> PostingsSection:
    """The address postings and block time table of an index with packet columns (FORMAT.md
    "Address postings").

    Keys are made per flow row; per packet there are only gathers and one radix sort by key
    number, no sort by key and offset and no loop per key.
    """
    if idx.flow is None:
        raise ValueError("build_postings needs the packet columns")
    blocks = block_table(idx)
    bins = time_bin_table(idx)
    if idx.linktype != LINKTYPE_ETHERNET or idx.count == 0 or not len(idx.flows):
        return PostingsSection(np.zeros(0, KEY_DTYPE), [], np.zeros(0, np.int64), blocks,
                               bins=bins)
    flow = np.asarray(idx.flow)
    packets = np.bincount(flow, minlength=len(idx.flows))
    src_key, dst_key, keys = _flow_keys(idx.flows, packets > 0)
    nkeys = len(keys)
    sources, dests = (np.bincount(k, weights=packets, minlength=nkeys + 1)[:nkeys].astype(
        np.int64) for k in (src_key, dst_key))
    counts = sources + dests
    slots = _entry_packets(src_key, dst_key, flow, sources, dests)
    # The entries' offsets (delta-coded per part) and lengths, each as byte planes (packet
    # n + p is packet p, hence mode="wrap").
    starts = np.cumsum(counts) - counts
    part_starts = np.concatenate([starts[sources > 0], (starts + sources)[dests > 0]])
    offset_bytes = offset_width(idx.pcap_size)
    length_bytes = LENGTH_WIDTHS[int(np.max(idx.caplen)) + RECORD_HEADER_LEN >= 1 << 16]
    offsets = np.asarray(idx.offset).astype(f"<u{offset_bytes}")
    lengths = np.asarray(idx.caplen).astype(f"<u{length_bytes}")
    lengths += RECORD_HEADER_LEN
    planes = np.empty((offset_bytes + length_bytes, len(slots)), np.uint8)
    _put_planes(planes[:offset_bytes],
                _part_deltas(np.take(offsets, slots, mode="wrap"), part_starts))
    _put_planes(planes[offset_bytes:], np.take(lengths, slots, mode="wrap"))

    bounds = np.array(_frame_bounds(counts), np.int64).reshape(-1, 2)
    keys["count"] = counts
    keys["sources"] = sources
    keys["frame"] = np.repeat(np.arange(len(bounds)), bounds[:, 1] - bounds[:, 0])
    first_entry = starts[bounds[:, 0]]
    keys["first"] = starts - first_entry[keys["frame"]]
    entries = np.append(first_entry[1:], len(slots)) - first_entry
    # Every frame's content, one after the other in one buffer: the byte planes of its
    # entries' offsets, then those of their lengths.
    content = np.empty(planes.size, np.uint8)
    frames = []
    for e0, m in zip(first_entry.tolist(), entries.tolist(), strict=True):
        frame = content[e0 * len(planes) : (e0 + m) * len(planes)]
        frame.reshape(len(planes), m)[:] = planes[:, e0 : e0 + m]
        frames.append(frame.data)
    return PostingsSection(keys, frames, entries, blocks, offset_bytes, bins)


def postings_directory(postings: PostingsSection, compressed: list[bytes]) -> bytes:
    """The directory of `postings` whose frames compressed to `compressed`: key table,
    frame table, block time table, time bins."""
    table = np.zeros(len(compressed), FRAME_DTYPE)
    table["length"] = [len(b) for b in compressed]
    table["offset"] = np.cumsum(table["length"], dtype=np.uint64) - table["length"]
    table["entries"] = postings.entries
    return (postings.keys.tobytes() + table.tobytes() + postings.blocks.tobytes()
            + postings.bins)


def encode_postings(postings: PostingsSection) -> tuple[bytes, bytes]:
    """(directory, frames) as stored: each frame one zstd frame with a content checksum."""
    compressor = zstd.ZstdCompressor(options=_FRAME_OPTIONS)
    blobs = [compressor.compress(f, zstd.ZstdCompressor.FLUSH_FRAME) for f in postings.frames]
    return postings_directory(postings, blobs), b"".join(blobs)


def encode_index(idx: PacketIndex) -> bytes:
    """The complete index file as bytes (always the current VERSION)."""
    count = idx.count
    for name in ("ts_ns", "offset", "caplen", "wirelen", "flow"):
        col = getattr(idx, name)
        if col is None or len(col) != count:
            raise ValueError(f"index column {name} must have {count} entries")
    if len(idx.flows) != len(idx.flow_packets):
        raise ValueError("flows and flow_packets differ in length")
    if count and int(np.max(idx.flow)) >= len(idx.flows):
        raise ValueError("flow numbers must be below the number of flows")
    summary = zstd.compress(_summary_section(idx), ZSTD_LEVEL)
    packets = zstd.compress(_byte_planes(_packet_columns(idx)), ZSTD_LEVEL)
    postings = build_postings(idx)
    directory, frames = encode_postings(postings)
    h = IndexHeader(
        VERSION, idx.nanosecond, idx.linktype, count, idx.first_ns, idx.last_ns,
        idx.pcap_size, len(idx.flows), len(summary), len(packets), 0, len(directory),
        len(postings.keys), len(frames), zlib.crc32(directory),
    )
    head = bytearray(pack_header(h))
    struct.pack_into("<I", head, CRC_AT, file_crc(head, directory, summary, packets))
    return b"".join((head, directory, summary, packets, frames))


def write_index(path: str | os.PathLike[str], idx: PacketIndex) -> None:
    """Write atomically: a reader never sees a half-written index under the final name."""
    write_atomic(path, encode_index(idx))


# ---------------------------------------------------------------------------------------------
# Decoding


def _checked_header(data: bytes, name: str, file_size: int | None = None) -> IndexHeader:
    """Header checks in FORMAT.md's order: magic, version, length; then, when `data` reaches
    the postings frames, the checksum and the postings directory. The frames themselves are
    not needed: the checksum covers everything before them."""
    h = parse_header(data, name)
    check_size(h, len(data) if file_size is None else file_size, name)
    if len(data) >= h.frames_offset:
        view = memoryview(data)
        if file_crc(view[: h.frames_offset]) != h.crc:
            raise FormatError(f"{name}: damaged index (checksum mismatch)")
        directory = view[h.header_len : h.summary_offset]
        check_directory(h, directory, name)
        problem = _directory_problem(h, directory)
        if problem:
            raise FormatError(f"{name}: damaged index ({problem})")
    return h


def _directory_problem(h: IndexHeader, directory: memoryview) -> str | None:
    """What is wrong with a postings directory whose checksum, shape and frame table are
    right: the damage a faulty writer could do, found without decompressing a frame."""
    keys = np.frombuffer(directory, KEY_DTYPE, count=h.keys)
    table = np.frombuffer(directory[: h.blocks_at], FRAME_DTYPE, offset=KEY_LEN * h.keys)
    blocks = np.frombuffer(directory[h.blocks_at : h.bins_at], BLOCK_DTYPE)
    if len(keys) > 1:
        order = np.frombuffer(directory, _KEY_ORDER, count=h.keys)
        a, b = order[:-1], order[1:]
        after = (b["hi"] > a["hi"]) | (b["hi"] == a["hi"]) & (
            (b["lo"] > a["lo"]) | (b["lo"] == a["lo"]) & (b["tail"] > a["tail"]))
        if not after.all():
            return f"postings key {int(np.flatnonzero(~after)[0]) + 1} out of order"
    bad = (keys["flags"] > KEY_UNKNOWN) | (keys["count"] == 0) | (
        keys["frame"] >= len(table))
    if not bad.any():
        end = keys["first"].astype(np.int64) + keys["count"]
        bad = end > table["entries"][keys["frame"]]
    if bad.any():
        return f"postings key {int(np.flatnonzero(bad)[0])} does not fit the frame table"
    unknown = (keys["flags"] & KEY_UNKNOWN) != 0
    bad = (keys["sources"] > keys["count"]) | unknown & (keys["sources"] != keys["count"])
    if bad.any():
        return f"postings key {int(np.flatnonzero(bad)[0])} has a wrong source count"
    bad = (blocks["min_ns"] > blocks["max_ns"]) | (blocks["min_ns"] < h.first_ns) | (
        blocks["max_ns"] > h.last_ns) | (blocks["offset"] >= h.pcap_size)
    bad[1:] |= blocks["offset"][1:] <= blocks["offset"][:-1]
    if bad.any():
        return f"postings time block {int(np.flatnonzero(bad)[0])} contradicts the header"
    try:
        decode_bins(h, directory, "")
    except FormatError:
        return "time bins contradict the header"
    return None


def _summary_index(h: IndexHeader, blob: bytes | memoryview, name: str) -> PacketIndex:
    """The index with its flow table (and, from version 4 on, its per-flow totals), from
    the compressed summary section."""
    n = h.nflows
    summary = decompress_exact(blob, summary_size(n, h.version), "summary section", name)
    at = n * (FLOW_ROW_LEN + _FLOW_COUNT_LEN)
    totals = [None] * 3
    if h.version >= FIRST_TOTALS_VERSION:
        wire, first, duration = _from_planes(np.frombuffer(summary, np.uint8)[at:], n,
                                             ("<u8", "<i8", "<i8"))
        first = first + np.int64(h.first_ns)
        totals = [wire, first, first + duration]
    return PacketIndex(
        nanosecond=h.nanosecond, linktype=h.linktype, count=h.count, first_ns=h.first_ns,
        last_ns=h.last_ns, pcap_size=h.pcap_size,
        flows=np.frombuffer(summary, dtype=FLOW_DTYPE, count=n),
        flow_packets=np.frombuffer(summary, dtype="<u4", count=n, offset=n * FLOW_ROW_LEN),
        flow_bytes=totals[0], flow_first_ns=totals[1], flow_last_ns=totals[2],
        version=h.version,
    )


def decode_index(
    data: bytes, name: str, packets: bool = True, file_size: int | None = None
) -> PacketIndex:
    """Parse an index file held in memory; any damage raises a one-line FormatError.

    `data` is the whole file, or, given the real `file_size`, its first bytes: up to the
    postings frames (`index_bytes`: everything this decodes and verifies), or even only up to
    the end of the summary section, which is then decoded without the checksum, for the
    cheapest possible look at the flow table. Postings frames are never read here.
    """
    h = _checked_header(data, name, file_size)
    if len(data) < (h.frames_offset if packets else h.packets_offset):
        raise ValueError("decode_index needs the file up to its postings frames to read packets")
    view = memoryview(data)
    idx = _summary_index(h, view[h.summary_offset : h.packets_offset], name)
    if packets:
        _decode_packets(idx, view[h.packets_offset : h.frames_offset], name)
    return idx


_PACKET_COLUMNS = ("<i8", "<u8", "<u4", "<u4", "<u4")  # ts delta, gap, caplen, excess, flow


def decode_times(data: bytes, name: str, file_size: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(timestamps, wire lengths) of an index's packets, checked as decode_index checks:
    what a traffic count needs, without rebuilding the offset and flow columns (about half
    of decoding the packet section)."""
    h = _checked_header(data, name, file_size)
    if len(data) < h.frames_offset:
        raise ValueError("decode_times needs the file up to its postings frames")
    n = h.count
    raw = _packet_planes(memoryview(data)[h.packets_offset : h.frames_offset], n, name)
    ts_delta, _, caplen, excess, _ = _from_planes(raw, n, _PACKET_COLUMNS, skip=(1, 4))
    return np.cumsum(ts_delta, dtype=np.int64), caplen + excess


def _packet_planes(blob: bytes | memoryview, n: int, name: str) -> np.ndarray:
    """The packet section of `n` packets, decompressed: the byte planes of its columns."""
    return np.frombuffer(decompress_exact(blob, n * _PACKET_ROW_LEN, "packet section", name),
                         np.uint8)


def _decode_packets(idx: PacketIndex, blob: bytes | memoryview, name: str) -> None:
    n = idx.count
    ts_delta, gap, caplen, excess, flow = _from_planes(_packet_planes(blob, n, name), n,
                                                       _PACKET_COLUMNS)
    idx.ts_ns = np.cumsum(ts_delta, dtype=np.int64)
    # offset[i] = gap[i] + end of record i-1, i.e. the running sum of gaps and record sizes
    sizes = np.empty(n, dtype=np.uint64)
    sizes[:1] = 0
    sizes[1:] = caplen[:-1].astype(np.uint64) + np.uint64(RECORD_HEADER_LEN)
    idx.offset = np.cumsum(gap + sizes, dtype=np.uint64)
    idx.caplen = caplen
    idx.wirelen = caplen + excess
    idx.flow = flow
    if n and int(flow.max()) >= len(idx.flows):
        raise FormatError(f"{name}: damaged index (flow number beyond the flow table)")


def _from_planes(raw: np.ndarray, n: int, dtypes: tuple[str, ...], skip: tuple[int, ...] = ()
                 ) -> list[np.ndarray | None]:
    """The `n`-element columns of `dtypes` that `_byte_planes` wrote into `raw` (None for
    the ones numbered in `skip`)."""
    columns: list[np.ndarray | None] = []
    pos = 0
    for i, dtype in enumerate(dtypes):
        width = np.dtype(dtype).itemsize
        planes = raw[pos : pos + n * width].reshape(width, n)
        columns.append(None if i in skip else _column(planes, np.dtype(dtype)))
        pos += n * width
    return columns


def _column(planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One column from its byte planes (least significant first), little-endian.

    Most columns use few of their bytes (gaps, lengths and time deltas are small; the first
    time delta is a whole timestamp): the high planes that are zero but for the first value
    are not transposed, only the low ones, into a narrower type (the transposition is most
    of decoding; zstd made the zero planes cheap already), and the first value is set whole."""
    width, n = planes.shape
    used = width
    while used and not planes[used - 1, 1:].any():
        used -= 1
    if used > width // 2 or n < 2:
        return np.ascontiguousarray(planes.T).view(dtype).reshape(n)
    narrow = 1 << max(used - 1, 0).bit_length()  # 1, 2 or 4 bytes hold the used planes
    low = np.zeros((n, narrow), np.uint8)
    low[:, :used] = planes[:used].T
    col = low.view(f"<u{narrow}").reshape(n).astype(dtype)
    col[0] = np.frombuffer(planes[:, 0].tobytes(), dtype)[0]
    return col


def index_problem(idx: PacketIndex) -> str | None:
    """The first internal inconsistency of a fully read index, or None.

    The checksum proves the file is what was written; this catches what a faulty writer could
    have written: unsorted or overlapping entries, counts or timestamps that disagree.
    """
    if idx.flow is None:
        raise ValueError("index_problem needs the packet columns")
    n = idx.count
    if n == 0:
        if len(idx.flows):
            return f"no packets but {len(idx.flows)} flows"
        return None
    off = idx.offset.astype(np.int64)
    ends = off[:-1] + RECORD_HEADER_LEN + idx.caplen[:-1].astype(np.int64)
    bad = np.flatnonzero(off[1:] < ends)
    if len(bad):
        i = int(bad[0]) + 1
        return (
            f"entry {i}: offset {off[i]} is not after the end of entry {i - 1} "
            f"(offset {off[i - 1]}, caplen {idx.caplen[i - 1]}): entries not sorted by offset"
        )
    end = int(off[-1]) + RECORD_HEADER_LEN + int(idx.caplen[-1])
    if end > idx.pcap_size:
        return f"last entry ends at byte {end}, past the pcap size {idx.pcap_size} in the header"
    if int(idx.ts_ns.min()) != idx.first_ns or int(idx.ts_ns.max()) != idx.last_ns:
        return "first/last timestamp in the header differ from the entries'"
    counts, wire, first, last = flow_totals(idx.flow, len(idx.flows), idx.ts_ns, idx.wirelen)
    if not np.array_equal(counts, idx.flow_packets):
        f = int(np.flatnonzero(counts != idx.flow_packets)[0])
        return f"flow {f}: summary says {idx.flow_packets[f]} packets, entries say {counts[f]}"
    if idx.has_totals:
        for mine, theirs, what in ((idx.flow_bytes, wire, "wire bytes"),
                                   (idx.flow_first_ns, first, "first timestamp"),
                                   (idx.flow_last_ns, last, "last timestamp")):
            diff = np.flatnonzero(mine.astype(np.int64) != theirs)
            if len(diff):
                f = int(diff[0])
                return f"flow {f}: summary says {what} {mine[f]}, entries say {theirs[f]}"
    return None


def records_problem(idx: PacketIndex, records: RecordTable) -> str | None:
    """The first disagreement between an index's entries and the pcap's records, or None."""
    if idx.flow is None:
        raise ValueError("records_problem needs the packet columns")
    if len(records) != idx.count:
        return f"index has {idx.count} entries but the pcap has {len(records)} complete records"
    if records.complete_end != idx.pcap_size:
        return (
            f"index describes {idx.pcap_size} bytes of pcap, the pcap's complete records "
            f"end at byte {records.complete_end}"
        )
    for name, what in (
        ("offset", "offset"), ("caplen", "captured length"), ("wirelen", "wire length"),
        ("ts_ns", "timestamp"),
    ):
        mine, theirs = getattr(idx, name), getattr(records, name)
        diff = np.flatnonzero(mine.astype(np.int64) != theirs.astype(np.int64))
        if len(diff):
            i = int(diff[0])
            return f"entry {i}: {what} {mine[i]} but the pcap's record {i} has {theirs[i]}"
    return None


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read index: {e.strerror}") from None


def index_bytes(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """(the index's bytes up to its postings frames, the file's size): all that
    `decode_index(data, name, file_size=size)` decodes and verifies, without reading the
    postings frames (megabytes a query that does not use them must not read)."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_LEN)
            h = parse_header(head, name)
            check_size(h, size, name)
            data = head[: h.frames_offset] + f.read(max(h.frames_offset - len(head), 0))
    except OSError as e:
        raise FormatError(f"{name}: cannot read index: {e.strerror}") from None
    if len(data) < h.frames_offset:  # the file shrank under us
        raise FormatError(f"{name}: truncated index ({len(data)} bytes read)")
    return data, size


def read_bins(path: str | os.PathLike[str]) -> tuple[IndexHeader, TimeBins] | None:
    """The header and time bins of the index at `path`, reading its header and directory
    alone (the postings reader's checks: size, directory checksum and shape), the bins
    checked against the header; None for an index written before version 5."""
    try:
        with Postings.read(str(path)) as p:
            h = p.header
            if h.version < FIRST_BINS_VERSION:
                return None
            return h, decode_bins(h, p.directory, str(path))
    except NoPostings:
        return None


def read_index(
    path: str | os.PathLike[str], packets: bool = True, verify: bool = True
) -> PacketIndex:
    """Read an index file; `packets=False` decodes the header and flow table only.

    The postings frames are never read (see `index_bytes`). With `packets=False,
    verify=False` only the header and the summary section are read from disk, skipping the
    checksum (which needs everything before the frames): the fast way to decide whether a
    file can match a query. Every other combination verifies the checksum.
    """
    name = str(path)
    if packets or verify:
        data, size = index_bytes(path)
        return decode_index(data, name, packets=packets, file_size=size)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h = parse_header(f.read(HEADER_LEN), name)
            check_size(h, size, name)
            f.seek(h.summary_offset)
            blob = f.read(h.summary_len)
    except OSError as e:
        raise FormatError(f"{name}: cannot read index: {e.strerror}") from None
    return _summary_index(h, blob, name)


def decode_postings(data: bytes, name: str) -> PostingsSection:
    """The postings of a whole index file, every frame decompressed (for checking them);
    NoPostings for a version without them."""
    h = _checked_header(data, name)
    require_postings(h, name)
    directory = memoryview(data)[h.header_len : h.summary_offset]
    keys = np.frombuffer(directory, KEY_DTYPE, count=h.keys)
    table = np.frombuffer(directory[: h.blocks_at], FRAME_DTYPE, offset=KEY_LEN * h.keys)
    frames = [
        decompress_exact(data[h.frames_offset + off : h.frames_offset + off + length],
                         frame_sizes(m, h.offset_width), f"postings frame {i}", name)
        for i, (off, length, m) in enumerate(table.tolist())
    ]
    blocks = np.frombuffer(directory[h.blocks_at : h.bins_at], BLOCK_DTYPE)
    return PostingsSection(keys, frames, table["entries"].astype(np.int64), blocks,
                           h.offset_width, bytes(directory[h.bins_at : h.bins_at + h.bins_len]))


def read_postings(path: str | os.PathLike[str]) -> PostingsSection:
    """`decode_postings` of the file at `path`: the whole file, frames included."""
    return decode_postings(_read_file(path), str(path))


def key_text(key: np.void) -> str:
    """A postings key (KEY_DTYPE row) in words, for messages."""
    et = int(key["ethertype"])
    if key["flags"] & KEY_UNKNOWN:
        return f"address unknown, ethertype 0x{et:04x}"
    return f"{address_text(key['address'], 6 if et == ETHERTYPE_IPV6 else 4)}, ethertype 0x{et:04x}"


def postings_problem(stored: PostingsSection, fresh: PostingsSection) -> str | None:
    """The first difference between stored postings and those rebuilt from the pcap, or None.

    Compared uncompressed: the same content compresses differently across zstd releases.
    """
    a, b = stored.keys, fresh.keys
    n = min(len(a), len(b))
    row = np.dtype((np.void, KEY_LEN))
    diff = np.flatnonzero(a[:n].view(row) != b[:n].view(row))
    if len(diff) or len(a) != len(b):
        i = int(diff[0]) if len(diff) else n
        mine = _key_counts(a[i]) if i < len(a) else "no such key"
        theirs = _key_counts(b[i]) if i < len(b) else "no such key"
        return f"postings key {i} ({mine}) but the pcap gives ({theirs})"
    if len(stored.frames) != len(fresh.frames):
        return (f"postings have {len(stored.frames)} frames but the pcap's would have "
                f"{len(fresh.frames)}")
    for f, (mine, theirs) in enumerate(zip(stored.frames, fresh.frames, strict=True)):
        if mine != theirs:
            return f"postings {_first_different_list(stored, fresh, f)} differ from the pcap's"
    x, y = stored.blocks, fresh.blocks
    diff = np.flatnonzero(x.view(np.void(BLOCK_ENTRY_LEN).dtype) != y.view(
        np.void(BLOCK_ENTRY_LEN).dtype)) if len(x) == len(y) else [min(len(x), len(y))]
    if len(diff):
        i = int(diff[0])
        mine = tuple(x[i].tolist()) if i < len(x) else "no such block"
        theirs = tuple(y[i].tolist()) if i < len(y) else "no such block"
        return (f"postings time block {i} (offset, min, max ns {mine}) but the pcap gives "
                f"({theirs})")
    if stored.bins and stored.bins != fresh.bins:  # none before version 5
        return "time bins (packets and bytes per second) differ from the pcap's"
    return None


def _key_counts(key: np.void) -> str:
    sources, count = int(key["sources"]), int(key["count"])
    return f"{key_text(key)}: {count} entries, {sources} as source"


def _first_different_list(stored: PostingsSection, fresh: PostingsSection, frame: int) -> str:
    """Names the first list of `frame` whose entries differ between two sections with the
    same keys."""
    keys = fresh.keys
    m, theirs_m = int(stored.entries[frame]), int(fresh.entries[frame])
    mine, theirs = stored.frames[frame], fresh.frames[frame]
    if m == theirs_m:
        for k in np.flatnonzero(keys["frame"] == frame).tolist():
            first, count = int(keys["first"][k]), int(keys["count"][k])
            if (list_columns(mine, m, first, count, stored.offset_bytes)
                    != list_columns(theirs, m, first, count, fresh.offset_bytes)):
                return f"of key {k} ({key_text(keys[k])})"
    return f"frame {frame}"
