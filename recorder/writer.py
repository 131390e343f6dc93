"""Writes one pcap file through an aligned staging buffer with O_DIRECT.

Sustained capture on these machines is limited by fresh page-cache memory, not by the disk:
buffered writes make the kernel allocate and later reclaim a page for every 4 KiB recorded.
O_DIRECT moves the data from our page-aligned staging buffer straight to the device, as
Stenographer does. Only the unaligned tail of a file goes through the page cache, at close.
Filesystems that refuse O_DIRECT (tmpfs, some ZFS) get buffered writes, with one warning.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

from pcapvault.index.errors import PcapVaultError

ALIGN = 4096
CHUNK = 4 << 20
log = logging.getLogger("pcapvault.recorder")


class DiskFullError(PcapVaultError):
    """The filesystem is full and the recorder could not free space."""


class PcapFileWriter:
    """One pcap file being written; every `write` call must end on a record boundary.

    `on_full` is called when the disk is full; it frees space and returns True, or returns
    False when nothing more can be freed. Then DiskFullError is raised and `close()` keeps only
    complete records.
    """

    direct_refused = False  # remembered across files: one warning, not one per file

    def __init__(
        self,
        path: Path,
        header: bytes,
        *,
        direct: bool = True,
        on_full: Callable[[], bool] = lambda: False,
        file_mode: int = 0o640,
    ):
        self.path = path
        self.on_full = on_full
        self.direct = direct and not PcapFileWriter.direct_refused
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, file_mode)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # Some filesystems (ramfs) create the file before refusing O_DIRECT.
                path.unlink(missing_ok=True)
                self._refuse_direct()
        if self.fd < 0:
            self.fd = os.open(path, flags, file_mode)
        os.fchmod(self.fd, file_mode)  # exactly --file-mode, whatever the umask
        self.stage = mmap.mmap(-1, CHUNK)
        self.fill = 0
        self.durable = 0  # bytes on disk
        self.boundaries: deque[int] = deque()
        self.safe_end = 0  # last record boundary that is on disk
        self.write(header)

    @property
    def size(self) -> int:
        return self.durable + self.fill

    def _refuse_direct(self) -> None:
        if not PcapFileWriter.direct_refused:
            log.warning(
                "the filesystem of %s refuses O_DIRECT; writing buffered (like -r), which "
                "costs page-cache memory at high rates",
                self.path.parent,
            )
        PcapFileWriter.direct_refused = True
        self.direct = False

    def write(self, data: bytes) -> None:
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        while pos < n:
            k = min(n - pos, CHUNK - self.fill)
            self.stage[self.fill : self.fill + k] = mv[pos : pos + k]
            self.fill += k
            pos += k
            if self.fill == CHUNK:
                self._flush(CHUNK)
        self.boundaries.append(self.size)

    def _flush(self, nbytes: int) -> None:
        """Write stage[:nbytes] (aligned when direct) and keep the rest at the front."""
        view = memoryview(self.stage)
        done = 0
        try:
            while done < nbytes:
                try:
                    w = os.write(self.fd, view[done:nbytes])
                except OSError as e:
                    if e.errno == errno.EINVAL and self.direct:
                        self._to_buffered()
                        continue
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        if self.on_full():
                            continue
                        raise DiskFullError(
                            f"disk full while writing {self.path.name} and nothing left to "
                            "delete; free space or lower --disk-limit"
                        ) from None
                    raise
                done += w
                if self.direct and w % ALIGN:
                    self._to_buffered()
        finally:
            self.durable += done
            rest = self.fill - done
            if done and rest:
                self.stage[0:rest] = self.stage[done : self.fill]
            self.fill = rest
            while self.boundaries and self.boundaries[0] <= self.durable:
                self.safe_end = self.boundaries.popleft()
            view.release()

    def flush_aligned(self) -> None:
        """Put the aligned part of what is staged on disk (idle moments, crash safety)."""
        n = self.fill - self.fill % ALIGN if self.direct else self.fill
        if n:
            self._flush(n)

    def _to_buffered(self) -> None:
        """Reopen without O_DIRECT at the same offset (refusal at write time, or short write)."""
        self._refuse_direct()
        self._reopen_buffered()

    def _reopen_buffered(self) -> None:
        self.direct = False
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(fd, self.durable, os.SEEK_SET)
        os.close(self.fd)
        self.fd = fd

    def close(self) -> int:
        """Write everything staged, sync, close; return the file size.

        After a DiskFullError the file is cut back to its last complete record instead.
        """
        try:
            if self.fill:
                aligned = self.fill - self.fill % ALIGN if self.direct else 0
                if aligned:
                    self._flush(aligned)
                if self.fill:
                    if self.direct:
                        # The unaligned tail: a plain write, not a refusal of O_DIRECT (which
                        # would make every later file buffered).
                        self._reopen_buffered()
                    self._flush(self.fill)
            os.fdatasync(self.fd)
        except DiskFullError:
            os.ftruncate(self.fd, self.safe_end)
            self.durable, self.fill = self.safe_end, 0
            os.close(self.fd)
            self.stage.close()
            raise
        os.close(self.fd)
        self.stage.close()
        return self.durable
