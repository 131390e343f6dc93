"""Compressed pcaps: the exact pcap bytes in the zstd seekable format (`.pcap.zst`).

The seekable format (pyzstd's SeekableZstdFile) cuts the stream into independent frames and
ends it with a seek table, so a reader can decompress just the frame holding a packet. Index
offsets therefore keep pointing at uncompressed positions, and a selective extraction reads
and decompresses a few 64 KiB frames instead of the whole file. Anything else (a plain zstd
stream, a truncated file, a damaged frame) is refused with a one-line FormatError.
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_right
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

from .atomicfile import atomic_write
from .errors import FormatError
from .zstdlib import zstd

SUFFIX = ".zst"
# 64 KiB frames: files slightly larger than with 1 MiB frames, reading one packet far cheaper
# (docs/BENCHMARKS.md, "Compression", K1).
FRAME_SIZE = 64 << 10
DEFAULT_LEVEL = 3
_COPY = 4 << 20


def _pyzstd() -> ModuleType:
    """pyzstd, imported on first use: its import costs several times the zstd backport's
    (typing_extensions pulls in inspect and asyncio; docs/BENCHMARKS.md, D6), which a
    selective extraction over plain files would pay for nothing.
    """
    import pyzstd

    return pyzstd


def is_compressed(path: os.PathLike | str) -> bool:
    return str(path).endswith(SUFFIX)


def compress_file(src: Path, dst: Path, level: int = DEFAULT_LEVEL,
                  file_mode: int | None = None, data: memoryview | None = None) -> int:
    """Compress `src` into `dst` (temporary name, then rename); return the compressed size.

    `data`, when given, is `src`'s content already in memory (the recorder's indexer has just
    read it), so the file is not read a second time.
    """
    pyzstd = _pyzstd()
    with atomic_write(dst, mode=file_mode) as raw:
        # Per-frame checksums: a damaged frame is an error, never silently wrong packets.
        options = {pyzstd.CParameter.compressionLevel: level,
                   pyzstd.CParameter.checksumFlag: 1}
        with pyzstd.SeekableZstdFile(raw, "w", level_or_option=options,
                                     max_frame_content_size=FRAME_SIZE) as z:
            if data is not None:
                z.write(data)
            else:
                with open(src, "rb") as fin:
                    while chunk := fin.read(_COPY):
                        z.write(chunk)
    return dst.stat().st_size


# The seek table (zstd's seekable format): a skippable frame at the end of the file holding
# one entry per frame (compressed size, decompressed size, and a checksum when the descriptor's
# top bit is set), then the number of frames, the descriptor and this magic.
_SEEKABLE_MAGIC = 0x8F92EAB1
_SKIPPABLE_MAGIC = 0x184D2A5E
_FOOTER = struct.Struct("<IBI")  # frames, descriptor, magic
# Larger frames are damage: ours hold FRAME_SIZE bytes, and a reader must not allocate what
# a hostile seek table or frame claims.
MAX_FRAME = 64 << 20


class CompressedReader:
    """Random access to the uncompressed bytes of a `.pcap.zst`, frame by frame.

    Every frame read is decompressed whole and must give exactly the bytes its seek-table
    entry says, end there and pass its checksum: a table that lies about a frame's size
    would shift every position after it (wrong records, or records silently past the end), and
    zstd checks a frame's checksum only at its end. The table is read and checked here (not by
    pyzstd, whose reader trusts it)."""

    def __init__(self, path: os.PathLike | str):
        self.name = str(path)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._cached: tuple[int, bytes] | None = None  # the last frame read
        try:
            self._read_table()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_table(self) -> None:
        size = os.fstat(self._fd).st_size
        footer = os.pread(self._fd, _FOOTER.size, max(size - _FOOTER.size, 0))
        frames, desc, magic = _FOOTER.unpack(footer) if len(footer) == _FOOTER.size else (
            0, 0, 0)
        entry = 12 if desc & 0x80 else 8
        table_len = 8 + frames * entry + _FOOTER.size
        if magic != _SEEKABLE_MAGIC or desc & 0x7C or table_len > size:  # reserved bits
            raise self._no_table()
        table = os.pread(self._fd, table_len, size - table_len)
        skippable, length = struct.unpack_from("<II", table)
        if skippable != _SKIPPABLE_MAGIC or length != table_len - 8:
            raise self._no_table()
        self._c_start = [0]  # where each frame starts, compressed and decompressed
        self._d_start = [0]
        for k in range(frames):
            c, d = struct.unpack_from("<II", table, 8 + k * entry)
            if d > MAX_FRAME or (c == 0) != (d == 0):
                raise FormatError(f"{self.name}: damaged seek table (a frame of {c} bytes "
                                  f"said to hold {d}); run npcaprepair")
            self._c_start.append(self._c_start[-1] + c)
            self._d_start.append(self._d_start[-1] + d)
        if self._c_start[-1] != size - table_len:
            raise FormatError(f"{self.name}: damaged seek table (its frames do not fill the "
                              "file); run npcaprepair")
        self.size = self._d_start[-1]

    def _no_table(self) -> FormatError:
        return FormatError(
            f"{self.name}: truncated, or not a pcapvault compressed pcap (no zstd seek "
            "table at its end); npcaprepair recovers a truncated one"
        )

    def _frame(self, k: int) -> bytes:
        """The content of frame k, checked against its seek-table entry."""
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        lo, hi = self._c_start[k], self._c_start[k + 1]
        want = self._d_start[k + 1] - self._d_start[k]
        blob = os.pread(self._fd, hi - lo, lo)
        data = decompress_frame(blob, want) if len(blob) == hi - lo else None
        if data is None:
            raise FormatError(f"{self.name}: damaged compressed data near byte "
                              f"{self._d_start[k]}; run npcaprepair")
        self._cached = (k, data)
        return data

    def pread(self, offset: int, size: int) -> bytes:
        """`size` bytes from `offset` of the uncompressed pcap (fewer at its end)."""
        out = []
        while size > 0 and 0 <= offset < self.size:
            k = bisect_right(self._d_start, offset) - 1
            at = offset - self._d_start[k]
            piece = self._frame(k)[at : at + size]
            out.append(piece)
            offset += len(piece)
            size -= len(piece)
        return b"".join(out)

    def read_all(self) -> bytes:
        return b"".join(self._frame(k) for k in range(len(self._d_start) - 1))

    def copy_to(self, out: BinaryIO) -> int:
        """Stream the whole uncompressed content into `out`; return the bytes written."""
        for k in range(len(self._d_start) - 1):
            out.write(self._frame(k))
        return self.size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cached = None

    def __enter__(self) -> CompressedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def decompress_frame(blob: bytes | memoryview, size: int | None = None) -> bytes | None:
    """The content of the one zstd frame `blob`, or None when it is damaged: it does not
    decompress, fails its checksum, is followed by other bytes, or gives other than `size`
    bytes (at most MAX_FRAME without a size), never decompressing more than that."""
    d = zstd.ZstdDecompressor()
    limit = MAX_FRAME if size is None else size
    try:
        data = d.decompress(blob, max_length=limit + 1)
    except zstd.ZstdError:
        return None
    if not d.eof or d.unused_data or len(data) > limit or (size is not None and len(data) != size):
        return None
    return data


def salvage(path: os.PathLike | str) -> bytes:
    """The uncompressed content of every intact frame before the first damaged or missing one.

    Works without the seek table, so it recovers a file cut short by a crash or a full disk.
    Each frame carries its own checksum: a damaged frame ends the salvage rather than
    returning wrong bytes (and so does one larger than MAX_FRAME).
    """
    data = memoryview(Path(path).read_bytes())
    pyzstd = _pyzstd()
    out = []
    pos = 0
    while pos < len(data):
        try:
            n = pyzstd.get_frame_size(data[pos:])
        except (pyzstd.ZstdError, ValueError):
            break
        frame = decompress_frame(data[pos : pos + n])
        if frame is None:
            break
        out.append(frame)
        pos += n
    return b"".join(out)
