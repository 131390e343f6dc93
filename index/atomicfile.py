"""Files that appear whole or not at all: written under a temporary name, then renamed.

Every file other processes may read at any moment (indexes, compressed pcaps, markers, the
stats file, a decompressed output) is written this way, under the dump set's temporary-name
convention `.NAME.part` (docs/FORMAT.md), which readers skip and npcaprepair removes. The small
ones (markers, holds, the import registry) are read back with `read_small_file`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import PcapVaultError


def temp_path(path: str | os.PathLike[str]) -> Path:
    """Where `path` is written before being renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.part")


def create_new(tmp: str | os.PathLike[str], mode: int | None = None) -> int:
    """Create `tmp` afresh and return its fd open for writing (permissions exactly `mode`,
    else the umask's default).

    Temporary names are predictable and their directory may belong to someone else (a dump
    set's owner, a user's output folder), so the name is never followed: created with
    O_EXCL|O_NOFOLLOW, a planted symlink or hard link cannot turn the write into one into
    another file. A leftover of ours (a regular file we own, from a stop) is removed and
    the name created again; anything else in the way is refused.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    except FileExistsError:
        try:
            st = os.lstat(tmp)
        except FileNotFoundError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
                                   and st.st_nlink == 1):
            raise PcapVaultError(f"{tmp} is in the way of a temporary file and is not one we "
                                 "left (a link or another user's file): remove it and run "
                                 "again") from None
        if st is not None:
            os.unlink(tmp)
        try:
            fd = os.open(tmp, flags, 0o666 if mode is None else mode)
        except FileExistsError:
            raise PcapVaultError(f"{tmp} keeps reappearing while we write it: find who "
                                 "creates it, then run again") from None
    if mode is not None:
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
    return fd


@contextmanager
def atomic_write(path: str | os.PathLike[str], *, mode: int | None = None,
                 sync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; it replaces `path` on leaving.

    `mode`: the file's exact permissions, whatever the umask (else the umask's default).
    `sync`: the content is on disk before the rename, so a crash leaves the old file or
    the new one, never an empty one; off only where a stall on a busy disk costs more (the
    capture loop's stats file). On any failure, interruptions included, the temporary file
    is removed and `path` is left as it was.
    """
    tmp = temp_path(path)
    fd = create_new(tmp, mode)
    try:
        with open(fd, "wb") as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself is gone or unwritable: the first error is the news
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None,
                 sync: bool = True) -> None:
    """Replace `path` with `data` (see atomic_write)."""
    with atomic_write(path, mode=mode, sync=sync) as f:
        f.write(data)


SMALL_FILE_LIMIT = 64 << 20


class NotASmallFile(OSError):
    """The name holds something other than a regular file of the size such a file may have."""


def read_small_file(path: str | os.PathLike[str], limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The content of a small file of ours (a marker, the holds file, the import registry) in a
    directory whose owner may have replaced it with anything: root must not follow a link out
    of it, hang on a FIFO or read /dev/zero until memory runs out. The name is opened once,
    without following a link and without blocking, and the open file must be a regular file
    of at most `limit` bytes; else OSError (FileNotFoundError when there is none, ELOOP for a
    link, NotASmallFile for the rest), which every caller already reports in one line.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotASmallFile(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise NotASmallFile(errno.EFBIG, f"larger than {limit} bytes", str(path))
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:  # grew while read
            raise NotASmallFile(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)
