"""Small real filesystems for tests: created on a loop device, removed afterwards."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def loop_fs(tmp_path: Path, size: str, fstype: str = "ext4") -> Iterator[Path]:
    img, mnt = tmp_path / f"{fstype}.img", tmp_path / fstype
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(img)], check=True)
    subprocess.run([f"mkfs.{fstype}", "-q", "-F", "-m", "0", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        # A failed test may leave a file open there: detach lazily rather than stay mounted.
        if subprocess.run(["umount", str(mnt)]).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(fs: Path, name: str = "filler") -> Path:
    """Take every free block of `fs`, as another process would; return the filler file."""
    path = fs / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            block = b"\0" * chunk
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
        os.fsync(fd)
    finally:
        os.close(fd)
    return path
