"""The processes that compute conversations and volume for npcapserve.

Tables and counts are computed from the indexes with numpy and zstd, much of it holding the
interpreter's lock: two requests at once in the server process would take turns on one core
(the web page asks for both at once), and a long one would slow every other request's
Python work, TLS included. So they run in a few worker processes, spawned after the
privilege drop (the service account's, like the server's), each with the modules loaded
before the first request; the server's thread only waits. Their answers are small (a
table's rows, a count per step).

A worker that dies (killed, out of memory) breaks the pool: the request that finds it so is
answered 503 (ask again) and a new pool takes the next ones.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pcapvault.extract import conversations as tables
from pcapvault.extract.request import Request

WATCH_S = 0.5  # how often a worker looks whether the server still runs


def _ready() -> None:
    """A worker's start: load what a request needs (numpy, the index and libpcap modules)
    ahead of the first one, and watch the server."""
    from pcapvault.extract import flowmatch  # noqa: F401
    from pcapvault.index.libpcap import lib

    lib()
    threading.Thread(target=_orphaned, args=(os.getppid(),), name="parent-watch",
                     daemon=True).start()


def _orphaned(parent: int) -> None:
    """End this worker once the server is gone, however it ended: the workers hold the
    task queue's write end themselves, so its end of file never comes, and they would live
    on with the server's standard output and error open."""
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    os._exit(0)


def _nothing() -> None:
    """A task that makes the pool start a worker."""


class WorkerDied(RuntimeError):
    """A worker process ended during a request (the server answers 503: ask again)."""


class IndexWorkers:
    """A pool of `count` worker processes; `start` after the privilege drop."""

    def __init__(self, count: int):
        self.count = count
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._pool = self._new_pool()
            # tasks submitted at once, with no idle worker yet: each starts one
            for f in [self._pool.submit(_nothing) for _ in range(self.count)]:
                f.result()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_ready)

    def conversations(self, req: Request, **kw: Any) -> tables.Table:
        """extract.conversations.conversations in a worker (blocking: call it on a thread)."""
        return self._run(tables.conversations, req, **kw)

    def volume(self, req: Request, **kw: Any) -> tables.Volume:
        """extract.conversations.volume in a worker (blocking: call it on a thread)."""
        return self._run(tables.volume, req, **kw)

    def _run(self, fn: Any, req: Request, **kw: Any) -> Any:
        pool = self._pool
        if pool is None:
            raise RuntimeError("IndexWorkers.start was not called")
        try:
            return pool.submit(fn, req, **kw).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:  # the first to see it makes the next pool
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
            raise WorkerDied("a worker process ended during the request; ask again") from None

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
