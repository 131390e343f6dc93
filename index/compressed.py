"""Compressed pcaps: the exact pcap bytes in the zstd seekable format (`.pcap.zst`).

The seekable format (pyzstd's SeekableZstdFile) cuts the stream into independent frames and
ends it with a seek table, so a reader can decompress just the frame holding a packet. Index
offsets therefore keep pointing at uncompressed positions, and a selective extraction reads
and decompresses a few 64 KiB frames instead of the whole file. Anything else (a plain zstd
stream, a truncated file, a damaged frame) is refused with a one-line FormatError.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

from .atomicfile import atomic_write
from .errors import FormatError

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


def _errors() -> tuple[type[Exception], ...]:
    z = _pyzstd()
    return (z.ZstdError, z.SeekableFormatError, EOFError, ValueError)


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


class CompressedReader:
    """Random access to the uncompressed bytes of a `.pcap.zst`."""

    def __init__(self, path: os.PathLike | str):
        self.name = str(path)
        try:
            self.file = _pyzstd().SeekableZstdFile(path, "r")
            self.size = self.file.seek(0, os.SEEK_END)
            self.file.seek(0)
        except OSError:
            raise
        except _errors():
            raise FormatError(
                f"{self.name}: truncated, or not a pcapvault compressed pcap (no zstd seek "
                "table at its end); npcaprepair recovers a truncated one"
            ) from None

    def pread(self, offset: int, size: int) -> bytes:
        try:
            self.file.seek(offset)
            return self.file.read(size)
        except _errors():
            raise FormatError(
                f"{self.name}: damaged compressed data near byte {offset}; run npcaprepair"
            ) from None

    def read_all(self) -> bytes:
        return self.pread(0, self.size)

    def copy_to(self, out: BinaryIO) -> int:
        """Stream the whole uncompressed content into `out`; return the bytes written."""
        done = 0
        try:
            self.file.seek(0)
            while chunk := self.file.read(FRAME_SIZE):
                out.write(chunk)
                done += len(chunk)
        except _errors():
            raise FormatError(
                f"{self.name}: damaged compressed data after byte {done}; run npcaprepair"
            ) from None
        return done

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> CompressedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def salvage(path: os.PathLike | str) -> bytes:
    """The uncompressed content of every intact frame before the first damaged or missing one.

    Works without the seek table, so it recovers a file cut short by a crash or a full disk.
    Each frame carries its own checksum: a damaged frame ends the salvage rather than
    returning wrong bytes.
    """
    data = memoryview(Path(path).read_bytes())
    pyzstd = _pyzstd()
    out = []
    pos = 0
    while pos < len(data):
        try:
            n = pyzstd.get_frame_size(data[pos:])
            out.append(pyzstd.decompress(data[pos : pos + n]))
        except _errors():
            break
        pos += n
    return b"".join(out)
