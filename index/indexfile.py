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
from pathlib import Path

import numpy as np

from .errors import FormatError
from .pcapfile import RECORD_HEADER_LEN, RecordTable
from .zstdlib import zstd

MAGIC = b"PVIDX\x00\r\n"
VERSION = 2
# Version 1 differs only in recording no addresses for ARP/RARP rows, which version 2 readers
# take as "addresses unknown" (as for a frame cut short): still read, never rewritten.
READABLE_VERSIONS = (1, 2)
HEADER_LEN = 64
# magic, version, flags, linktype, count, first_ns, last_ns, pcap_size,
# nflows, summary_len, packets_len, crc
_HEADER = struct.Struct("<8sHHIQqqQIIII")
_HEADER_FLAG_NS = 1
# zstd level: on byte-transposed columns level 1 compresses as well as higher levels (measured
# with bench/index_build.py), at twice the speed of level 3.
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


@dataclass(eq=False)
class PacketIndex:
    """An index in memory: header fields, distinct-flow table and (optionally) packet columns.

    `flows` is a FLOW_DTYPE array sorted as the file stores it; `flow_packets[i]` is the number
    of packets of flow i. The packet columns are None when only the summary was read.
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
    version: int = VERSION  # of the file it was read from; writing always writes VERSION

    @property
    def has_packets(self) -> bool:
        return self.flow is not None


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
    nothing and zstd runs several times faster than on interleaved bytes.
    """
    total = sum(c.nbytes for c in columns)
    out = np.empty(total, dtype=np.uint8)
    pos = 0
    for col in columns:
        n, width = len(col), col.itemsize
        out[pos : pos + col.nbytes].reshape(width, n)[:] = col.view(np.uint8).reshape(n, width).T
        pos += col.nbytes
    return out


def _summary_section(idx: PacketIndex) -> bytes:
    flows = np.ascontiguousarray(idx.flows, dtype=FLOW_DTYPE)
    return flows.tobytes() + np.asarray(idx.flow_packets, dtype="<u4").tobytes()


def encode_index(idx: PacketIndex) -> bytes:
    """The complete index file as bytes."""
    count = idx.count
    for name in ("ts_ns", "offset", "caplen", "wirelen", "flow"):
        col = getattr(idx, name)
        if col is None or len(col) != count:
            raise ValueError(f"index column {name} must have {count} entries")
    if len(idx.flows) != len(idx.flow_packets):
        raise ValueError("flows and flow_packets differ in length")
    summary = zstd.compress(_summary_section(idx), ZSTD_LEVEL)
    packets = zstd.compress(_byte_planes(_packet_columns(idx)), ZSTD_LEVEL)
    head = _HEADER.pack(
        MAGIC, VERSION, _HEADER_FLAG_NS if idx.nanosecond else 0, idx.linktype, count,
        idx.first_ns, idx.last_ns, idx.pcap_size, len(idx.flows), len(summary), len(packets), 0,
    )[:60]
    crc = zlib.crc32(packets, zlib.crc32(summary, zlib.crc32(head)))
    return head + struct.pack("<I", crc) + summary + packets


def temp_path(path: str | os.PathLike[str]) -> Path:
    """Where a file is written before being renamed into place (FORMAT.md convention)."""
    path = Path(path)
    return path.with_name(f".{path.name}.part")


def write_index(path: str | os.PathLike[str], idx: PacketIndex) -> None:
    """Write atomically: a reader never sees a half-written index under the final name."""
    path = Path(path)
    data = encode_index(idx)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True)
class IndexHeader:
    """The fixed 64-byte header, decoded."""

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


def parse_header(data: bytes, name: str) -> IndexHeader:
    """Decode and sanity-check the header; version is checked before anything else changes."""
    if len(data) < 10 or data[:8] != MAGIC:
        if len(data) < 8 and MAGIC.startswith(data):
            raise FormatError(f"{name}: truncated index ({len(data)} bytes)")
        raise FormatError(f"{name}: not a pcapvault index (bad magic)")
    (version,) = struct.unpack_from("<H", data, 8)
    if version not in READABLE_VERSIONS:
        newer = "newer than" if version > VERSION else "unknown to"
        readable = " and ".join(map(str, READABLE_VERSIONS))
        raise FormatError(
            f"{name}: index format version {version} is {newer} this pcapvault, "
            f"which reads versions {readable}"
        )
    if len(data) < HEADER_LEN:
        raise FormatError(f"{name}: truncated index ({len(data)} bytes, header is 64)")
    (_, version, flags, linktype, count, first_ns, last_ns, pcap_size, nflows,
     slen, plen, crc) = _HEADER.unpack_from(data)
    return IndexHeader(
        version, bool(flags & _HEADER_FLAG_NS), linktype, count, first_ns, last_ns, pcap_size,
        nflows, slen, plen, crc,
    )


def _decompress(blob: bytes, expected: int, what: str, name: str) -> bytes:
    """Decompress one section, never producing more than it should hold (a damaged or hostile
    frame must not make the reader allocate whatever size it claims)."""
    d = zstd.ZstdDecompressor()
    try:
        raw = d.decompress(blob, max_length=expected + 1)
    except zstd.ZstdError as e:
        raise FormatError(f"{name}: damaged index ({what} does not decompress: {e})") from None
    if len(raw) != expected or not d.eof or d.unused_data:
        size = f"{len(raw)}+" if len(raw) > expected else str(len(raw))
        raise FormatError(
            f"{name}: damaged index ({what} is {size} bytes, expected {expected})"
        )
    return raw


def decode_index(
    data: bytes, name: str, packets: bool = True, file_size: int | None = None
) -> PacketIndex:
    """Parse an index file held in memory; any damage raises a one-line FormatError.

    `data` is normally the whole file. Given the real `file_size`, it may stop after the
    summary section: the summary is then decoded without the checksum (which covers both
    sections), for the cheapest possible look at the flow table.
    """
    h = parse_header(data, name)
    expected_size = HEADER_LEN + h.summary_len + h.packets_len
    size = len(data) if file_size is None else file_size
    if size != expected_size:
        what = "truncated" if size < expected_size else "trailing garbage in"
        raise FormatError(f"{name}: {what} index ({size} bytes, header says {expected_size})")
    whole = len(data) == expected_size
    if not whole and (packets or len(data) < HEADER_LEN + h.summary_len):
        raise ValueError("decode_index needs the whole file to read packets")
    if whole:
        crc = zlib.crc32(memoryview(data)[HEADER_LEN:], zlib.crc32(memoryview(data)[:60]))
        if crc != h.crc:
            raise FormatError(f"{name}: damaged index (checksum mismatch)")
    summary = _decompress(
        data[HEADER_LEN : HEADER_LEN + h.summary_len], h.nflows * (FLOW_ROW_LEN + 4),
        "summary section", name,
    )
    flows = np.frombuffer(summary, dtype=FLOW_DTYPE, count=h.nflows)
    flow_packets = np.frombuffer(summary, dtype="<u4", offset=h.nflows * FLOW_ROW_LEN)
    idx = PacketIndex(
        nanosecond=h.nanosecond, linktype=h.linktype, count=h.count, first_ns=h.first_ns,
        last_ns=h.last_ns, pcap_size=h.pcap_size, flows=flows, flow_packets=flow_packets,
        version=h.version,
    )
    if packets:
        _decode_packets(idx, data[HEADER_LEN + h.summary_len :], name)
    return idx


def _decode_packets(idx: PacketIndex, blob: bytes, name: str) -> None:
    n = idx.count
    raw = np.frombuffer(_decompress(blob, n * _PACKET_ROW_LEN, "packet section", name), np.uint8)
    columns = []
    pos = 0
    for dtype in ("<i8", "<u8", "<u4", "<u4", "<u4"):
        width = np.dtype(dtype).itemsize
        planes = raw[pos : pos + n * width].reshape(width, n)
        columns.append(np.ascontiguousarray(planes.T).view(dtype).reshape(n))
        pos += n * width
    ts_delta, gap, caplen, excess, flow = columns
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
    counts = np.bincount(idx.flow, minlength=len(idx.flows))
    if not np.array_equal(counts, idx.flow_packets):
        f = int(np.flatnonzero(counts != idx.flow_packets)[0])
        return f"flow {f}: summary says {idx.flow_packets[f]} packets, entries say {counts[f]}"
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


def read_index(
    path: str | os.PathLike[str], packets: bool = True, verify: bool = True
) -> PacketIndex:
    """Read an index file; `packets=False` decodes the header and flow table only.

    With `packets=False, verify=False` only the header and the summary section are read from
    disk, skipping the checksum (which needs the whole file): the fast way to decide whether a
    file can match a query. Every other combination verifies the checksum.
    """
    name = str(path)
    try:
        with open(path, "rb") as f:
            if packets or verify:
                return decode_index(f.read(), name, packets=packets)
            size = os.fstat(f.fileno()).st_size
            head = f.read(HEADER_LEN)
            summary_len = parse_header(head, name).summary_len
            data = head + f.read(summary_len) if len(head) == HEADER_LEN else head
            return decode_index(data, name, packets=False, file_size=size)
    except OSError as e:
        raise FormatError(f"{name}: cannot read index: {e.strerror}") from None
