"""Dense reads with O_DIRECT: the device fills our buffer, the page cache is bypassed.

Why: a broad query reads most of every file. Through the page cache every 4 KiB page is
allocated, inserted, filled, copied to the reader and later reclaimed, which costs kernel CPU
even for `cat` and made the broad case CPU-bound. Read with O_DIRECT in 32 MiB pieces, the same
bytes arrive at least as soon for a fraction of that kernel CPU (docs/BENCHMARKS.md, D12, and
"Extraction": dense spans read with O_DIRECT), and a large extraction no longer evicts
everything else the sensor has cached. A thread reads the next piece while the current one is
matched and written.

A span already in the page cache is still read from it (`cached`).

Reads meant for the buffers shared with the extraction client (service/shared.py) still go to
private memory first and are then copied into their slot, on the reading thread. The shared
region is a memfd in 4 KiB pages, and the block layer cuts a read into it at max_segments pages
(1 MiB on the benchmark VM's virtio disk); private buffers are large numpy arrays, which numpy backs
with transparent huge pages, so the same read goes out in 4 MiB requests. Read straight into
the slots, the service's reads took longer and kept the client waiting; through the private
buffer the path was as fast as a direct extraction, for a cheap memcpy into slots that stay
mapped (docs/BENCHMARKS.md, "PAM service": reads for the shared buffers).

Sparse selections stay on the page cache with WILLNEED read-ahead (readahead.py): one 4 KiB
O_DIRECT read at a time would wait for the device each time, and queueing thousands of them
would take asynchronous I/O of our own.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pcapvault.index.directio import ALIGN, align_down, align_up, read_full
from pcapvault.index.errors import PcapVaultError

if TYPE_CHECKING:
    from .output import SharedBuffers

PROBES = 8  # pages sampled across a span to tell whether it is in the page cache already


def cached(path: Path, start: int, end: int) -> bool:
    """Whether the span looks resident in the page cache (then copying from it beats reading
    the disk again: an analyst repeating a query, a file just read by something else).

    Samples PROBES pages with RWF_NOWAIT reads, which fail instead of waiting for the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    page = bytearray(ALIGN)
    try:
        for off in np.linspace(start, max(start, end - 1), PROBES).astype(np.int64).tolist():
            os.preadv(fd, [page], off - off % ALIGN, os.RWF_NOWAIT)
        return True
    except (OSError, AttributeError):  # BlockingIOError: not cached; no RWF_NOWAIT: unknown
        return False
    finally:
        os.close(fd)


def _aligned(size: int) -> np.ndarray:
    raw = np.empty(size + ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    return raw[skip : skip + size]


def _read_all(fd: int, buf: np.ndarray, offset: int, path: Path) -> int:
    """Fill `buf` from `offset`; fewer bytes only at the end of the file."""
    try:
        return read_full(fd, buf, offset)
    except OSError as e:
        raise PcapVaultError(f"{path}: cannot read: {e.strerror}") from None


def _read_through(fd: int, dst: np.ndarray, offset: int, path: Path, own: threading.local
                  ) -> int:
    """_read_all into this thread's private buffer, then copy what came into `dst`."""
    tmp = getattr(own, "buf", None)
    if tmp is None or len(tmp) < len(dst):
        tmp = own.buf = _aligned(len(dst))
    got = _read_all(fd, tmp[: len(dst)], offset, path)
    dst[:got] = tmp[:got]
    return got


class Span:
    """One aligned read in flight: file bytes [base, base + len(buf)) into `buf`."""

    def __init__(
        self, future: Future, whole: np.ndarray, size: int, base: int, need: int, path: Path,
        slot: int | None = None,
    ):
        self.future = future
        self.whole = whole  # the recyclable buffer; `buf` is its first `size` bytes
        self.slot = slot  # the shared slot `whole` is, if any
        self.buf = whole[:size]
        self.base = base
        self.need = need  # bytes from `base` the chunk needs (the rest is alignment)
        self.path = path

    def result(self) -> np.ndarray:
        """The bytes read, from `base`; waits for the read."""
        got = self.future.result()
        if got < self.need:
            raise PcapVaultError(f"{self.path}: short read at byte {self.base + got}")
        return self.buf[: self.need]

    def settle(self) -> None:
        """Wait for the read, whatever its outcome (before its descriptor is closed)."""
        try:
            self.future.result()
        except Exception:  # noqa: BLE001 - the reader reports errors; this only waits
            pass


class DirectReader:
    """Aligned O_DIRECT reads on one thread, in submission order, into recycled buffers, or
    into the buffers shared with the extraction client (service/shared.py) when asked and free."""

    def __init__(self, shared: SharedBuffers | None = None) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._free: list[np.ndarray] = []
        self.shared = shared
        self._own = threading.local()  # each reading thread's buffer for shared reads

    def read(self, fd: int, path: Path, start: int, end: int, share: bool = False) -> Span:
        """Start reading file bytes [start, end) (widened to the alignment). `share`: the
        widened span holds only bytes the client may have (see service/shared.py)."""
        base = align_down(start)
        size = align_up(end) - base
        got = self.shared.acquire(size) if share and self.shared else None
        if got is not None:
            slot, whole = got
        else:
            slot = None
            fits = [k for k, b in enumerate(self._free) if len(b) >= size]
            whole = self._free.pop(fits[0]) if fits else _aligned(-(-size // (1 << 20)) << 20)
        if self._pool is None:
            # Two reads at a time when reading for the client: its writes and our reads then
            # overlap however their speeds vary (measured; one thread kept the device idle).
            self._pool = ThreadPoolExecutor(2 if self.shared else 1,
                                            thread_name_prefix="direct-read")
        if slot is not None:
            future = self._pool.submit(_read_through, fd, whole[:size], base, path, self._own)
        else:
            future = self._pool.submit(_read_all, fd, whole[:size], base, path)
        return Span(future, whole, size, base, end - base, path, slot)

    def release(self, span: Span) -> None:
        """The consumer is done with the span's bytes: its buffer may be read into again."""
        span.settle()
        if span.slot is not None:
            self.shared.release(span.slot)
        else:
            self._free = [*self._free[-3:], span.whole]  # only a few are in flight at a time

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._free.clear()
