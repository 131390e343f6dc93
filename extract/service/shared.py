"""Read buffers the extraction service shares with its client, so that a dense span read from
disk reaches the client's output without a copy through the socket.

Why: with a cold page cache the service reads dense spans with O_DIRECT (direct.py). Sent
through the socket, every byte was then copied once more into freshly allocated socket
buffers, and on these VMs fresh memory, not the copy itself, is what costs (docs/BENCHMARKS.md,
D16, and "PAM service": shared read buffers). Instead the device writes such spans straight
into a memfd mapped by both sides; the service sends only (offset, length) references and the
client writes those bytes to its output from its own read-only mapping, the one copy a direct
extraction makes too. The client acknowledges each reference frame, and only then may a slot
be read into again.

What makes this safe: the client can read the whole region at any time, so nothing may ever
land in it that the client may not have. The engine reads into a slot only chunks that lie
wholly inside a run of adjacent selected records (whole plan unfiltered or proven by the
index, records contiguous, not the plan's first or last chunk: the alignment of an O_DIRECT
read widens a chunk by up to 4 KiB on each side, into its neighbours, which are then selected
records too). The region is sealed before the client gets it: it cannot be resized, and no
new writable mapping of it can be made, so the client can neither write into it nor make the
service fault on it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
from collections import deque

import numpy as np

from ..outfile import ClosedPipe
from . import wire

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
SLOTS = 4  # chunks being read (two at a time), sent, or written out by the client
# Chunks of plans read into the slots: smaller than a private read's (engine.CHUNK_BYTES),
# because the region is fresh memory in every service process and fresh memory is what costs.
CHUNK_BYTES = 8 << 20
MARGIN = 512 << 10  # a chunk's last record may reach past it (262 KiB), plus the alignment
MAX_REFS = 4096  # per REFS frame; a chunk read into one slot is one run, so one reference


class SharedSlots:
    """A sealed memfd cut into equal slots; which slots are free, which the client still reads.

    A slot is free when the engine has released it and every reference frame that touched it
    has been acknowledged. Acknowledgements arrive in the order of the frames."""

    def __init__(self, conn: socket.socket, chunk_bytes: int = CHUNK_BYTES, slots: int = SLOTS):
        self.conn = conn
        self.chunk_bytes = chunk_bytes  # the engine cuts shared-capable plans at this size
        self.slot_bytes = slot_bytes = chunk_bytes + MARGIN
        self.size = slot_bytes * slots
        self.fd = os.memfd_create("pcapvault-extract", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
        except BaseException:
            os.close(self.fd)
            raise
        self.array = np.frombuffer(self.map, np.uint8)
        self.base = self.array.ctypes.data
        self.engine_holds = [False] * slots
        self.unacked = [0] * slots  # reference frames sent and not yet acknowledged
        self.frames: deque[tuple[int, ...]] = deque()  # slots of each unacknowledged frame

    def offer(self) -> None:
        """Give the client the region: a frame whose payload carries the descriptor."""
        wire.send_fd(self.conn, wire.SHARED, struct.pack("<Q", self.size), self.fd)

    def acquire(self, size: int) -> tuple[int, np.ndarray] | None:
        """A free slot of at least `size` bytes, waiting for the client's acknowledgements
        when it still reads them all; None when the chunk does not fit or the engine holds
        every slot (the caller reads into private memory then)."""
        if size > self.slot_bytes:
            return None
        while (k := self._free_slot()) is None:
            if not self.frames:
                return None
            self._await_ack()
        self.engine_holds[k] = True
        at = k * self.slot_bytes
        return k, self.array[at : at + self.slot_bytes]

    def _free_slot(self) -> int | None:
        for k, held in enumerate(self.engine_holds):
            if not held and not self.unacked[k]:
                return k
        return None

    def free_now(self) -> bool:
        """Whether a slot is free without waiting: takes in the acknowledgements that have
        arrived already. Lets the engine read further ahead only when the client keeps up."""
        while self._free_slot() is None:
            if not self.frames or not select.select([self.conn], [], [], 0)[0]:
                return False
            self._await_ack()
        return True

    def release(self, slot: int) -> None:
        """The engine is done with the slot (its references may still be unacknowledged)."""
        self.engine_holds[slot] = False

    def references(self, iov: np.ndarray) -> bytes | None:
        """The REFS payload for these (address, length) pieces if they all lie in the region,
        else None; the slots they touch stay busy until the client acknowledges the frame."""
        if not len(iov) or len(iov) > MAX_REFS:
            return None
        addr = iov[:, 0].astype(np.int64) - self.base
        end = addr + iov[:, 1].astype(np.int64)
        if addr.min() < 0 or end.max() > self.size:
            return None
        first = addr // self.slot_bytes
        last = (end - 1) // self.slot_bytes
        touched = tuple(sorted(set(first.tolist()) | set(last.tolist())))
        for k in touched:
            self.unacked[k] += 1
        self.frames.append(touched)
        refs = np.empty((len(iov), 2), "<u8")
        refs[:, 0] = addr
        refs[:, 1] = iov[:, 1]
        return refs.tobytes()

    def _await_ack(self) -> None:
        head = wire.recv_header(self.conn, "acknowledgement")
        if head is None:
            raise ClosedPipe()  # the client left
        kind, length = head
        if kind != wire.ACK or length:
            raise wire.ProtocolError(f"unexpected frame {kind!r} from the client")
        for k in self.frames.popleft():
            self.unacked[k] -= 1

    def close(self) -> None:
        """Close the descriptor; the mapping goes with the last batch that points into it."""
        os.close(self.fd)
