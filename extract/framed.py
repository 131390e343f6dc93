"""The engine's output, sent as DATA frames on the extraction service's connection.

The service must stream through the same code as a direct extraction, so it uses the
engine's Output and Sink unchanged except for where the bytes go: every write of a Sink is a
whole number of records (or the file header) and becomes one frame, so the client can copy
frames to its own output without parsing packets.
"""

from __future__ import annotations

from . import wire
from .output import Interface, Output, Sink


class FramedSink(Sink):
    """A Sink whose writes are DATA frames; `bytes` still counts pcap bytes only."""

    def _write(self, bufs: list) -> None:
        n = sum(len(b) for b in bufs)
        super()._write([wire.FRAME.pack(wire.DATA, n), *bufs])
        self.bytes -= wire.FRAME.size

    def close(self) -> None:
        """Leave the connection open: the trailer follows the data."""


class ConnectionOutput(Output):
    """Output to the connection `fd`: one stream, no split (the client writes the files)."""

    def __init__(self, fd: int, ifaces: list[Interface], **caps: int | bool | None):
        self.conn_fd = fd
        super().__init__("-", ifaces, **caps)

    def _open(self) -> Sink:
        self.files.append("-")
        return FramedSink(self.conn_fd, self.pcapng, self.ifaces, self.snap)
