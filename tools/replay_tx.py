"""Transmit frames through an AF_PACKET PACKET_TX_RING (TPACKET_V2), a whole batch per syscall.

Why a TX ring and not one send() per frame (what tcpreplay does): the frames of a batch are
copied into the shared ring by a few numpy calls (`load`), and one send() then hands the kernel
every frame marked ready (`release`), so the per-frame cost is the kernel's own and Python
never touches a frame individually. See docs/BENCHMARKS.md ("Replay") for the figures.

The ring is a circle of fixed-size frames; each holds a 32-byte tpacket2 header and the frame
data right after it. A frame's status word says who owns it: 0 (available) = us,
SEND_REQUEST = handed to the kernel, SENDING = in flight. The kernel walks the circle from its
own head, in order, so two counters that only grow describe our side:

    released <= loaded <= released + capacity

[released, loaded) hold data waiting for their send time; frames before `released` belong to
the kernel until their status says otherwise, which `load` checks before reusing them.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import select
import socket
import struct
import time

import numpy as np

# The recorder's vectorised piece copy (rows of power-of-two widths, one memcpy each).
from pcapvault.index.bytecopy import copy_pieces
from pcapvault.index.errors import PcapVaultError
from pcapvault.recorder.ring import open_packet_socket

SOL_PACKET = 263
PACKET_LOSS = 14
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_VNET_HDR = 15
VNET_HDR_LEN = 10
TPACKET_V2 = 1
SO_SNDBUFFORCE = 32

SIOCGIFFLAGS = 0x8913
SIOCGIFMTU = 0x8921
SIOCGIFHWADDR = 0x8927
IFF_UP = 0x1
IFF_RUNNING = 0x40
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772

TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
_OWNED_BY_KERNEL = TP_STATUS_SEND_REQUEST | TP_STATUS_SENDING

# TPACKET2_HDRLEN - sizeof(struct sockaddr_ll): where the kernel expects the frame data.
DATA_OFFSET = 32
ETH_HLEN = 14
VLAN_HLEN = 4
ETH_P_8021Q = 0x8100
RING_BYTES = 16 << 20
MIN_FRAMES = 256
STALL_NS = 5_000_000_000


class TransmitError(PcapVaultError):
    """The interface cannot be used for sending."""


def _ifreq(sock: socket.socket, ifname: str, request: int) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("16s24x", ifname.encode()))


def max_frame_len(mtu: int, vlan_tagged: bool) -> int:
    """The longest frame the kernel accepts: MTU + Ethernet header, + 4 for an 802.1Q tag.

    Mirrors af_packet's check (packet_extra_vlan_len_allowed): only TPID 0x8100 earns the
    extra 4 bytes, so an 802.1ad (0x88a8) frame is held to the untagged limit.
    """
    return mtu + ETH_HLEN + (VLAN_HLEN if vlan_tagged else 0)


class TxRing:
    """A packet socket bound to `ifname` for sending only, with a TPACKET_V2 TX ring."""

    def __init__(self, ifname: str, *, ring_bytes: int = RING_BYTES):
        # Protocol 0: the socket receives nothing, so sending costs no capture copies.
        sock, self.ifindex = open_packet_socket(
            ifname, TransmitError,
            "sending raw frames needs CAP_NET_RAW: run as root, start through the disk2n@ "
            "systemd unit, or grant it with setcap cap_net_raw+ep",
        )
        self.sock = sock
        self.ifname = ifname
        try:
            self._check_interface()
            self._setup(ring_bytes)
        except BaseException:
            sock.close()
            raise
        self.released = self.loaded = 0
        self.bytes_accepted = 0  # what send() reported: frames the kernel took
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLOUT)

    def _check_interface(self) -> None:
        name = self.ifname
        try:
            hatype = struct.unpack_from("H", _ifreq(self.sock, name, SIOCGIFHWADDR), 16)[0]
            flags = struct.unpack_from("H", _ifreq(self.sock, name, SIOCGIFFLAGS), 16)[0]
            self.mtu = struct.unpack_from("i", _ifreq(self.sock, name, SIOCGIFMTU), 16)[0]
        except OSError as e:
            raise TransmitError(f"cannot query interface {name}: {e.strerror}") from None
        if hatype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
            raise TransmitError(
                f"interface {name} has link type ARPHRD {hatype}; only Ethernet-framed "
                "interfaces can replay Ethernet captures"
            )
        if not flags & IFF_UP:
            raise TransmitError(
                f"interface {name} is down; bring it up with `ip link set {name} up`"
            )
        if not flags & IFF_RUNNING or not self._carrier():
            raise TransmitError(f"interface {name} has no carrier (link down); check the cable "
                                "or the peer")

    def _carrier(self) -> bool:
        """The carrier as the driver reports it now; IFF_RUNNING follows it only after the
        kernel's link watcher ran (up to a second later). Read from sysfs when sysfs shows
        this namespace's device (same ifindex), else assumed present."""
        base = f"/sys/class/net/{self.ifname}"
        try:
            with open(f"{base}/ifindex") as f:
                if int(f.read()) != self.ifindex:
                    return True
            with open(f"{base}/carrier") as f:
                return f.read().strip() != "0"
        except (OSError, ValueError):
            return True

    def _setup(self, ring_bytes: int) -> None:
        sock = self.sock
        # Power-of-two frames and blocks: frame k is at k * frame_size, one stride for numpy.
        # A virtio-net header whose hdr_len covers the whole frame makes the kernel copy the
        # frame into the skb; otherwise it attaches ring pages, which a veth crossing
        # namespaces must then copy into freshly allocated pages: slower on veth
        # (docs/BENCHMARKS.md, "Replay").
        # hdr_len is 16 bits, so giant loopback frames go the page way.
        self.linear = max_frame_len(self.mtu, True) <= 0xFFFF
        self.data_offset = DATA_OFFSET + (VNET_HDR_LEN if self.linear else 0)
        need = self.data_offset + max_frame_len(self.mtu, True)
        self.frame_size = 1 << (need - 1).bit_length()
        block = max(self.frame_size, mmap.PAGESIZE)
        self.capacity = max(MIN_FRAMES, ring_bytes // self.frame_size)
        self.capacity = -(-self.capacity // (block // self.frame_size)) * (block // self.frame_size)
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            # A frame the kernel refuses (it never should: we check lengths first) is skipped
            # instead of stopping the ring for good with TP_STATUS_WRONG_FORMAT.
            sock.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
            if self.linear:
                sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            # Frames in flight count against the send buffer: let the whole ring be in flight.
            want = self.capacity * self.frame_size
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
            req = struct.pack("<4I", block, self.capacity * self.frame_size // block,
                              self.frame_size, self.capacity)
            sock.setsockopt(SOL_PACKET, PACKET_TX_RING, req)
            self.map = mmap.mmap(sock.fileno(), self.capacity * self.frame_size)
            sock.bind((self.ifname, 0))
        except PermissionError:
            raise TransmitError(
                f"setting up sending on {self.ifname} needs CAP_NET_RAW: run as root"
            ) from None
        except OSError as e:
            if e.errno == errno.ENOMEM:
                raise TransmitError(
                    f"cannot allocate a {self.capacity * self.frame_size >> 20} MB TX ring"
                ) from None
            raise TransmitError(f"cannot send on {self.ifname}: {e.strerror}") from None
        self.bytes = np.frombuffer(self.map, np.uint8)
        self._words = np.ndarray((self.capacity, 2), "<u4", self.map,
                                 strides=(self.frame_size, 4))
        self._status = self._words[:, 0]
        self._len = self._words[:, 1]
        # virtio_net_hdr.hdr_len: bytes the kernel copies into the skb's linear part.
        self._hdr_len = np.ndarray((self.capacity,), "<u2", self.map, offset=DATA_OFFSET + 2,
                                   strides=(self.frame_size,))

    # -- filling ---------------------------------------------------------------------------

    def free(self) -> int:
        """Frames not holding data that waits to be released (`load` may still have to wait
        for the kernel to finish sending some of them)."""
        return self.capacity - (self.loaded - self.released)

    def _slots(self, a: int, b: int) -> np.ndarray:
        return np.arange(a, b) % self.capacity

    def _busy(self, a: int, b: int) -> bool:
        """Whether the kernel still owns any of frames [a, b) (counters, b - a <= capacity).

        Checked right before those frames are written, so the status words come in with the
        pages the copy touches next; out-of-order completions (multi-queue NICs) are safe.
        """
        i, j = a % self.capacity, b % self.capacity
        parts = [self._status[i:j]] if i < j else [self._status[i:], self._status[:j]]
        return any((part & _OWNED_BY_KERNEL).any() for part in parts)

    def _wait_until_free(self, a: int, b: int) -> None:
        since = time.monotonic_ns()
        while self._busy(a, b):
            self.flush()
            self.poller.poll(1)
            if time.monotonic_ns() - since > STALL_NS:
                raise TransmitError(
                    f"{self.ifname} has not finished a frame for {STALL_NS // 10**9} s; is its "
                    "link down?"
                )

    def load(self, buf: np.ndarray, data_off: np.ndarray, caplen: np.ndarray,
             src_mac: bytes | None = None, dst_mac: bytes | None = None) -> None:
        """Copy frames into the next free frames of the ring (the caller checked `free()`).

        `buf[data_off[i] : data_off[i] + caplen[i]]` is frame i; lengths were checked against
        the interface by the caller.
        """
        n = len(data_off)
        if not n:
            return
        assert n <= self.free()
        if self.loaded >= self.capacity:
            self._wait_until_free(self.loaded, self.loaded + n)
        slots = self._slots(self.loaded, self.loaded + n)
        base = slots * self.frame_size
        copy_pieces(buf, data_off, self.bytes, base + self.data_offset, caplen)
        if self.linear:
            self._len[slots] = caplen + VNET_HDR_LEN
            self._hdr_len[slots] = caplen
        else:
            self._len[slots] = caplen
        if dst_mac is not None or src_mac is not None:
            hdr = np.ndarray((self.capacity, 12), np.uint8, self.map, offset=self.data_offset,
                             strides=(self.frame_size, 1))
            if dst_mac is not None:
                hdr[slots, :6] = np.frombuffer(dst_mac, np.uint8)
            if src_mac is not None:
                hdr[slots, 6:] = np.frombuffer(src_mac, np.uint8)
        self.loaded += n

    # -- sending ---------------------------------------------------------------------------

    def release(self, n: int) -> None:
        """Hand the next `n` loaded frames to the kernel and push them out."""
        if n <= 0:
            return
        end = self.released + n
        assert end <= self.loaded
        a, b = self.released % self.capacity, end % self.capacity
        # The data was written before; x86 and the kernel's smp_rmb order the status after it.
        if a < b:
            self._status[a:b] = TP_STATUS_SEND_REQUEST
        else:
            self._status[a:] = TP_STATUS_SEND_REQUEST
            self._status[:b] = TP_STATUS_SEND_REQUEST
        self.released = end
        self.flush()

    def flush(self) -> None:
        """send() until the kernel has taken every released frame.

        A device that stops taking frames (a NIC whose link went down keeps its queue
        stopped) fails the replay after STALL_NS without progress rather than hanging it.
        """
        last = (self.released - 1) % self.capacity
        since = 0
        while True:
            try:
                self.bytes_accepted += self.sock.send(b"", socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                if e.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise TransmitError(f"sending on {self.ifname} failed: {e.strerror}") \
                        from None
            if not self._status[last] & TP_STATUS_SEND_REQUEST:
                return
            now = time.monotonic_ns()
            since = since or now
            if now - since > STALL_NS:
                raise TransmitError(
                    f"{self.ifname} has not taken a frame for {STALL_NS // 10**9} s; is its "
                    "link down?"
                )
            # The device queue or the send buffer is full: wait for completions.
            self.poller.poll(1)

    def drain(self, timeout: float = 5.0) -> None:
        """Wait until every released frame has left (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        first = max(0, self.released - self.capacity)
        while self._busy(first, self.released) and time.monotonic() < deadline:
            self.flush()
            time.sleep(0.0005)

    def close(self) -> None:
        try:
            self.map.close()
        except (BufferError, AttributeError):
            pass
        self.sock.close()

    def __enter__(self) -> TxRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

