"""Our own AF_PACKET TPACKET_V3 receive ring, mmapped and walked a whole block at a time.

Why not libpcap through pcapy-ng: its batch calls (`next_batch`, `loop_to_buffer`) return
microsecond timestamps and no wire length, so the files could not be nanosecond pcaps with
true original lengths, and libpcap would copy every packet once more before we write it. With
our own ring a retired block is handed to us whole; the 16-byte pcap record header of a packet
is, byte for byte, the `tp_sec, tp_nsec, tp_snaplen, tp_len` words of its tpacket3 header, so a
whole block is turned into pcap records by a few numpy calls, with no Python per packet (a
per-packet loop, even of two bytes slices, costs more than tcpdump's whole budget). See
docs/BENCHMARKS.md for figures.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pcapvault.index.bytecopy import copy_pieces, window
from pcapvault.index.errors import PcapVaultError

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
PACKET_MR_PROMISC = 1
SO_ATTACH_FILTER = 26
ETH_P_ALL = 0x0003
SIOCGIFHWADDR = 0x8927
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
DLT_EN10MB = 1

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6

BLOCK_SIZE = 1 << 20
FRAME_SIZE = 1 << 11
RETIRE_MS = 50

# tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status, num_pkts,
# offset_to_first_pkt, blk_len, seq_num(u64), ts_first(sec, nsec), ts_last(sec, nsec).
_BLOCK = struct.Struct("<IIIIII8xIIII")
# tpacket3_hdr fields we need per packet: next_offset, snaplen, status, mac.
_PKT = struct.Struct("<I8xI4xIH")
# tp_vlan_tci, tp_vlan_tpid (hv1 variant), at offset 32.
_VLAN = struct.Struct("<IH")
_REC = struct.Struct("<IIII")
_U32 = struct.Struct("<I")
_SCRATCH = np.empty(0, np.uint8)


class CaptureError(PcapVaultError):
    """The capture socket could not be set up."""


@dataclass
class RingStats:
    received: int = 0
    dropped: int = 0


def interface_linktype(sock: socket.socket, ifname: str) -> int:
    """Map the interface's ARPHRD type to a pcap link type; we record Ethernet framing only."""
    req = struct.pack("16s16x", ifname.encode())
    res = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, req)
    hatype = struct.unpack_from("H", res, 16)[0]
    if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        return DLT_EN10MB
    raise CaptureError(
        f"interface {ifname} has link type ARPHRD {hatype}; only Ethernet-framed interfaces "
        "can be recorded"
    )


def open_packet_socket(
    ifname: str, error: type[PcapVaultError], no_capability: str
) -> tuple[socket.socket, int]:
    """An unbound AF_PACKET socket (protocol 0: it receives nothing yet) and the ifindex.

    Shared by capture and replay so that both name the same two failures the same way.
    """
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        raise error(f"unknown interface {ifname!r}; list interfaces with `ip link`") from None
    try:
        return socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0), ifindex
    except PermissionError:
        raise error(no_capability) from None


def attach_filter(sock: socket.socket, insns: bytes, count: int) -> None:
    """Attach a libpcap-compiled classic BPF program; its `ret #snaplen` also truncates."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    fprog = struct.pack("HxxxxxxQ", count, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class PacketRing:
    """A bound packet socket with a TPACKET_V3 ring of `buffer_mb` megabytes."""

    def __init__(
        self,
        ifname: str,
        *,
        buffer_mb: int = 128,
        promisc: bool = True,
        kernel_filter: tuple[bytes, int] | None = None,
    ):
        # Protocol 0 receives nothing until start() binds: setup work done before that
        # (a repair of the dump set) cannot make the ring overflow.
        sock, self.ifindex = open_packet_socket(
            ifname, CaptureError,
            "capturing needs CAP_NET_RAW: run as root, or start through the recorder@ systemd "
            "unit, or grant it with setcap cap_net_raw,cap_net_admin+ep",
        )
        self.sock = sock
        self.ifname = ifname
        try:
            self.linktype = interface_linktype(sock, ifname)
            self._loopback = ifname == "lo" or self._is_loopback(ifname)
            if kernel_filter is not None:
                attach_filter(sock, *kernel_filter)
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            if self._loopback:
                # Loopback shows each packet twice (out and in); libpcap drops the outgoing copy.
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.block_nr = max(2, (buffer_mb << 20) // BLOCK_SIZE)
            req = struct.pack(
                "<7I",
                BLOCK_SIZE,
                self.block_nr,
                FRAME_SIZE,
                BLOCK_SIZE // FRAME_SIZE * self.block_nr,
                RETIRE_MS,
                0,
                0,
            )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self.map = mmap.mmap(sock.fileno(), BLOCK_SIZE * self.block_nr)
            if promisc:
                mreq = struct.pack("iHH8s", self.ifindex, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        except PermissionError:
            sock.close()
            raise CaptureError(
                "setting up the capture needs CAP_NET_RAW and CAP_NET_ADMIN (promiscuous "
                "mode): run as root or use --no-promisc"
            ) from None
        except OSError as e:
            sock.close()
            if e.errno == errno.ENOMEM:
                raise CaptureError(
                    f"cannot allocate a {buffer_mb} MB capture ring; lower -b"
                ) from None
            raise CaptureError(f"cannot set up capture on {ifname}: {e.strerror}") from None
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN | select.POLLERR)
        self.next_block = 0
        self.stats = RingStats()

    def start(self) -> None:
        """Begin receiving from the interface."""
        try:
            self.sock.bind((self.ifname, ETH_P_ALL))
        except OSError as e:
            raise CaptureError(f"cannot capture on {self.ifname}: {e.strerror}") from None

    @staticmethod
    def _is_loopback(ifname: str) -> bool:
        try:
            with open(f"/sys/class/net/{ifname}/type") as f:
                return int(f.read()) == ARPHRD_LOOPBACK
        except OSError:
            return False

    def wait(self, timeout_ms: int) -> bool:
        """Block until the next block is retired or the timeout expires."""
        if self._block_ready():
            return True
        try:
            self.poller.poll(timeout_ms)
        except InterruptedError:
            pass
        return self._block_ready()

    def _block_ready(self) -> bool:
        return self.map[self.next_block * BLOCK_SIZE + 8] & TP_STATUS_USER != 0

    def read_block(self, convert: Callable[[mmap.mmap, int, int, int], None]) -> bool:
        """Hand the next retired block (if any) to `convert(map, base, num_pkts, first)`.

        The block is returned to the kernel as soon as `convert` returns, so `convert` must
        copy what it keeps.
        """
        base = self.next_block * BLOCK_SIZE
        (_v, _p, status, num, first, _blen, *_ts) = _BLOCK.unpack_from(self.map, base)
        if not status & TP_STATUS_USER:
            return False
        try:
            convert(self.map, base, num, base + first)
        finally:
            struct.pack_into("<I", self.map, base + 8, TP_STATUS_KERNEL)
            self.next_block = (self.next_block + 1) % self.block_nr
        return True

    def read_stats(self) -> RingStats:
        """Add the kernel's counters (which reset on every read) into the running totals."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, _freeze = struct.unpack("<III", raw)
        # The kernel's tp_packets already includes tp_drops.
        self.stats.received += packets - drops
        self.stats.dropped += drops
        return self.stats

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass
        self.sock.close()


class BlockRecords(NamedTuple):
    """One ring block as pcap records, back to back, plus where each record ends.

    `data` may be a scratch buffer that the next call reuses: write it out before converting
    the next block. `secs` lets the caller cut files at time and slot boundaries without
    parsing record headers again.
    """

    data: memoryview
    ends: np.ndarray  # int64: end offset in `data` of each record
    secs: np.ndarray  # uint32: timestamp seconds of each record


def block_to_records(
    ring: mmap.mmap, num: int, off: int, snaplen: int, usec: bool
) -> BlockRecords:
    """Turn the block holding the packet at `off` (its first) into pcap records.

    VLAN tags the kernel moved into metadata are put back in the frame, as libpcap does, so
    files hold the frames as they were on the wire. The whole block is converted with a few
    numpy calls (see `_vector_records`); the per-packet walk is kept for blocks that it does
    not recognise, so an odd block costs time, never correctness.
    """
    base = off - off % BLOCK_SIZE
    blen = _U32.unpack_from(ring, base + 20)[0]
    if 0 < num and off - base + 48 <= blen <= BLOCK_SIZE:
        blk = np.frombuffer(ring, np.uint8, count=blen, offset=base)
        recs = _vector_records(blk, off - base, num, snaplen, usec)
        if recs is not None:
            return recs
    return _python_records(ring, num, off, snaplen, usec)


def _vector_records(
    blk: np.ndarray, first: int, num: int, snaplen: int, usec: bool
) -> BlockRecords | None:
    """Per-block conversion, or None when the block's layout is not the expected one.

    Finding the packets is a pointer chase (each header says where the next one is), which
    numpy cannot do. But every header starts 8-byte aligned and, on one interface, carries
    the same (tp_mac, tp_net) pair, so one vectorised compare finds all candidates; the chain
    is then verified in bulk: exactly `num` candidates, the first at `first`, and each
    header's tp_next_offset equal to the distance to the next candidate. Payload bytes that
    happen to look like a header make the check fail and the block take the per-packet path.
    Copying is done in rows of a power-of-two width `W` (as_strided windows over the block
    and the output): a piece of length n with W <= n < 2W is copied as its first W and its
    last W bytes, which overlap inside the piece, so every packet costs a handful of
    memcpy-sized row moves and no Python.
    """
    blen = len(blk)
    w32 = blk[: blen & ~3].view(np.uint32)
    key_at = (first + 24) >> 2
    # Runs of equal-sized packets (floods, bulk transfers) are evenly spaced: try that first.
    step = int(w32[first >> 2])
    pos = np.arange(num, dtype=np.int64) * step + first
    p4 = pos >> 2
    if not (step > 0 and first + step * (num - 1) + 48 <= blen
            and (w32[p4[:-1]] == step).all()):
        count = (blen - 48 - first) // 8 + 1
        # Low halves of the 8-byte words at p+24 are (tp_mac, tp_net), taken by a contiguous
        # cast to uint32 (at most slightly faster than a strided view: docs/BENCHMARKS.md, D1).
        cand = blk[first + 24 : first + 24 + 8 * count].view(np.uint64).astype(np.uint32)
        idx = np.flatnonzero(cand == w32[key_at])
        if len(idx) != num or idx[0] != 0:
            return None
        pos = idx * 8 + first
        p4 = pos >> 2
        if num > 1 and not np.array_equal(w32[p4[:-1]], np.diff(pos)):
            return None
    mac = int(w32[key_at]) & 0xFFFF
    snap = w32[p4 + 3].astype(np.int64)
    if mac < 20 or int(snap.min()) < 1:
        return None
    hdr = np.empty((num, 4), np.uint32)
    hdr[:, 0] = secs = w32[p4 + 1]
    hdr[:, 1] = w32[p4 + 2] // 1000 if usec else w32[p4 + 2]
    hdr[:, 3] = w32[p4 + 4]
    status = w32[p4 + 5]
    vlan = np.flatnonzero((status & TP_STATUS_VLAN_VALID != 0) & (snap >= 12))
    caplen = snap.copy()
    if len(vlan):
        caplen[vlan] = np.minimum(snap[vlan] + 4, snaplen)
        hdr[vlan, 3] += 4
    hdr[:, 2] = caplen
    ends = np.cumsum(caplen + 16)
    starts = ends - (caplen + 16)
    out = _scratch(int(ends[-1]))
    _copy_rows(hdr.view(np.uint8), out, starts)
    src = pos + mac
    if not len(vlan):
        copy_pieces(blk, src, out, starts + 16, snap)
    else:
        # Tagged: the frame's first 12 bytes, the 4-byte tag, then the rest of the frame.
        n = snap.copy()
        n[vlan] = 12
        rest = caplen[vlan] - 16
        keep = rest > 0
        copy_pieces(blk, np.concatenate([src, src[vlan][keep] + 12]), out,
                     np.concatenate([starts + 16, starts[vlan][keep] + 32]),
                     np.concatenate([n, rest[keep]]))
        tci = w32[p4[vlan] + 8] & 0xFFFF
        tpid = w32[p4[vlan] + 9] & 0xFFFF
        tpid[(status[vlan] & TP_STATUS_VLAN_TPID_VALID == 0) | (tpid == 0)] = 0x8100
        tag = ((tpid << 16) | tci).astype(">u4")
        _copy_rows(tag.view(np.uint8).reshape(-1, 4), out, starts[vlan] + 28)
    return BlockRecords(memoryview(out), ends, secs)


def _scratch(size: int) -> np.ndarray:
    """The output buffer, reused: a fresh megabyte per block costs more in page faults (256
    first touches) than converting the block does."""
    global _SCRATCH
    if len(_SCRATCH) < size:
        _SCRATCH = np.empty(max(size, BLOCK_SIZE), np.uint8)
    return _SCRATCH[:size]


def _copy_rows(rows: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
    """out[at[i] : at[i] + width] = rows[i] for every i."""
    window(out, rows.shape[1])[at] = rows.reshape(-1).view((np.void, rows.shape[1]))


def _python_records(
    ring: mmap.mmap, num: int, off: int, snaplen: int, usec: bool
) -> BlockRecords:
    """The per-packet walk: blocks `_vector_records` does not recognise."""
    parts: list[bytes] = []
    secs: list[int] = []
    lens: list[int] = []
    add = parts.append
    unpack = _PKT.unpack_from
    sec_at = _U32.unpack_from
    # In microsecond mode every record needs its timestamp rewritten: -1 sends all there.
    special = TP_STATUS_VLAN_VALID if not usec else -1
    for _ in range(num):
        nxt, snap, status, mac = unpack(ring, off)
        if status & special:
            hdr, data = _slow_record(ring, off, snap, status, mac, snaplen, usec)
            add(hdr)
            add(data)
            lens.append(16 + len(data))
        else:
            add(ring[off + 4 : off + 20])
            add(ring[off + mac : off + mac + snap])
            lens.append(16 + snap)
        secs.append(sec_at(ring, off + 4)[0])
        off += nxt
    return BlockRecords(
        memoryview(b"".join(parts)),
        np.cumsum(np.array(lens, np.int64)),
        np.array(secs, np.uint32),
    )


def _slow_record(
    ring: mmap.mmap, off: int, snap: int, status: int, mac: int, snaplen: int, usec: bool
) -> tuple[bytes, bytes]:
    """Records needing a rewrite: a VLAN tag to reinsert, or microsecond timestamps."""
    sec, frac, _snap, wire = _REC.unpack_from(ring, off + 4)
    if usec:
        frac //= 1000
    data = ring[off + mac : off + mac + snap]
    if status & TP_STATUS_VLAN_VALID and snap >= 12:
        tci, tpid = _VLAN.unpack_from(ring, off + 32)
        if not status & TP_STATUS_VLAN_TPID_VALID or tpid == 0:
            tpid = 0x8100
        data = data[:12] + struct.pack("!HH", tpid, tci & 0xFFFF) + data[12:]
        wire += 4
        if len(data) > snaplen:
            data = data[:snaplen]
    return _REC.pack(sec, frac, len(data), wire), data
