"""Page-cache hints issued before the heavy imports.

Why a module of its own: importing numpy and the index code takes a tenth of a second or more,
and a cold index file takes a few milliseconds of disk each. Asking the kernel for the window's
index files first (this module needs only the standard library and the dump-set layout) lets
the disk fetch them while the interpreter is still importing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def will_need(path: str | os.PathLike[str], offset: int = 0, length: int = 0) -> None:
    """Start reading a file's range (0, 0: all of it) into the page cache; only a hint, never
    fails."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def will_need_index(path: str | os.PathLike[str]) -> None:
    """Start reading the part of an index file the engine reads (header, postings directory,
    summary and packet sections), not the postings frames at the end of a version 3 index,
    which only the host-query path reads; only a hint, never fails."""
    from pcapvault.index.errors import PcapVaultError
    from pcapvault.index.postings import HEADER_LEN, parse_header

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        h = parse_header(os.pread(fd, HEADER_LEN, 0), str(path))
        os.posix_fadvise(fd, 0, h.frames_offset, os.POSIX_FADV_WILLNEED)
    except (PcapVaultError, OSError):
        pass
    finally:
        os.close(fd)


def warm_indexes(dumpsets: Iterable[str], begin_ns: int, end_ns: int, limit: int = 64) -> None:
    """Ask for the index files of the window's first `limit` files of every dump set.

    Any problem is left for the real extraction to report (with its own message)."""
    from pcapvault.index.dumpset import DumpSet
    from pcapvault.index.errors import PcapVaultError

    for path in dumpsets:
        try:
            files = DumpSet.open(path).files_in_window(begin_ns, end_ns)
        except (PcapVaultError, OSError):
            continue
        for sf in files[:limit]:
            will_need_index(sf.index)
