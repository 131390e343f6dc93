"""Page-cache read-ahead: the one way extraction asks the kernel for bytes before reading them.

Why: a cold 4 KiB read waits for the device; read one after the other, scattered records
wait for it one by one. Announced first with posix_fadvise(WILLNEED), they are queued at once
and the device serves them in parallel, several times sooner (docs/BENCHMARKS.md, D13). A
broad query alternated between waiting for a chunk and processing it; announced ahead, the
next chunks arrive while the current one is matched and written. The reads themselves stay
ordinary preads and find the pages cached.

Two forms, both numpy-free (the host-query fast path uses them without importing numpy):

* `will_need` and `warm_indexes`: one announcement now, for index files, even before the heavy
  imports (importing numpy and the index code takes a while: docs/BENCHMARKS.md, D10; the
  disk fetches the window's index files meanwhile);
* `Prefetcher`: the candidates' byte ranges, file after file, announced by one thread because
  fadvise blocks while the device queue is full; that thread does nothing else, so planning,
  decoding and matching overlap the I/O. How far ahead it may run is bounded (LOOKAHEAD_BYTES)
  so that a query larger than the page cache does not evict its own next chunks. It opens its
  own descriptor for each file and closes it itself, so a file the reader is done with is
  never advised through a recycled descriptor number.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import accumulate
from pathlib import Path

LOOKAHEAD_BYTES = 256 << 20
PIECE_BYTES = 4 << 20  # a long range is announced in pieces, so the bound is kept
BATCH_RANGES = 64  # ranges announced between two looks at the bound and at cancellations
PCAP_HEAD = 4096  # the page of a pcap's global header, which opening it reads


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


class Job:
    """The ranges of one file, in the order the reader will consume them."""

    def __init__(self, path: Path, starts: Sequence[int], lens: Sequence[int]):
        starts, lens = list(starts), list(lens)
        # Pieces of at most PIECE_BYTES, so that the look-ahead bound is kept on dense files.
        if lens and max(lens) > PIECE_BYTES:
            pieces = [(s + k, min(PIECE_BYTES, ln - k)) for s, ln in zip(starts, lens, strict=True)
                      for k in range(0, max(ln, 1), PIECE_BYTES)]
            starts, lens = [s for s, _ in pieces], [ln for _, ln in pieces]
        self.path = path
        self.starts = starts
        self.lens = lens
        self.ends = list(accumulate(self.lens))  # bytes of the job consumed once a piece is read
        self.total = self.ends[-1] if self.ends else 0
        self.pos = 0  # next piece to announce
        self.advised = 0  # bytes announced (cumulative, in reading order)
        self.consumed = 0  # bytes the reader has read (same order)

    @property
    def ahead(self) -> int:
        return max(0, self.advised - self.consumed)

    @property
    def announced(self) -> bool:
        return self.pos >= len(self.starts)

    @property
    def finished(self) -> bool:
        return self.consumed >= self.total


class Prefetcher:
    """Announces the reads of submitted jobs, in order, at most `lookahead` bytes ahead."""

    def __init__(self, lookahead: int = LOOKAHEAD_BYTES):
        self.lookahead = lookahead
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._stop = False
        self._thread: threading.Thread | None = None

    def submit(self, path: Path, starts: Sequence[int], lens: Sequence[int]) -> Job:
        """Announce these ranges of `path` (file offsets, lengths) ahead of reading them."""
        job = Job(path, starts, lens)
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()
        return job

    def announced(self, job: Job) -> None:
        """Wait until all of `job` is announced (or the bound or close() stops the thread):
        a reader that starts then never overtakes the announcements and waits for the device
        one record at a time."""
        with self._cond:
            while not (job.announced or job.finished or self._stop
                       or sum(j.ahead for j in self._jobs) >= self.lookahead):
                self._cond.wait()

    def consumed(self, job: Job, nbytes: int) -> None:
        """The reader has read `nbytes` more of `job`: the thread may run further ahead."""
        with self._cond:
            job.consumed += nbytes
            self._cond.notify_all()

    def done(self, job: Job) -> None:
        """The reader is done with `job` (read or abandoned): announce no more of it."""
        with self._cond:
            job.consumed = job.total
            self._cond.notify_all()

    def close(self) -> None:
        """Stop announcing; the thread closes what it has open and ends."""
        with self._cond:
            self._stop = True
            self._jobs.clear()
            self._cond.notify_all()

    def _next(self) -> tuple[Job, list[int], list[int]] | None:
        """Under the lock: the next pieces to announce, waiting while too far ahead.

        Jobs stay queued until read, so what was announced but not yet read counts against
        the bound until the reader gets there."""
        while not self._stop:
            while self._jobs and self._jobs[0].finished:
                self._jobs.popleft()
            ahead = sum(j.ahead for j in self._jobs)
            job = next((j for j in self._jobs if not j.announced and not j.finished), None)
            if job is not None and job.consumed > job.advised:  # the reader got there first
                job.pos = bisect_right(job.ends, job.consumed)
                job.advised = job.ends[job.pos - 1] if job.pos else 0
                continue
            if job is not None and ahead < self.lookahead:
                limit = job.advised + self.lookahead - ahead
                i = k = job.pos
                while k < len(job.starts) and k - i < BATCH_RANGES and (
                    k == i or job.ends[k] <= limit
                ):
                    k += 1
                job.pos = k
                job.advised = job.ends[k - 1]
                return job, job.starts[i:k], job.lens[i:k]
            self._cond.notify_all()  # announced(): the bound or the end of the jobs is reached
            self._cond.wait()
        return None

    def _run(self) -> None:
        fd, fd_path = -1, None
        try:
            while True:
                with self._cond:
                    got = self._next()
                    self._cond.notify_all()  # announced() may be waiting for these pieces
                if got is None:
                    return
                job, starts, lens = got
                if job.path != fd_path:
                    if fd >= 0:
                        os.close(fd)
                    fd, fd_path = -1, job.path
                    try:
                        fd = os.open(job.path, os.O_RDONLY)
                    except OSError:
                        fd = -1  # the reader will report it; read-ahead is only a hint
                if fd < 0:
                    continue
                try:
                    for s, ln in zip(starts, lens, strict=True):
                        os.posix_fadvise(fd, s, ln, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass  # only a hint: the reader reads regardless
        finally:
            if fd >= 0:
                os.close(fd)
