"""O_DIRECT reading, the one primitive under the recorder's indexer and extraction's dense reads.

O_DIRECT moves data between the device and our buffer without the page cache: no page is
allocated, filled, copied and later reclaimed per 4 KiB. It asks for offsets, lengths and
buffer addresses aligned to the block size (ALIGN); mmap'd and numpy buffers the callers pass
are page-aligned. Numpy-free, as the rest of the core's I/O helpers.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffer addresses aligned to the block size


def align_down(n: int) -> int:
    return n - n % ALIGN


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def open_direct(path: Path) -> int | None:
    """A descriptor for O_DIRECT reads, or None where it cannot be had (a filesystem refusing
    O_DIRECT, such as tmpfs, or a file gone meanwhile): the caller reads the ordinary way,
    which reports a real error itself."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


def read_full(fd: int, buf: memoryview | bytearray | mmap.mmap, offset: int) -> int:
    """Fill the aligned `buf` from the aligned `offset` of an O_DIRECT descriptor; fewer bytes
    only at the end of the file. Raises OSError (EINVAL: the filesystem refused the read)."""
    mv = memoryview(buf)
    done = 0
    try:
        while done < len(mv):
            got = os.preadv(fd, [mv[done:]], offset + done)
            done += got
            if got == 0 or got % ALIGN:
                break  # end of file
    finally:
        mv.release()
    return done


class WholeFileReader:
    """Reads a whole file with O_DIRECT into one page-aligned buffer reused for every file."""

    def __init__(self) -> None:
        self.buf: mmap.mmap | None = None

    def read(self, path: Path) -> memoryview | None:
        """The file's bytes (valid until the next read), or None where O_DIRECT is refused."""
        fd = open_direct(path)
        if fd is None:
            return None
        try:
            cap = align_up(os.fstat(fd).st_size)
            if self.buf is None or len(self.buf) < cap:
                if self.buf is not None:
                    self.buf.close()
                self.buf = mmap.mmap(-1, max(cap, ALIGN))
            done = read_full(fd, memoryview(self.buf)[:cap], 0)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise
        finally:
            os.close(fd)
        return memoryview(self.buf)[:done]
