"""Reading other tools' capture files: classic pcap in any of its four variants (either byte
order, micro- or nanosecond), pcapng with one interface, either of them gzip- or
zstd-compressed.

`npcapimport` adopts such files into a dump set. Whatever the input, the result is the same:
the packets' bytes in one buffer and, per packet, where its bytes are, its lengths and its
time in nanoseconds, in file order. Compressed input is recognised by its magic number (not
its name) and decompressed into an unnamed temporary file, so a capture larger than memory
still works; the SHA-256 of the decompressed capture identifies it whatever its compression.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FormatError, PcapVaultError
from .pcapfile import parse_global_header, scan_records
from .pcaplayout import GLOBAL_HEADER_LEN, RECORD_HEADER_LEN, snapshot
from .times import MAX_NS

_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_PCAPNG_SHB = 0x0A0D0D0A
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_IDB, _PB, _SPB, _EPB = 1, 2, 3, 6
_OPT_TSRESOL, _OPT_TSOFFSET = 9, 14
# The shortest length of the blocks whose fixed fields are read: header, fields, trailer.
_MIN_BLOCK = {_PCAPNG_SHB: 28, _IDB: 20, _PB: 32, _EPB: 32}
_CHUNK = 4 << 20


@dataclass
class Capture:
    """The packets of one capture file, in file order."""

    path: Path
    kind: str  # "pcap" or "pcapng", with " (gzip)" or " (zstd)" when compressed
    linktype: int
    nanosecond: bool  # the file's own precision
    snaplen: int
    data: np.ndarray  # uint8: the (decompressed) file
    data_offset: np.ndarray  # int64: where each packet's bytes start in `data`
    caplen: np.ndarray  # int64
    wirelen: np.ndarray  # int64
    ts_ns: np.ndarray  # int64
    digest: str  # SHA-256 of the decompressed file, hex
    torn_bytes: int  # bytes after the last complete packet (a capture cut short)

    def __len__(self) -> int:
        return len(self.ts_ns)


def _decompress(f, magic: bytes, name: str, tmp_dir: Path):
    """An unnamed temporary file holding the decompressed content of `f`."""
    out = tempfile.TemporaryFile(dir=tmp_dir)
    try:
        if magic == _GZIP:
            import gzip
            import zlib

            errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error)
            stream = gzip.GzipFile(fileobj=f)
        else:
            import pyzstd

            errors = (pyzstd.ZstdError, EOFError, ValueError)
            stream = pyzstd.ZstdFile(f)
        first = True
        while True:
            try:
                chunk = stream.read(_CHUNK)
            except errors as e:
                raise FormatError(f"{name}: damaged compressed data ({e}); check the file "
                                  "(gzip -t / zstd -t) and import what can be recovered") from None
            if first and not _is_pcapng(chunk):
                # Checked before the rest is decompressed: a bomb of gigabytes of anything
                # else would fill the disk first.
                parse_global_header(chunk[:GLOBAL_HEADER_LEN], name)
            first = False
            try:
                if not chunk:
                    out.flush()
                    break
                out.write(chunk)
            except OSError as e:  # the room beside the dump set, not the capture
                raise PcapVaultError(f"{name}: no room to decompress it in {tmp_dir} "
                                     f"({e.strerror}); free space there, or decompress it "
                                     "elsewhere and import the result") from None
        out.seek(0)
        return out
    except BaseException:
        out.close()
        raise


def _is_pcapng(data: bytes | np.ndarray) -> bool:
    head = bytes(data[:4])
    return len(head) == 4 and _PCAPNG_SHB in struct.unpack("<I", head) + struct.unpack(">I", head)


def _map(f) -> np.ndarray:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return np.zeros(0, dtype=np.uint8)
    m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    return np.frombuffer(m, dtype=np.uint8)


def open_capture(path: Path, tmp_dir: Path) -> Capture:
    """Read the capture at `path` (decompressing into `tmp_dir` when needed).

    Raises FormatError, in one line, for anything that is not one of the supported formats,
    a pcapng with more than one interface, or packets without a timestamp.
    """
    name = str(path)
    # Without blocking: a FIFO named like a capture would hang the import for good.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(
            mode) or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode) else "a socket"
        raise FormatError(f"{name}: not a regular file ({what}), not a capture file; save the "
                          "capture to a file first")
    with open(fd, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        how = ""
        if magic.startswith(_GZIP) or magic == _ZSTD:
            how = " (gzip)" if magic.startswith(_GZIP) else " (zstd)"
            raw = _decompress(f, magic[:2] if how == " (gzip)" else magic, name, tmp_dir)
        else:
            raw = open(f.fileno(), "rb", closefd=False)
        try:
            data = _map(raw)
        finally:
            raw.close()
    digest = hashlib.sha256(data).hexdigest()
    if _is_pcapng(data):
        cap = _read_pcapng(data, name)
        cap.kind += how
    else:
        cap = _read_pcap(data, name)
        cap.kind += how
    cap.path, cap.digest = path, digest
    # libpcap (so tcpdump and Wireshark) reads a record longer than the file's snapshot length
    # as cut to it; a snapshot length of 0 or beyond the largest one means the largest.
    snap = snapshot(cap.snaplen)
    np.minimum(cap.caplen, snap, out=cap.caplen)
    return cap


def _read_pcap(data: np.ndarray, name: str) -> Capture:
    hdr = parse_global_header(bytes(data[:GLOBAL_HEADER_LEN]), name)
    t = scan_records(data, hdr)
    return Capture(
        path=Path(name), kind="pcap", linktype=hdr.linktype, nanosecond=hdr.nanosecond,
        snaplen=hdr.snaplen, data=data,
        data_offset=t.offset.astype(np.int64) + RECORD_HEADER_LEN,
        caplen=t.caplen.astype(np.int64), wirelen=t.wirelen.astype(np.int64),
        ts_ns=t.ts_ns, digest="", torn_bytes=len(data) - t.complete_end,
    )


def _options(buf: bytes, at: int, end: int, order: str) -> dict[int, bytes]:
    """The options of a pcapng block body from `at` (the first value of each code)."""
    opts: dict[int, bytes] = {}
    while at + 4 <= end:
        code, length = struct.unpack_from(order + "HH", buf, at)
        if code == 0:
            break
        opts.setdefault(code, buf[at + 4 : at + 4 + length])
        at += 4 + length + (-length % 4)
    return opts


def _ts_scale(opts: dict[int, bytes], order: str) -> tuple[int, int, int]:
    """(multiply, shift, offset ns) turning a pcapng timestamp into ns: ts * m >> s + offset."""
    res = opts.get(_OPT_TSRESOL, b"\x06")[:1] or b"\x06"
    v = res[0]
    if v & 0x80:
        mul, shift = 1_000_000_000, v & 0x7F
    elif v <= 9:
        mul, shift = 10 ** (9 - v), 0
    else:
        mul, shift = -(10 ** (v - 9)), 0  # negative: divide
    off = opts.get(_OPT_TSOFFSET)
    offset = struct.unpack(order + "q", off)[0] * 1_000_000_000 if off and len(off) == 8 else 0
    return mul, shift, offset


def _read_pcapng(data: np.ndarray, name: str) -> Capture:
    """Walk the blocks of a pcapng: one interface, enhanced (or obsolete) packet blocks."""
    buf = memoryview(data)
    size = len(buf)
    order = "<"
    ifaces: list[tuple[int, int, tuple[int, int, int]]] = []  # linktype, snaplen, scale
    offs: list[int] = []
    caps: list[int] = []
    wires: list[int] = []
    units: list[int] = []
    at = 0
    end = 0
    while at + 12 <= size:
        (btype,) = struct.unpack_from(order + "I", buf, at)
        if btype == _PCAPNG_SHB:
            (bom,) = struct.unpack_from("<I", buf, at + 8)
            order = "<" if bom == _BYTE_ORDER_MAGIC else ">"
            if struct.unpack_from(order + "I", buf, at + 8)[0] != _BYTE_ORDER_MAGIC:
                raise FormatError(f"{name}: damaged pcapng section header at byte {at}")
        (blen,) = struct.unpack_from(order + "I", buf, at + 4)
        if blen < 12 or blen % 4 or at + blen > size:
            break  # a torn or damaged last block: what came before stands
        body = at + 8
        if blen < _MIN_BLOCK.get(btype, 12):
            raise FormatError(f"{name}: pcapng block of type {btype} at byte {at} is too short "
                              f"({blen} bytes) to be one; the capture is damaged")
        if btype == _IDB:
            linktype, _, snaplen = struct.unpack_from(order + "HHI", buf, body)
            opts = _options(bytes(buf[body + 8 : at + blen - 4]), 0, blen - 20, order)
            ifaces.append((linktype, snaplen, _ts_scale(opts, order)))
            if len(ifaces) > 1:
                raise FormatError(
                    f"{name}: pcapng with several interfaces; import one interface per dump "
                    "set (split it, e.g. with tshark -r FILE -Y 'frame.interface_id == 0' "
                    "-w ONE.pcapng)")
        elif btype in (_EPB, _PB):
            if btype == _EPB:
                iface, hi, lo, cap, wire = struct.unpack_from(order + "IIIII", buf, body)
            else:
                iface, _, hi, lo, cap, wire = struct.unpack_from(order + "HHIIII", buf, body)
            if iface >= len(ifaces) or body + 20 + cap > at + blen - 4:
                raise FormatError(f"{name}: damaged pcapng packet block at byte {at}")
            offs.append(body + 20)
            caps.append(cap)
            wires.append(wire)
            units.append(hi << 32 | lo)
        elif btype == _SPB:
            raise FormatError(f"{name}: pcapng simple packet blocks carry no timestamp, which "
                              "a dump set needs; convert it with editcap -F pcapng first")
        at += blen
        end = at
    if not ifaces:
        raise FormatError(f"{name}: pcapng without an interface description; not a capture")
    linktype, snaplen, scale = ifaces[0]
    return Capture(
        path=Path(name), kind="pcapng", linktype=linktype, nanosecond=True, snaplen=snaplen,
        data=data, data_offset=np.array(offs, dtype=np.int64),
        caplen=np.array(caps, dtype=np.int64), wirelen=np.array(wires, dtype=np.int64),
        ts_ns=_pcapng_ns(units, scale, name), digest="", torn_bytes=size - end,
    )


def _pcapng_ns(units: list[int], scale: tuple[int, int, int], name: str) -> np.ndarray:
    """The packets' times in ns; one outside 0..2^63-1 ns (1970 to 2262) refuses the capture.

    The checks come before the arithmetic: an int64 product wraps silently (a packet of the
    far future imported as one of 2020), Python's big ints do not fit the array at all.
    """
    mul, shift, offset = scale
    u = np.array(units, dtype=np.uint64)
    if not len(u):
        return np.zeros(0, np.int64)
    if mul > 0 and shift == 0:
        if int(u.max()) > MAX_NS // mul:
            _out_of_range(name, int(np.argmax(u)))
        ts = u.astype(np.int64) * mul
    elif mul > 0:
        big = [x * mul >> shift for x in units]
        worst = max(range(len(big)), key=big.__getitem__)
        if big[worst] > MAX_NS:
            _out_of_range(name, worst)
        ts = np.array(big, dtype=np.int64)
    elif -mul > np.iinfo(np.uint64).max:
        ts = np.zeros(len(u), np.int64)  # finer than any 64-bit count can reach a ns
    else:
        ts = (u // np.uint64(-mul)).astype(np.int64)  # < 2^64 / 10: fits
    if offset:
        lo, hi = int(ts.min()) + offset, int(ts.max()) + offset
        if lo < 0 or hi > MAX_NS:
            _out_of_range(name, int(np.argmin(ts) if lo < 0 else np.argmax(ts)))
        ts = ts + np.int64(offset)
    return ts


def _out_of_range(name: str, i: int) -> None:
    raise FormatError(f"{name}: pcapng packet {i + 1} has a time outside 1970..2262 "
                      "(damaged timestamp, if_tsresol or if_tsoffset); not importable")
