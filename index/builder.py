"""Build the index of a pcap: per-packet columns plus the distinct-flow table.

Indexing must keep up with capture, so nothing here touches packets one at a time in Python.
Packets are processed in batches: the first bytes of every frame of a batch are copied side by
side, every header field is then read for the whole batch with one numpy gather at per-packet
positions, and protocol decisions are boolean masks. Fields a packet does not carry (or that
lie beyond its captured length) come out as "absent"; no input can make the builder fail.

The header walk follows libpcap's view of a frame (which is what `tcpdump FILTER` sees), so
that an index query never misses a packet tcpdump would select: IPv4 is recognised by the
ethertype, its transport header is found at 4 x IHL, and a non-first fragment (offset != 0)
has no ports. IPv6 extension headers are walked further than libpcap does, which can only add
matches.

Each packet's flow fields are packed into the 48-byte flow row of FORMAT.md (six uint64
words); rows are deduplicated through a 64-bit hash that is then verified against the rows.
"""

from __future__ import annotations

import os

import numpy as np

from .indexfile import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ETHERTYPE_RARP,
    FLAG_ADDRS,
    FLAG_FRAGMENT,
    FLAG_PORTS,
    FLAG_PROTO,
    FLOW_DTYPE,
    PORT_PROTOCOLS,
    VLAN_ABSENT,
    VLAN_TPIDS,
    VLAN_UNREADABLE,
    PacketIndex,
    flow_totals,
)
from .pcapfile import (
    RECORD_HEADER_LEN,
    PcapHeader,
    PcapReader,
    RecordLocations,
    RecordTable,
    as_bytes_array,
    gather_bytes,
    locate_records,
    timestamps_ns,
)

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

# Packets per vectorised batch: large enough to amortise numpy's per-call cost, small enough
# for a batch's working set to stay in the CPU caches.
CHUNK = 32768
# Bytes of each frame parsed from a compact copy: Ethernet + 802.1Q + IPv6 + ports fit.
HEAD = 64
# VLAN tags looked through (QinQ and a little more); the first two ids are recorded.
MAX_VLAN_TAGS = 4
# IPv6 extension headers followed before giving up on finding the transport protocol.
MAX_IPV6_EXTENSIONS = 8
IPV6_EXTENSIONS = (0, 43, 44, 51, 60, 135, 139, 140, 253, 254)
# Where libpcap's `arp host` looks: sender and target protocol address, from the ARP header.
ARP_SENDER = 14
ARP_TARGET = 24
ARP_ADDRS_END = ARP_TARGET + 4
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

_ROW_WORDS = FLOW_DTYPE.itemsize // 8
_MAPPED = np.uint64(0xFFFF << 16)  # low word of ::ffff:0:0 before the IPv4 address
_HASH_MULT = np.array(
    [0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
     0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53],
    dtype=np.uint64,
)


class _Bytes:
    """Typed reads of one field for many packets at arbitrary (unaligned) byte positions.

    Positions past the end of the buffer are clamped rather than rejected: the value read
    there is garbage, but every caller masks it out by comparing with the captured length.
    """

    def __init__(self, arr: np.ndarray):
        self.arr = arr
        self._views: dict[str, np.ndarray] = {}

    def _view(self, dtype: str) -> np.ndarray:
        view = self._views.get(dtype)
        if view is None:
            size = np.dtype(dtype).itemsize
            count = max(len(self.arr) - size + 1, 0)
            view = np.ndarray(shape=(count,), dtype=dtype, buffer=self.arr, strides=(1,))
            self._views[dtype] = view
        return view

    def read(self, dtype: str, pos: np.ndarray) -> np.ndarray:
        view = self._view(dtype)
        if len(view) == 0:
            return np.zeros(len(pos), dtype=view.dtype.newbyteorder("="))
        return view[np.minimum(pos, len(view) - 1)]

    def u8(self, pos: np.ndarray) -> np.ndarray:
        return self.read("u1", pos)

    def be16(self, pos: np.ndarray) -> np.ndarray:
        return self.read(">u2", pos).astype(np.uint16)

    def be32(self, pos: np.ndarray) -> np.ndarray:
        return self.read(">u4", pos).astype(np.uint32)

    def le64(self, pos: np.ndarray) -> np.ndarray:
        return self.read("<u8", pos)


class _Share:
    """The packets of a batch one protocol parser handles, and how its results are stored.

    A small share is compressed to an index array: less work per packet, but a gather per
    field read and a scatter per field stored. A large share is parsed over the whole batch
    and stored under a mask: the other packets' results are computed for nothing, which costs
    less than gathers and scatters once they are a minority.
    """

    def __init__(self, mask: np.ndarray):
        count = int(np.count_nonzero(mask))
        self.empty = count == 0
        self.sel: slice | np.ndarray = slice(None)
        self.where: np.ndarray | None = None
        if count * 2 < len(mask):
            self.sel = np.flatnonzero(mask)
        elif count < len(mask):
            self.where = mask

    def put(self, dst: np.ndarray, value: np.ndarray | int) -> None:
        """Store the parser's results for its packets into a batch array."""
        if self.where is None:
            dst[self.sel] = value
        else:  # np.where is vectorised; copyto(where=) is not
            dst[...] = np.where(self.where, np.asarray(value).astype(dst.dtype, copy=False), dst)


def _isin(values: np.ndarray, choices: tuple[int, ...]) -> np.ndarray:
    hit = values == choices[0]
    for c in choices[1:]:
        hit |= values == c
    return hit


class _Batch:
    """The flow fields of a batch of packets, filled in layer by layer."""

    def __init__(self, data: np.ndarray, caplen: np.ndarray):
        n = len(data)
        self.data = data  # position of each frame's first byte
        self.end = data + caplen  # position just after its last captured byte
        self.ethertype = np.zeros(n, dtype=np.uint64)
        self.vlan1 = np.full(n, VLAN_ABSENT, dtype=np.uint64)
        self.vlan2 = np.full(n, VLAN_ABSENT, dtype=np.uint64)
        self.l3 = data.copy()  # position of the network header
        self.ipver = np.zeros(n, dtype=np.uint64)
        self.proto = np.zeros(n, dtype=np.uint64)
        self.flags = np.zeros(n, dtype=np.uint64)
        self.ports = np.zeros(n, dtype=np.uint64)  # sport | dport << 16
        # The flow rows, column-major (word j of every row is contiguous, which is what the
        # vectorised steps read); parsers write the address words (2..5) directly.
        self.words = np.zeros((_ROW_WORDS, n), dtype=np.uint64)
        # Just past the last byte the parse looked at (or wanted to).
        self.need = data.copy()

    def rows(self) -> np.ndarray:
        """The batch's flow rows as (6, n) uint64 words: row i is column i (FORMAT.md layout)."""
        w = self.words
        w[0] = (
            self.ethertype | (self.vlan1 << 16) | (self.vlan2 << 32) | (self.ipver << 48)
            | (self.proto << 56)
        )
        w[1] = self.flags | (self.ports << 16)
        return w


def _parse_type_and_tags(b: _Bytes, batch: _Batch, type_pos: np.ndarray, l3: np.ndarray) -> None:
    """Read the ethertype at `type_pos`, then look through VLAN tags starting at `l3`.

    A tag whose TCI is cut off is recorded as VLAN_UNREADABLE (the frame is still tagged as far
    as `tcpdump vlan` is concerned); a type field that is cut off leaves ethertype 0.
    """
    end = batch.end
    readable = end >= type_pos + 2
    batch.ethertype[:] = np.where(readable, b.be16(type_pos), 0)
    batch.l3 = l3.copy()
    todo = np.flatnonzero(_isin(batch.ethertype, VLAN_TPIDS))
    for depth in range(MAX_VLAN_TAGS):
        if len(todo) == 0:
            break
        tci_pos = batch.l3[todo]
        e = end[todo]
        vid = np.where(e >= tci_pos + 2, b.be16(tci_pos) & 0x0FFF, VLAN_UNREADABLE)
        if depth == 0:
            batch.vlan1[todo] = vid
        elif depth == 1:
            batch.vlan2[todo] = vid
        et = np.where(e >= tci_pos + 4, b.be16(tci_pos + 2), 0).astype(np.uint64)
        batch.ethertype[todo] = et
        batch.l3[todo] = tci_pos + 4
        todo = todo[_isin(et, VLAN_TPIDS)]
    batch.need = batch.l3.copy()


def _flag_bits(proto_ok: np.ndarray, fragment: np.ndarray, addr_ok: np.ndarray,
               ports_ok: np.ndarray) -> np.ndarray:
    flags = proto_ok.astype(np.uint64) * FLAG_PROTO
    flags |= fragment.astype(np.uint64) * FLAG_FRAGMENT
    flags |= addr_ok.astype(np.uint64) * FLAG_ADDRS
    flags |= ports_ok.astype(np.uint64) * FLAG_PORTS
    return flags


def _parse_ipv4(b: _Bytes, batch: _Batch, share: _Share) -> None:
    p = batch.l3[share.sel]
    e = batch.end[share.sel]
    proto_ok = e >= p + 10
    proto = np.where(proto_ok, b.u8(p + 9), 0).astype(np.uint64)
    nonfirst = (e >= p + 8) & ((b.be16(p + 6) & 0x1FFF) != 0)
    addr_ok = e >= p + 20
    l4 = p + ((b.u8(p) & 0x0F).astype(np.int64) << 2)
    ports_ok = proto_ok & ~nonfirst & _isin(proto, PORT_PROTOCOLS) & (e >= l4 + 4)
    share.put(batch.ipver, 4)
    share.put(batch.proto, proto)
    share.put(batch.flags, _flag_bits(proto_ok, nonfirst, addr_ok, ports_ok))
    share.put(batch.ports, _read_ports(b, l4, ports_ok))
    share.put(batch.need, np.maximum(p + 20, l4 + 4))
    # Both addresses in one 8-byte read: source in the low half, destination in the high half.
    pair = np.where(addr_ok, b.le64(p + 12), 0)
    mapped = np.where(addr_ok, _MAPPED, 0)
    share.put(batch.words[3], mapped | (pair << 32))
    share.put(batch.words[5], mapped | (pair & np.uint64(0xFFFFFFFF00000000)))


def _read_ports(b: _Bytes, l4: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Source and destination port as sport | dport << 16 (0 where not `ok`)."""
    ports = b.be32(l4).astype(np.uint64)
    return np.where(ok, (ports >> 16) | ((ports & 0xFFFF) << 16), 0)


def _parse_ipv6(b: _Bytes, batch: _Batch, share: _Share) -> None:
    p = batch.l3[share.sel]
    e = batch.end[share.sel]
    n = len(p)
    known = e >= p + 7
    nh = np.where(known, b.u8(p + 6), 0).astype(np.uint64)
    cur = p + 40  # position of the header `nh` describes
    nonfirst = np.zeros(n, dtype=bool)
    todo = np.flatnonzero(known & _isin(nh, IPV6_EXTENSIONS))
    for _ in range(MAX_IPV6_EXTENSIONS):
        if len(todo) == 0:
            break
        c, h, ee = cur[todo], nh[todo], e[todo]
        next_ok = ee >= c + 1
        nxt = b.u8(c).astype(np.uint64)
        frag = h == _IPV6_FRAGMENT
        length = b.u8(c + 1).astype(np.int64)
        size = np.where(frag, 8, np.where(h == _IPV6_AH, (length + 2) * 4, (length + 1) * 8))
        # Header length cut off: the next protocol may still be known, but nothing after it.
        size = np.where(frag | (ee >= c + 2), size, ee + 1 - c)
        nonfirst[todo] |= frag & (ee >= c + 4) & ((b.be16(c + 2) & 0xFFF8) != 0)
        known[todo] = next_ok
        nh[todo] = np.where(next_ok, nxt, h)
        cur[todo] = c + size
        todo = todo[next_ok & _isin(nxt, IPV6_EXTENSIONS)]
    known[todo] = False  # still inside extension headers: the transport protocol is unknown
    nh[~known] = 0
    addr_ok = e >= p + 40
    ports_ok = known & ~nonfirst & _isin(nh, PORT_PROTOCOLS) & (e >= cur + 4)
    share.put(batch.ipver, 6)
    share.put(batch.proto, nh)
    share.put(batch.flags, _flag_bits(known, nonfirst, addr_ok, ports_ok))
    share.put(batch.ports, _read_ports(b, cur, ports_ok))
    share.put(batch.need, cur + 4)  # cur >= p + 40
    for word, at in enumerate((8, 16, 24, 32), start=2):
        share.put(batch.words[word], np.where(addr_ok, b.le64(p + at), 0))


def _parse_arp(b: _Bytes, batch: _Batch, share: _Share) -> None:
    """ARP and RARP: the protocol addresses at the fixed offsets libpcap's `arp host` reads.

    libpcap compiles `host X` to look at bytes 14-17 (sender) and 24-27 (target) of any ARP
    or RARP frame, whatever its hardware and protocol types say, so those bytes are recorded
    as they are, in the IPv4-mapped form. Without them every host filter would have to read
    every ARP frame of a file.
    """
    p = batch.l3[share.sel]
    addr_ok = batch.end[share.sel] >= p + ARP_ADDRS_END
    share.put(batch.flags, addr_ok.astype(np.uint64) * FLAG_ADDRS)
    share.put(batch.need, p + ARP_ADDRS_END)
    mapped = np.where(addr_ok, _MAPPED, 0)
    for word, at in ((3, ARP_SENDER), (5, ARP_TARGET)):
        addr = b.read("<u4", p + at).astype(np.uint64)
        share.put(batch.words[word], np.where(addr_ok, mapped | (addr << np.uint64(32)), 0))


def _parse_network(b: _Bytes, batch: _Batch) -> None:
    et = batch.ethertype
    for mask, parse in (
        (et == ETHERTYPE_IPV4, _parse_ipv4),
        (et == ETHERTYPE_IPV6, _parse_ipv6),
        ((et == ETHERTYPE_ARP) | (et == ETHERTYPE_RARP), _parse_arp),
    ):
        share = _Share(mask)
        if not share.empty:
            parse(b, batch, share)


def _parse_raw_ip(b: _Bytes, batch: _Batch) -> None:
    """Link types without a link header: the IP version nibble stands in for the ethertype."""
    version = np.where(batch.end > batch.data, b.u8(batch.data) >> 4, 0)
    batch.ethertype[:] = np.select([version == 4, version == 6], [ETHERTYPE_IPV4, ETHERTYPE_IPV6])


def _parse(
    buf: np.ndarray, linktype: int, data: np.ndarray, caplen: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(flow rows, parse extent) of frames at positions `data` of `buf`."""
    b = _Bytes(buf)
    batch = _Batch(data, caplen)
    if linktype == LINKTYPE_ETHERNET:
        _parse_type_and_tags(b, batch, data + 12, data + 14)
    elif linktype == LINKTYPE_LINUX_SLL:
        _parse_type_and_tags(b, batch, data + 14, data + 16)
    elif linktype == LINKTYPE_LINUX_SLL2:
        _parse_type_and_tags(b, batch, data, data + 20)  # protocol type comes first in SLL2
    elif linktype in (LINKTYPE_RAW, LINKTYPE_IPV4, LINKTYPE_IPV6):
        _parse_raw_ip(b, batch)
    else:
        return batch.rows(), batch.need  # unknown link layer: every field absent
    _parse_network(b, batch)
    return batch.rows(), batch.need


def _records_and_rows(
    arr: np.ndarray, linktype: int, offset: np.ndarray, caplen: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(record headers as (n, 16) bytes, flow rows (6 words, n)) of the records at `offset`.

    Each record's header and the first HEAD bytes of its frame are copied side by side in one
    gather, so that the dozens of field reads that follow hit a few cache-resident megabytes
    instead of the whole file. The rare frames whose headers reach past HEAD are parsed again
    from the file itself.
    """
    offset = offset.astype(np.int64)
    caplen = caplen.astype(np.int64)
    width = RECORD_HEADER_LEN + HEAD
    recs = gather_bytes(arr, offset, width)
    base = np.arange(len(offset), dtype=np.int64) * width + RECORD_HEADER_LEN
    rows, need = _parse(recs.reshape(-1), linktype, base, np.minimum(caplen, HEAD))
    redo = np.flatnonzero((caplen > HEAD) & (need > base + HEAD))
    if len(redo):
        rows[:, redo] = _parse(arr, linktype, offset[redo] + RECORD_HEADER_LEN, caplen[redo])[0]
    return recs[:, :RECORD_HEADER_LEN], rows


def hash_rows(words: np.ndarray) -> np.ndarray:
    """64-bit multiply-xor hash of each row (column of `words`); collisions are caught by the
    caller's check."""
    h = words[0] * _HASH_MULT[0]
    for j in range(1, _ROW_WORDS):
        h ^= h >> np.uint64(29)
        h ^= words[j]
        h *= _HASH_MULT[j]
    return h


def _group_by_hash(h: np.ndarray, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """(perm, starts): perm orders `h`, starts[i] is True where a new hash value begins.

    Unless `full`, the low bits of each hash are replaced by the element's index so that a
    plain value sort (faster than argsort: docs/BENCHMARKS.md, D3) yields the permutation too; the
    shortened hash can collide more often, which the caller's check catches.
    """
    n = len(h)
    bits = max(n - 1, 1).bit_length()
    if not full and bits <= 24:
        shift = np.uint64(bits)
        key = (h >> shift) << shift
        key |= np.arange(n, dtype=np.uint64)
        key.sort()
        perm = (key & np.uint64((1 << bits) - 1)).astype(np.intp)
        sh = key >> shift
    else:
        perm = np.argsort(h)
        sh = h[perm]
    starts = np.empty(n, dtype=bool)
    starts[:1] = True
    np.not_equal(sh[1:], sh[:-1], out=starts[1:])
    return perm, starts


def hash_groups(h: np.ndarray, full: bool) -> tuple[np.ndarray, np.ndarray]:
    """(group of each element, first element of each group) of hash values, the groups in
    hash order; unless `full`, hashes may share a group when they differ only in their low
    bits (see _group_by_hash): the caller checks the rows and asks again with `full`."""
    perm, starts = _group_by_hash(h, full)
    inv = np.empty(len(h), dtype=np.intp)
    inv[perm] = np.cumsum(starts) - 1
    return inv, perm[starts]


def distinct_rows(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(distinct rows, inverse, their hashes) of the rows (columns) of `words`:
    words == distinct[:, inverse], exactly; the distinct rows come in hash order.

    Sorting 64-bit hashes is much faster than sorting 48-byte rows. Rows are compared after
    grouping, so a hash collision (accidental or crafted) costs time, never correctness; the
    hashes are None when distinct rows share a hash.
    """
    h = hash_rows(words)
    for full in (False, True):
        inv, first = hash_groups(h, full)
        reps = words[:, first]
        if all(np.array_equal(rep[inv], word) for rep, word in zip(reps, words, strict=True)):
            rep_h = h[first]
            return reps, inv, rep_h if full or _strictly_increasing(rep_h) else None
    reps, inv = np.unique(words.T, axis=0, return_inverse=True)
    return np.ascontiguousarray(reps.T), inv.reshape(-1), None


def _strictly_increasing(a: np.ndarray) -> bool:
    return bool((a[1:] > a[:-1]).all())


class FlowTableBuilder:
    """Accumulates flow rows, batch by batch, into one sorted distinct-flow table.

    Each block of up to BLOCK packets is deduplicated on its own (one sort of 64-bit hashes),
    then its distinct rows are looked up by hash among the flows of earlier blocks, so that
    flows recurring over the whole file are compared once per block, not once per packet.
    Memory stays bounded at one block of rows plus a uint32 per packet.
    """

    BLOCK = 1 << 18

    def __init__(self) -> None:
        self._pending: list[np.ndarray] = []
        self._npending = 0
        self._flow_parts: list[np.ndarray] = []  # per block: packet -> flow id
        self._rows = np.zeros((_ROW_WORDS, 1024), dtype=np.uint64)  # flow id -> row (column)
        self._nflows = 0
        self._hashes = np.zeros(0, dtype=np.uint64)  # hashes of all flows, sorted
        self._ids = np.zeros(0, dtype=np.int64)  # flow id of each of _hashes
        # Blocks' own distinct rows, kept only to redo the merge exactly after a collision.
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []
        self._collided = False

    def add(self, words: np.ndarray) -> None:
        """Add the flow rows (6 uint64 words, n) of the next packets."""
        self._pending.append(words)
        self._npending += words.shape[1]
        if self._npending >= self.BLOCK:
            self._flush()

    def _flush(self) -> None:
        if self._npending == 0:
            return
        words = (
            self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending, axis=1)
        )
        self._pending, self._npending = [], 0
        reps, inv, rep_h = distinct_rows(words)
        self._blocks.append((reps, inv))
        if self._collided or rep_h is None:
            self._collided = True
            return
        ids = self._merge(reps, rep_h)
        if ids is None:
            self._collided = True
            return
        self._flow_parts.append(ids[inv].astype(np.uint32))

    def _merge(self, reps: np.ndarray, rep_h: np.ndarray) -> np.ndarray | None:
        """Flow ids of a block's distinct rows, adding the new ones; None on a collision."""
        known_h = self._hashes
        at = np.searchsorted(known_h, rep_h)
        pos = np.minimum(at, max(len(known_h) - 1, 0))
        found = (known_h[pos] == rep_h) if len(known_h) else np.zeros(len(rep_h), dtype=bool)
        ids = np.empty(len(rep_h), dtype=np.int64)
        ids[found] = self._ids[pos[found]]
        old = self._rows[:, ids[found]]
        if not np.array_equal(old, reps[:, found]):
            return None
        new = np.flatnonzero(~found)
        first, count = self._nflows, len(new)
        ids[new] = np.arange(first, first + count)
        if first + count > self._rows.shape[1]:
            grown = np.zeros((_ROW_WORDS, max(2 * self._rows.shape[1], first + count)),
                             dtype=np.uint64)
            grown[:, :first] = self._rows[:, :first]
            self._rows = grown
        self._rows[:, first : first + count] = reps[:, new]
        self._nflows += count
        # rep_h is sorted, so inserting the new hashes at their search positions keeps the
        # table sorted without sorting it again
        self._hashes = np.insert(known_h, at[new], rep_h[new])
        self._ids = np.insert(self._ids, at[new], ids[new])
        return ids

    def _exact_flows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, per-packet flow ids) by deduplicating all blocks' rows together: exact
        whatever the hashes do, but holds every block's distinct rows at once."""
        rows, ginv, _ = distinct_rows(np.concatenate([r for r, _ in self._blocks], axis=1))
        parts, base = [], 0
        for reps, inv in self._blocks:
            parts.append(ginv[base + inv].astype(np.uint32))
            base += reps.shape[1]
        return rows, np.concatenate(parts)

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(flows as FLOW_DTYPE sorted, per-flow packet counts, per-packet flow numbers)."""
        self._flush()
        if not self._blocks:
            return np.zeros(0, FLOW_DTYPE), np.zeros(0, np.uint32), np.zeros(0, np.uint32)
        if self._collided:
            rows, flow_ids = self._exact_flows()
        else:
            rows, flow_ids = self._rows[:, : self._nflows], np.concatenate(self._flow_parts)
        order = np.lexsort(_sort_keys(rows))
        rank = np.empty(len(order), dtype=np.uint32)
        rank[order] = np.arange(len(order), dtype=np.uint32)
        flow = rank[flow_ids]
        flows = np.ascontiguousarray(rows[:, order].T).view(FLOW_DTYPE).reshape(-1)
        counts = np.bincount(flow, minlength=len(flows)).astype(np.uint32)
        return flows, counts, flow


def _sort_keys(rows: np.ndarray) -> list[np.ndarray]:
    """np.lexsort keys (least significant first) ordering rows field by field as FORMAT.md says:
    ethertype, vlan1, vlan2, ipver, proto, flags, sport, dport, src, dst (addresses
    byte-wise)."""
    w0, w1 = rows[0], rows[1]
    head = (
        ((w0 & 0xFFFF) << 48) | (((w0 >> 16) & 0xFFFF) << 32) | (((w0 >> 32) & 0xFFFF) << 16)
        | (((w0 >> 48) & 0xFF) << 8) | (w0 >> 56)
    )
    ports = ((w1 & 0xFF) << 32) | (((w1 >> 16) & 0xFFFF) << 16) | ((w1 >> 32) & 0xFFFF)
    addrs = rows[2:].byteswap()  # big-endian words compare like the bytes they hold
    return [addrs[3], addrs[2], addrs[1], addrs[0], ports, head]


def _index(
    arr: np.ndarray,
    header: PcapHeader,
    offset: np.ndarray,
    caplen: np.ndarray,
    complete_end: int,
    records: RecordTable | None,
) -> PacketIndex:
    """Index records at `offset`; timestamps and wire lengths come from `records` when given,
    else from the record headers gathered along with the frames."""
    n = len(offset)
    flows = FlowTableBuilder()
    if records is None:
        ts_ns = np.empty(n, dtype=np.int64)
        wirelen = np.empty(n, dtype=np.uint32)
    else:
        ts_ns, wirelen = records.ts_ns, records.wirelen
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        heads, rows = _records_and_rows(arr, header.linktype, offset[lo:hi], caplen[lo:hi])
        flows.add(rows)
        if records is None:
            fields = heads.view(header.byteorder + "u4")
            ts_ns[lo:hi] = timestamps_ns(fields[:, 0], fields[:, 1], header.nanosecond)
            wirelen[lo:hi] = fields[:, 3]
    table, _, flow = flows.finish()
    # The per-flow totals of the summary (version 4): what a conversation table needs of a
    # file it takes whole, without decoding the packet columns.
    counts, wire, first, last = flow_totals(flow, len(table), ts_ns, wirelen)
    return PacketIndex(
        nanosecond=header.nanosecond,
        linktype=header.linktype,
        count=n,
        first_ns=int(ts_ns.min()) if n else 0,
        last_ns=int(ts_ns.max()) if n else 0,
        pcap_size=complete_end,
        flows=table,
        flow_packets=counts.astype(np.uint32),
        ts_ns=ts_ns,
        offset=offset.astype(np.int64, copy=False).view(np.uint64),
        caplen=caplen.astype(np.uint32),
        wirelen=wirelen,
        flow=flow,
        flow_bytes=wire.view(np.uint64),
        flow_first_ns=first,
        flow_last_ns=last,
    )


def index_records(
    buf: bytes | memoryview | np.ndarray, header: PcapHeader, records: RecordTable
) -> PacketIndex:
    """Index the records of an in-memory pcap described by `records` (from `scan_records`,
    or from whoever wrote the pcap and knows where its records are)."""
    return _index(
        as_bytes_array(buf), header, records.offset, records.caplen, records.complete_end,
        records,
    )


def index_pcap(
    buf: bytes | memoryview | np.ndarray, header: PcapHeader
) -> tuple[PacketIndex, RecordLocations]:
    """Walk and index an in-memory pcap in one pass over its bytes (the fast path).

    The locations say whether the pcap had a torn tail, which the index leaves out.
    """
    arr = as_bytes_array(buf)
    loc = locate_records(arr, header)
    return _index(arr, header, loc.offset, loc.caplen, loc.complete_end, None), loc


def build_index(pcap_path: str | os.PathLike[str]) -> PacketIndex:
    """Index a pcap file's complete records (a torn tail is left out)."""
    with PcapReader(pcap_path) as reader:
        arr = reader.array()
        idx, _ = index_pcap(arr, reader.header)
        del arr  # let close() unmap the file
    return idx
