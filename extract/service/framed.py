"""The engine's output, sent as DATA frames on the extraction service's connection.

The service must stream through the same code as a direct extraction, so it uses the
engine's Output and Sink unchanged except for where the bytes go: every write of a Sink is a
whole number of records (or the file header) and becomes one frame, so the client can copy
frames to its own output without parsing packets.
"""

from __future__ import annotations

import socket

from ..output import Interface, Output, Pieces, Sink
from . import wire
from .shared import SharedSlots


class FramedSink(Sink):
    """A Sink whose writes are DATA frames; `bytes` still counts pcap bytes only.

    A frame's length is known before its payload is sent, so framing does not stand in the
    way of sendfile: the header goes with writev, then the runs straight from the file.
    Pieces that lie in the buffers shared with the client go as a REFS frame instead: their
    place, not their bytes."""

    def __init__(self, fd: int, pcapng: bool, ifaces: list[Interface], snap: int | None,
                 shared: SharedSlots | None = None):
        self.shared = shared
        super().__init__(fd, pcapng, ifaces, snap)

    def _write(self, bufs: list) -> None:
        plain: list = []
        for b in bufs:
            refs = self.shared.references(b.iov) if self.shared and isinstance(b, Pieces) \
                else None
            if refs is None:
                plain.append(b)
                continue
            self._data(plain)
            plain = []
            super()._write([wire.FRAME.pack(wire.REFS, len(refs)), refs])
            self.bytes += len(b) - wire.FRAME.size - len(refs)
        self._data(plain)

    def _data(self, bufs: list) -> None:
        if bufs:
            super()._write([wire.FRAME.pack(wire.DATA, sum(len(b) for b in bufs)), *bufs])
            self.bytes -= wire.FRAME.size

    def close(self) -> None:
        """Leave the connection open: the trailer follows the data."""


class ConnectionOutput(Output):
    """Output to the connection: one stream, or split files announced by FILE frames.

    The engine's own split logic decides where a file ends; the client creates the files,
    in its own directory and with its own rights."""

    def __init__(self, conn: socket.socket, ifaces: list[Interface],
                 shared: SharedSlots | None = None, **caps: int | bool | None):
        self.conn = conn
        self.shared = shared
        self.finished_bytes = 0  # of the split files before the current one
        split = caps.get("split_bytes") or caps.get("split_packets")
        # With a split, Output makes sure its directory exists: "." is the service's own
        # working directory, a no-op; the client makes the real one.
        super().__init__("." if split else "-", ifaces, **caps)
        self.stream = True  # sendfile into the socket: a frame header, then the runs

    @property
    def sent(self) -> int:
        """Bytes of pcap streams sent, file headers included (what the client's files hold)."""
        return self.finished_bytes + (self.sink.bytes if self.sink else 0)

    def _open(self) -> Sink:
        if self.sink is not None:  # Output._roll: the previous file is complete
            self.finished_bytes += self.sink.bytes
        name = f"extract-{len(self.files) + 1:06d}{self.ext}" if self.split else "-"
        if self.split:
            wire.send(self.conn, wire.FILE, name.encode())
        self.files.append(name)
        return FramedSink(self.conn.fileno(), self.pcapng, self.ifaces, self.snap, self.shared)
