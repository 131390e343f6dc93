"""Read-ahead for extraction: keep the disk busy while the main thread decodes and matches.

Why: a selective query reads thousands of scattered records. Read one after the other, each
waits for the device (a cold 4 KiB read costs about 0.1 ms on the benchmark VM), so 12,000 of
them took a second. Announced to the kernel first with posix_fadvise(WILLNEED), they are all
queued at once and the device serves them in parallel (the same 12,000 in a quarter of that).
A broad query alternated between waiting for a chunk and processing it; announced ahead, the
next chunks arrive while the current one is matched and written.

The announcements come from one thread because fadvise blocks while the device queue is full;
that thread does nothing else, so the main thread's index decoding and matching overlap the
I/O. The reads themselves stay ordinary preads in the main thread and find the pages cached.
How far ahead the thread may run is bounded (LOOKAHEAD_BYTES) so that a query larger than the
page cache does not evict its own next chunks. The thread opens its own descriptor for each
file and closes it itself, so a file the reader is done with is never advised through a
recycled descriptor number.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path

import numpy as np

LOOKAHEAD_BYTES = 256 << 20
PIECE_BYTES = 4 << 20  # a long range is announced in pieces, so the bound is kept
BATCH_RANGES = 64  # ranges announced between two looks at the bound and at cancellations


class Job:
    """The ranges of one file, in the order the reader will consume them."""

    def __init__(self, path: Path, starts: np.ndarray, lens: np.ndarray):
        # Pieces of at most PIECE_BYTES, so that the look-ahead bound is kept on dense files.
        n = np.maximum(1, -(-lens // PIECE_BYTES))
        first = np.repeat(starts, n)
        k = np.arange(len(first)) - np.repeat(np.cumsum(n) - n, n)
        piece_lens = np.minimum(np.repeat(lens, n) - k * PIECE_BYTES, PIECE_BYTES)
        self.path = path
        self.starts = (first + k * PIECE_BYTES).tolist()
        self.lens = piece_lens.tolist()
        self.ends = np.cumsum(piece_lens)  # bytes of the job consumed once a piece is read
        self.total = int(self.ends[-1]) if len(self.ends) else 0
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

    def submit(self, path: Path, starts: np.ndarray, lens: np.ndarray) -> Job:
        """Announce these ranges of `path` (file offsets, lengths) ahead of reading them."""
        job = Job(path, np.asarray(starts, np.int64), np.asarray(lens, np.int64))
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
            self._thread.start()
        return job

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
                job.pos = int(np.searchsorted(job.ends, job.consumed, side="right"))
                job.advised = int(job.ends[job.pos - 1]) if job.pos else 0
                continue
            if job is not None and ahead < self.lookahead:
                limit = job.advised + self.lookahead - ahead
                i = k = job.pos
                while k < len(job.starts) and k - i < BATCH_RANGES and (
                    k == i or int(job.ends[k]) <= limit
                ):
                    k += 1
                job.pos = k
                job.advised = int(job.ends[k - 1])
                return job, job.starts[i:k], job.lens[i:k]
            self._cond.wait()
        return None

    def _run(self) -> None:
        fd, fd_path = -1, None
        try:
            while True:
                with self._cond:
                    got = self._next()
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
