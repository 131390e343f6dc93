"""Writes one pcap file through aligned staging buffers with O_DIRECT, off the capture thread.

Sustained capture on these machines is limited by fresh page-cache memory, not by the disk:
buffered writes make the kernel allocate and later reclaim a page for every 4 KiB recorded.
O_DIRECT moves the data from our page-aligned staging buffers straight to the device, as
Stenographer does. Only the unaligned tail of a file goes through the page cache, at close.

An O_DIRECT write is synchronous: the caller waits for the device. So full buffers go to a
writer thread (os.write releases the GIL) while the capture loop fills the next one; a small
pool of buffers, reused across files, absorbs the disk's latency. Filesystems that refuse
O_DIRECT (ramfs, some ZFS) get buffered writes, with one warning.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from pcapvault.index.directio import ALIGN
from pcapvault.index.errors import PcapVaultError

CHUNK = 4 << 20
BUFFERS = 6  # staging buffers in flight: 24 MiB, a few tens of ms of disk latency at 4 Gbps
log = logging.getLogger("pcapvault.recorder")


class DiskFullError(PcapVaultError):
    """The filesystem is full and the recorder could not free space."""


class _Pool:
    """Page-aligned staging buffers, touched once and reused for every file."""

    def __init__(self) -> None:
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self.free.put(mmap.mmap(-1, CHUNK))


_pool: _Pool | None = None


def _buffers() -> _Pool:
    global _pool
    if _pool is None:
        _pool = _Pool()
    return _pool


class PcapFileWriter:
    """One pcap file being written; every `write` call must end on a record boundary.

    `on_full` is called (from the writer thread) when the disk is full; it frees space and
    returns True, or returns False when nothing more can be freed. Then DiskFullError is
    raised to the caller and `close()` keeps only complete records.
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
        self.pool = _buffers()
        self.stage = self.pool.free.get()
        self.fill = 0
        self.accepted = 0  # bytes handed to the writer thread
        self.durable = 0  # bytes on disk (updated by the writer thread)
        self.boundaries: deque[int] = deque()
        self.safe_end = 0  # last record boundary that is on disk
        self.error: BaseException | None = None
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        self.pending = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._writer, name="pcap-writer", daemon=True)
        self.thread.start()
        self.write(header)

    @property
    def size(self) -> int:
        return self.accepted + self.fill

    def _refuse_direct(self) -> None:
        if not PcapFileWriter.direct_refused:
            log.warning(
                "the filesystem of %s refuses O_DIRECT; writing buffered (like -r), which "
                "costs page-cache memory at high rates",
                self.path.parent,
            )
        PcapFileWriter.direct_refused = True
        self.direct = False

    # --- capture thread side ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.error:
            raise self.error
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        while pos < n:
            k = min(n - pos, CHUNK - self.fill)
            self.stage[self.fill : self.fill + k] = mv[pos : pos + k]
            self.fill += k
            pos += k
            if self.fill == CHUNK:
                self._submit(CHUNK)
        self.boundaries.append(self.size)

    def _submit(self, nbytes: int) -> None:
        """Hand stage[:nbytes] to the writer thread; carry the rest over to a fresh buffer."""
        full, rest = self.stage, self.fill - nbytes
        self.stage = self.pool.free.get()  # waits when every buffer is in flight
        if rest:
            self.stage[0:rest] = full[nbytes : nbytes + rest]
        self.fill = rest
        self.accepted += nbytes
        with self.lock:
            self.pending += 1
            self.idle.clear()
        self.jobs.put((full, nbytes))

    def flush_aligned(self) -> None:
        """Put the aligned part of what is staged on its way to disk (idle moments)."""
        n = self.fill - self.fill % ALIGN if self.direct else self.fill
        if n:
            self._submit(n)
        if self.error:
            raise self.error

    def _drain(self) -> None:
        self.idle.wait()
        if self.error:
            raise self.error

    def close(self) -> int:
        """Write everything staged, sync, close; return the file size.

        After a DiskFullError the file is cut back to its last complete record instead.
        """
        try:
            try:
                if self.fill:
                    if self.direct:
                        aligned = self.fill - self.fill % ALIGN
                        if aligned:
                            self._submit(aligned)
                    self._drain()
                    if self.fill:
                        # The unaligned tail: a plain write, not a refusal of O_DIRECT.
                        self._reopen_buffered()
                        self._submit(self.fill)
                self._drain()
                os.fdatasync(self.fd)
            finally:
                self.jobs.put(None)
                self.thread.join()
                self.pool.free.put(self.stage)
        except DiskFullError:
            os.ftruncate(self.fd, self.safe_end)
            self.durable = self.safe_end
            os.close(self.fd)
            raise
        os.close(self.fd)
        return self.durable

    # --- writer thread side -----------------------------------------------------------------

    def _writer(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            buf, nbytes = job
            try:
                if not self.error:
                    self._write_out(buf, nbytes)
            except BaseException as e:  # handed to the capture thread, raised there
                self.error = e
            finally:
                self.pool.free.put(buf)
                with self.lock:
                    self.pending -= 1
                    if not self.pending:
                        self.idle.set()

    def _write_out(self, buf: mmap.mmap, nbytes: int) -> None:
        view = memoryview(buf)
        done = 0
        try:
            while done < nbytes:
                try:
                    w = os.write(self.fd, view[done:nbytes])
                except OSError as e:
                    if e.errno == errno.EINVAL and self.direct:
                        self._refuse_direct()
                        self._reopen_buffered()
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
                self.durable += w
                while self.boundaries and self.boundaries[0] <= self.durable:
                    self.safe_end = self.boundaries.popleft()
                if self.direct and w % ALIGN:
                    self._refuse_direct()
                    self._reopen_buffered()
        finally:
            view.release()

    def _reopen_buffered(self) -> None:
        """Continue at the same offset without O_DIRECT (tail, refusal, or short write)."""
        self.direct = False
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        os.lseek(fd, self.durable, os.SEEK_SET)
        os.close(self.fd)
        self.fd = fd
