"""Files that appear whole or not at all: written under a temporary name, then renamed.

Every file other processes may read at any moment (indexes, compressed pcaps, markers, the
stats file, a decompressed output) is written this way, under the dump set's temporary-name
convention `.NAME.part` (docs/FORMAT.md), which readers skip and npcaprepair removes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temp_path(path: str | os.PathLike[str]) -> Path:
    """Where `path` is written before being renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.part")


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
    try:
        with open(tmp, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
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
