"""npcapfleet pcap: the sensors' pcapng streams merged by time into one pcapng, streaming.

Each sensor asked (query.candidates chose them) streams /api/v1/pcap?format=pcapng on a
thread of its own, which cuts the stream into batches of whole packets (extract/output.py's
Batch, pointing into the received bytes) and hands them over through a small queue, so
memory holds a few MB per sensor whatever the result's size. The batches are merged by the
extraction engine's own merge (engine.merge: stable, by the running maximum of each stream's
timestamps, ties to the earlier stream) and written by its pcapng Sink with one interface
block per sensor dump set, named `sensor:interface`: the same order and bytes as
`npcapextract -t A -t B --pcapng` over the same dump sets.

A sensor that fails or times out ends its stream where it broke: the packets before stay,
the others' are whole, and the run says which sensor and that the result is partial. Timing
out is sending no whole packet for `timeout` seconds (sensors.Deadline), whatever bytes came.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pcapvault.extract.engine import merge
from pcapvault.extract.output import Batch, Interface, Sink

from .sensors import SensorClient, SensorError

SHB, IDB, EPB = 0x0A0D0D0A, 1, 6
SMALLEST = {SHB: 28, IDB: 20, EPB: 32}  # a block of these types shorter is damaged
# npcapserve's largest block: a packet of the largest snapshot length (256 KiB) in an EPB.
# A block said to be longer is refused, not buffered (the stream is a sensor's input).
MAX_BLOCK = 1 << 20
CUT_BYTES = 1 << 20  # a stream's packets handed on at a time (fewer at its end)
QUEUE_BATCHES = 8  # batches waiting per sensor (about 1 MB each)
NS_MAX = (1 << 63) - 1  # the latest time in the output's nanoseconds (year 2262)


class StreamError(SensorError):
    """A sensor's pcapng that is not what npcapserve writes."""


@dataclass
class Progress:
    """One sensor's part of the result."""

    sensor: str
    packets: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None


def batches(pieces: Iterator[bytes], ifaces: list[int], name: str,
            progressed: Callable[[], None] = lambda: None) -> Iterator[Batch]:
    """The packets of a pcapng stream (as npcapserve writes it: little-endian, one section)
    as Batches of whole packets of one interface each, about CUT_BYTES of them at a time;
    the stream's interface i becomes the output's `ifaces[i]`. `progressed` hears of each
    piece that completed a packet. A damaged block ends it with StreamError, after the
    packets before it."""
    scale: list[int] = []  # ns per timestamp unit, per interface of the stream
    buf = bytearray()
    found, at = _Found(), 0  # the packets of buf[:at], its whole blocks
    pieces = iter(pieces)
    while True:
        had = len(found.offs)
        try:  # a broken stream or connection: the packets before it first
            if (piece := next(pieces, None)) is None:
                break
            buf += piece
            at = found.walk(buf, at, scale, len(ifaces), name)
        except Exception:
            yield from found.cut(bytes(buf), scale, ifaces)
            raise
        if len(found.offs) > had:
            progressed()
        if at >= CUT_BYTES:
            data = bytes(buf[:at])
            del buf[:at]
            yield from found.cut(data, scale, ifaces)
            found, at = _Found(), 0
    yield from found.cut(bytes(buf[:at]), scale, ifaces)
    if len(buf) > at:
        raise StreamError(f"{name}: the stream ended inside a block")


@dataclass
class _Found:
    """The packets of one chunk's whole blocks."""

    offs: list[int] = field(default_factory=list)
    caps: list[int] = field(default_factory=list)
    wires: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    which: list[int] = field(default_factory=list)

    def walk(self, data: bytearray, at: int, scale: list[int], ifaces: int, name: str) -> int:
        """Take the packets of `data`'s whole blocks from `at` on (interface blocks add to
        `scale`); where the first block not whole starts."""
        size = len(data)
        while at + 12 <= size:
            btype, blen = struct.unpack_from("<II", data, at)
            if blen < SMALLEST.get(btype, 12) or blen % 4 or blen > MAX_BLOCK:
                raise StreamError(f"{name}: damaged pcapng block at byte {at} of a chunk")
            if at + blen > size:
                break
            if btype == EPB:
                iface, hi, lo, cap, wire = struct.unpack_from("<IIIII", data, at + 8)
                if iface >= len(scale) or 28 + cap > blen - 4:
                    raise StreamError(f"{name}: damaged pcapng packet block")
                if (hi << 32 | lo) > NS_MAX // scale[iface]:
                    raise StreamError(f"{name}: a packet time past what nanoseconds hold "
                                      "(the year 2262)")
                self.offs.append(at + 28)
                self.caps.append(cap)
                self.wires.append(wire)
                self.units.append(hi << 32 | lo)
                self.which.append(iface)
            elif btype == IDB:
                scale.append(_ns_per_unit(data[at + 16:at + blen - 4], name))
                if len(scale) > ifaces:
                    raise StreamError(f"{name}: more interfaces than the dump sets asked")
            elif btype == SHB and struct.unpack_from("<I", data, at + 8)[0] != 0x1A2B3C4D:
                raise StreamError(f"{name}: a pcapng in another byte order than npcapserve's")
            at += blen
        return at

    def cut(self, data: bytes, scale: list[int], ifaces: list[int]) -> Iterator[Batch]:
        """The packets as Batches, a run of one interface each."""
        if not self.offs:
            return
        buf = np.frombuffer(data, np.uint8)
        data_at = np.array(self.offs, np.int64)
        iface = np.array(self.which, np.int64)
        ts = np.array(self.units, np.int64) * np.array(scale, np.int64)[iface]
        caplen = np.array(self.caps, np.int64)
        wirelen = np.array(self.wires, np.int64)
        brk = np.flatnonzero(iface[1:] != iface[:-1]) + 1
        for a, z in zip(np.append(0, brk), np.append(brk, len(iface)), strict=True):
            # rec: where a 16-byte record header would start (the Sink reads data at rec + 16)
            yield Batch(buf, data_at[a:z] - 16, caplen[a:z], wirelen[a:z], ts[a:z],
                        ifaces[int(iface[a])], True, False)


def _ns_per_unit(options: bytes, name: str) -> int:
    """if_tsresol of an interface block's options (npcapserve writes 6 or 9)."""
    at = 0
    while at + 4 <= len(options):
        code, n = struct.unpack_from("<HH", options, at)
        if code == 0:
            break
        if at + 4 + n > len(options):
            raise StreamError(f"{name}: damaged pcapng interface block")
        if code == 9 and n >= 1:
            v = options[at + 4]
            if v & 0x80 or v > 9:
                raise StreamError(f"{name}: an interface with a timestamp resolution "
                                  "npcapserve never writes")
            return 10 ** (9 - v)
        at += 4 + n + (-n & 3)
    return 1000  # the pcapng default: microseconds


@dataclass
class SensorPart:
    """One sensor asked for some of its dump sets, and where they go in the output."""

    client: SensorClient
    dumpsets: list[str]
    ifaces: list[int]  # output interface of each asked dump set, in the sensor's order
    progress: Progress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = Progress(self.client.name)


def write(path: str, interfaces: list[Interface], asked: list[SensorPart], begin_ns: int,
          end_ns: int, expr: str, said: Callable[[Progress], None]) -> int:
    """Merge the asked sensors' packets into the pcapng at `path` ("-": stdout); the packets
    written. `said` hears of each sensor when its stream ends."""
    def stream(a: SensorPart) -> Iterator[Batch]:
        """Start `a`'s thread now (every sensor streams at once), and read its batches."""
        q: queue.Queue = queue.Queue(QUEUE_BATCHES)
        stop = threading.Event()

        def hand(item: Batch | None) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False  # the merge has stopped reading

        def pump() -> None:
            t0 = time.monotonic()
            p = a.progress
            deadline = a.client.deadline
            try:
                with a.client.pcapng(begin_ns, end_ns, expr, a.dumpsets) as chunks:
                    for b in batches(chunks, a.ifaces, a.client.name, deadline.extend):
                        p.packets += len(b)
                        p.bytes += int(b.caplen.sum())
                        deadline.pause()  # the merge's time is not the sensor's
                        if not hand(b):
                            return
                        deadline.extend()
            except SensorError as e:
                p.error = str(e)
            except Exception as e:  # noqa: BLE001 - a thread's end: the run says partial
                p.error = f"{a.client.name}: the stream broke off ({type(e).__name__}: {e})"
            finally:
                p.seconds = time.monotonic() - t0
                said(p)
                hand(None)

        threading.Thread(target=pump, daemon=True, name=f"fleet-{a.client.name}").start()

        def read() -> Iterator[Batch]:
            try:
                while (b := q.get()) is not None:
                    yield b
            finally:
                stop.set()

        return read()

    fd = 1 if path == "-" else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                       0o640)
    sink = Sink(fd, True, interfaces, None)
    try:
        for b in merge([stream(a) for a in asked]):
            sink.write(b)
    finally:
        sink.close()
    return sink.packets
