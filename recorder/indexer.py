"""Indexes closed files in a second process, so the capture loop never waits for numpy.

The capture process only renames a finished pcap into place and queues it here; this process
builds its index with the same builder the repair tool uses, then links both into the
timeline. Linking last means a file becomes visible to extraction only once it is indexed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp

# Loaded now, while the code is surely readable: after -u the account may not be able to.
import multiprocessing.popen_fork  # noqa: F401
import multiprocessing.queues  # noqa: F401
import multiprocessing.synchronize  # noqa: F401
import os
import queue
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pcapvault.index import compressed
from pcapvault.index.builder import build_index, index_pcap
from pcapvault.index.directio import WholeFileReader
from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.indexfile import write_index
from pcapvault.index.pcapfile import GLOBAL_HEADER_LEN, parse_global_header

log = logging.getLogger("pcapvault.recorder")
PR_SET_PDEATHSIG = 1
MAX_RESTARTS = 5
RESTART_WINDOW = 600


# The file was just written with O_DIRECT, so it is not in the page cache; reading it back
# through the cache (mmap or read) would allocate a fresh page per 4 KiB, the very cost the
# writer avoids (docs/BENCHMARKS.md, "Recorder": the indexer's O_DIRECT buffer against a cold
# mmap).
_reader = WholeFileReader()


def index_and_link(
    ds: DumpSet, sf: StoredFile, file_mode: int | None = None, compress: int | None = None
) -> StoredFile | None:
    """Index `sf` (and compress it with --compress), link it into the timeline.

    Returns the file as finally stored (None if it was deleted meanwhile). The index is built from
    the plain file, so its offsets are uncompressed positions, which the seekable format lets
    readers reach directly. The plain pcap goes only once the compressed one and its index
    are in place. The budget may delete a file while this runs (tiny limits); then whatever
    this step created for it is removed again instead of leaving orphans.
    """
    if compress is not None and not sf.pcap.exists():
        done = StoredFile(sf.first_ns, sf.pcap.with_name(sf.pcap.name + compressed.SUFFIX))
        if done.index.exists():
            # A restarted indexer: the dead one compressed and indexed the file and removed
            # the plain one (in that order), but died before linking.
            return done if ds.link_if_present(done) else None
    view = _reader.read(sf.pcap)
    arr = None if view is None else np.frombuffer(view, np.uint8)
    del view
    if arr is None:
        idx = build_index(sf.pcap)
    else:
        idx, _ = index_pcap(arr, parse_global_header(bytes(arr[:GLOBAL_HEADER_LEN]),
                                                     str(sf.pcap)))
    final = sf
    if compress is not None:
        final = StoredFile(sf.first_ns, sf.pcap.with_name(sf.pcap.name + compressed.SUFFIX))
        compressed.compress_file(sf.pcap, final.pcap, compress, file_mode,
                                 data=None if arr is None else memoryview(arr))
    del arr
    write_index(final.index, idx)
    if file_mode is not None:
        os.chmod(final.index, file_mode)
    if final is not sf:
        try:
            sf.pcap.unlink()
        except FileNotFoundError:  # the budget took the plain file: its copy goes too
            ds.delete(final)
            return None
    return final if ds.link_if_present(final) else None


def _serve(root: str, file_mode: int, compress: int | None, close_fds: list[int], parent: int,
           todo: mp.Queue, done: mp.Queue) -> None:
    # Forked from the capture process: its socket and dump-set lock are not ours to hold,
    # and we must not outlive it (kill -9 of the recorder would leave us holding the queue).
    for fd in close_fds:
        os.close(fd)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        return
    # Indexing and compression may lag behind; capture must never wait for them. Idle
    # scheduling gives the CPU to the capture process (and the kernel's receive path) first.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        os.nice(19)
    # The parent decides when to stop: it flushes the last file first, then sends None.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="recorder[indexer]: %(message)s")
    ds = DumpSet.open(Path(root))
    while True:
        item = todo.get()
        if item is None:
            return
        first_ns, path = item
        sf = StoredFile(first_ns, Path(path))
        final = None
        try:
            final = index_and_link(ds, sf, file_mode, compress)
        except (PcapVaultError, OSError) as e:
            if sf.pcap.exists():  # else the budget deleted it before we got to it
                log.error("cannot index %s: %s (npcaprepair will retry)", sf.name, e)
        # The file as linked ("" when it was deleted or not indexed): the --exec-cmd hook's.
        done.put((path, "" if final is None else str(final.pcap)))


class IndexerFailed(PcapVaultError):
    """The indexer process keeps dying: recording on would leave ever more files unindexed."""


class BackgroundIndexer:
    """Handle on the indexing process, which is restarted when it dies.

    The OOM killer may well pick the indexer (it allocates a buffer per file); without it
    files would pile up unindexed and invisible to extraction. So its death is noticed at the
    next loop turn, logged, and a fresh process gets everything not reported done.
    """

    def __init__(self, ds: DumpSet, file_mode: int = 0o640, compress: int | None = None,
                 close_fds: Sequence[int] = (), keep_finished: bool = False):
        """`keep_finished`: remember the files linked, for take_finished (the hook)."""
        self.args = (str(ds.root), file_mode, compress, list(close_fds), os.getpid())
        self.pending: dict[str, tuple[int, int]] = {}  # path: (first_ns, size)
        self.keep_finished = keep_finished
        self.finished: list[StoredFile] = []  # indexed and linked, for take_finished
        self.deaths: list[float] = []  # monotonic times, within RESTART_WINDOW
        self.restarts = 0
        self.failed = False
        self._start()

    def _start(self) -> None:
        # Forked, not spawned: after -u the account may not be able to exec this Python, and
        # a fork needs no re-import. Fresh queues each time: a process killed while holding a
        # queue's lock would leave the old ones blocked for good.
        ctx = mp.get_context("fork")
        self.todo: mp.Queue = ctx.Queue()
        self.done: mp.Queue = ctx.Queue()
        self.proc = ctx.Process(target=_serve, args=(*self.args, self.todo, self.done),
                                name="pcapvault-indexer")
        self.proc.start()

    def submit(self, sf: StoredFile, size: int) -> None:
        self.pending[str(sf.pcap)] = (sf.first_ns, size)
        self.todo.put((sf.first_ns, str(sf.pcap)))

    def collect(self) -> None:
        """Take in what the indexer finished, without waiting."""
        while True:
            try:
                self._done(self.done.get_nowait())
            except queue.Empty:
                return

    def _done(self, item: tuple[str, str]) -> None:
        path, final = item
        first = self.pending.pop(path, None)
        if first is not None and final and self.keep_finished:
            self.finished.append(StoredFile(first[0], Path(final)))

    def take_finished(self) -> list[StoredFile]:
        """The files indexed and linked since the last call, each once, in order."""
        self.collect()
        out, self.finished = self.finished, []
        return out

    def pending_bytes(self) -> int:
        self.collect()
        return sum(size for _, size in self.pending.values())

    def check(self) -> None:
        """Restart the indexer if it died; IndexerFailed when it died too often.

        At most MAX_RESTARTS deaths within RESTART_WINDOW seconds are survived: an indexer
        that dies on every file (a full memory cgroup) should stop the recorder with a clear
        error, not flap forever.
        """
        if self.failed or self.proc.is_alive():
            return
        code = self.proc.exitcode
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit status {code}")
        self.collect()  # records of under PIPE_BUF bytes: whole, even from a killed writer
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW] + [now]
        waiting = len(self.pending)
        if len(self.deaths) > MAX_RESTARTS:
            self.failed = True
            self.todo.cancel_join_thread()  # nobody reads it now: exit must not wait on it
            raise IndexerFailed(
                f"the indexer process died {len(self.deaths)} times within "
                f"{RESTART_WINDOW // 60} minutes (last {how}); stopping, with {waiting} "
                "closed files not yet indexed: find out why (memory limits, dmesg), then "
                "start the recorder again, which indexes them"
            )
        self.restarts += 1
        log.error("the indexer process died (%s) with %d closed files not yet indexed; "
                  "restarting it (restart %d, at most %d within %d minutes)", how, waiting,
                  self.restarts, MAX_RESTARTS, RESTART_WINDOW // 60)
        for q in (self.todo, self.done):
            q.cancel_join_thread()
            q.close()
        self._start()
        for path, (first_ns, _size) in self.pending.items():
            self.todo.put((first_ns, path))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every submitted file is indexed and linked (shutdown, tests)."""
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            if not self.proc.is_alive():
                try:
                    self.check()
                except IndexerFailed as e:
                    log.error("error: %s", e)
                if self.failed:
                    break
            try:
                self._done(self.done.get(timeout=0.05))
            except queue.Empty:
                continue
        return not self.pending

    def close(self, timeout: float = 60.0) -> None:
        self.wait_idle(timeout)
        self.todo.put(None)
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
