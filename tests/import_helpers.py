"""What the npcapimport tests share: dump sets to import into, captures of every variant
written by hand, and the command run as a user runs it."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import recorderproc
from extract_helpers import NS, SYNTH_START, synthetic_traffic
from recorderproc import extracted_records, tool

from pcapvault.index.dumpset import DumpSet

ALL = ("1970-01-01T00:00:00Z", "2106-02-08T00:00:00Z")


def new_dumpset(root: Path, nanosecond: bool = True, linktype: int = 1) -> Path:
    DumpSet.create(root, interface="eth0", linktype=linktype, snaplen=262144,
                   nanosecond=nanosecond)
    return root


def npcapimport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("npcapimport"), *map(str, args)], capture_output=True,
                          text=True, timeout=600)


def extract(root: Path, out: Path, begin: str = ALL[0], end: str = ALL[1],
            expr: str = "") -> list:
    return extracted_records(root, out, begin, end, expr)


def one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    return recorderproc.one_line(r, code, *needles, prog="npcapimport")


def write_variant(path: Path, packets: list, big_endian: bool, nanosecond: bool,
                  linktype: int = 1) -> None:
    """A classic pcap in either byte order and precision."""
    o = ">" if big_endian else "<"
    parts = [struct.pack(o + "IHHiIII", 0xA1B23C4D if nanosecond else 0xA1B2C3D4, 2, 4, 0, 0,
                         262144, linktype)]
    for ts, data, wire in packets:
        sec, frac = divmod(ts, NS)
        parts.append(struct.pack(o + "IIII", sec, frac if nanosecond else frac // 1000,
                                 len(data), wire) + data)
    path.write_bytes(b"".join(parts))


def pcapng_block(btype: int, body: bytes, o: str = "<") -> bytes:
    """One pcapng block: type, length, body padded to 4 bytes, length."""
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(o + "II", btype, n) + body + struct.pack(o + "I", n)


def pcapng_shb(o: str = "<") -> bytes:
    return pcapng_block(0x0A0D0D0A, struct.pack(o + "IHHq", 0x1A2B3C4D, 1, 0, -1), o)


def write_pcapng(path: Path, packets: list, big_endian: bool = False, interfaces: int = 1,
                 tsresol: int | None = 9) -> None:
    """A pcapng: one section, `interfaces` Ethernet interfaces, enhanced packet blocks."""
    o = ">" if big_endian else "<"

    def block(btype: int, body: bytes) -> bytes:
        return pcapng_block(btype, body, o)

    out = [pcapng_shb(o)]
    for _ in range(interfaces):
        opts = b""
        if tsresol is not None:
            opts = struct.pack(o + "HH", 9, 1) + bytes([tsresol]) + b"\0" * 3
        out.append(block(1, struct.pack(o + "HHI", 1, 0, 262144) + opts
                         + struct.pack(o + "HH", 0, 0)))
    div = 10 ** (9 - (tsresol if tsresol is not None else 6))
    for ts, data, wire in packets:
        units = ts // div
        out.append(block(6, struct.pack(o + "IIIII", 0, units >> 32, units & 0xFFFFFFFF,
                                        len(data), wire) + data))
    path.write_bytes(b"".join(out))


def traffic(n: int = 600, start: int = SYNTH_START, span: float = 1500.0) -> list:
    return synthetic_traffic(n, start, seed=5, span_s=span)


def as_us(packets: list) -> list:
    return [(ts // 1000 * 1000, d, w) for ts, d, w in packets]


def records(packets: list) -> list:
    return sorted((ts, w, d) for ts, d, w in packets)



def import_in_process(ds: DumpSet, srcs: list[Path], max_bytes: int) -> int:
    """The command's two passes, in this process (so that a test can stop them)."""
    from pcapvault.tools import npcapimport as imp

    clusters = imp.survey(ds, srcs, max_bytes=max_bytes)
    return sum(imp.import_group(ds, g, max_bytes, 0o640) for g in imp.groups(clusters))
