"""A pcap streamed over HTTP from the one extraction pipeline (extract/engine.py RequestRun).

The engine runs on a worker thread and writes, through its own Output and Sink, into a pipe;
the response's async iterator reads the other end in large chunks when the event loop says
it is readable. So the result is exactly what npcapextract writes (same engine, same
writer, sendfile from the page cache into the pipe included), it is never held in memory
(the pipe's buffer is the only queue, and uvicorn stops reading it while the client does not
keep up), and one thread per request does the work. A client that goes away closes the
read end: the engine's next write fails with EPIPE (outfile.ClosedPipe) and the run stops.
The audit's bytes are what the stream handed to the server, not what went into the pipe: a
client that leaves strands up to a pipe's worth, and a write cut short counts for nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pcapvault.extract.access import open_dumpset
from pcapvault.extract.engine import RequestRun
from pcapvault.extract.flowplan import Stats
from pcapvault.extract.outfile import ClosedPipe, reader_closed
from pcapvault.extract.output import Interface, Output, Sink
from pcapvault.extract.request import Request
from pcapvault.extract.service.policy import checked_filter, open_sources
from pcapvault.index.errors import PcapVaultError

from . import filtercheck

F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20  # the pipe's buffer: fewer wake-ups of both ends
CHUNK = 1 << 20  # one read of the pipe, one body message


class PipeOutput(Output):
    """The engine's Output writing one pcap (or pcapng) stream into the pipe `fd`."""

    def __init__(self, fd: int, ifaces: list[Interface], **caps: int | bool | None):
        super().__init__("-", ifaces, **caps)
        self.fd = fd
        self.stream = True  # a pipe: records may go from the page cache with sendfile

    def _open(self) -> Sink:
        self.files.append("-")
        return Sink(self.fd, self.pcapng, self.ifaces, self.snap)

    def reader_gone(self) -> bool:
        """The response's end of the pipe is closed: the client left (see body)."""
        return self.fd >= 0 and reader_closed(self.fd)

    @property
    def sent(self) -> int:
        """Bytes written into the pipe, file header included."""
        return self.sink.bytes if self.sink else 0

    def close(self) -> None:
        """Close the pipe's write end: the reader sees the end of the stream."""
        if self.sink is not None:
            self.sink.close()
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


@dataclass
class Prepared:
    """A request ready to run: its sources opened and its filter compiled."""

    run: RequestRun
    stats: Stats
    warnings: list[str] = field(default_factory=list)
    started: bool = False  # the body began: its worker will report how it ended


def prepare(req: Request, allowed: str | None, filter_cpu: float) -> Prepared:
    """Open the dump sets and compile the effective filter (blocking: call it on a thread).

    `req.filter` is the user's filter; members of a restricted group run it inside
    `allowed`, exactly as npcapextractd does (policy.open_sources). The filter is first
    compiled in a child under a CPU limit (filtercheck.py). Raises PcapVaultError (a bad
    filter or time, an unusable dump set) for the client to read."""
    sets = [open_dumpset(p) for p in req.dumpsets]
    linktypes = [int(ds.meta.get("linktype", 1)) for ds in sets]
    filtercheck.check(checked_filter(req.filter, allowed, linktypes), linktypes, filter_cpu)
    sources = open_sources(req.dumpsets, sets, req.filter, allowed)
    prepared = Prepared(None, Stats())  # type: ignore[arg-type]
    prepared.run = RequestRun(req, sources, prepared.stats, prepared.warnings.append)
    return prepared


Finished = Callable[[int, int, str | None], None]  # (packets, bytes, error or None)


class _Ending:
    """Calls `finished` once, when both the engine's thread and the response's stream have
    ended: the engine knows its packets and why it stopped, the stream what it gave out."""

    def __init__(self, finished: Finished):
        self.finished = finished
        self.lock = threading.Lock()
        self.engine: tuple[int, str | None] | None = None
        self.given: int | None = None
        self.complete = False  # the stream read the pipe to its end

    def engine_done(self, packets: int, _written: int, error: str | None) -> None:
        with self.lock:
            self.engine = (packets, error)
            ready = self.given is not None
        if ready:
            self._call()

    def stream_done(self, given: int, complete: bool) -> None:
        with self.lock:
            self.given, self.complete = given, complete
            ready = self.engine is not None
        if ready:
            self._call()

    def _call(self) -> None:
        packets, error = self.engine  # type: ignore[misc]
        if error is None and not self.complete:  # the engine was done, the client was not
            error = "the client stopped reading; result incomplete"
        self.finished(packets, self.given, error)  # type: ignore[arg-type]


async def body(prepared: Prepared, finished: Finished) -> AsyncIterator[bytes]:
    """The response body: the engine writes into a pipe on a thread, this reads it.

    `finished` is called once, when both have ended, with the engine's packets, the bytes
    the server took from this stream, and why it stopped short (None when complete)."""
    ending = _Ending(finished)
    given, complete = 0, False
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(wfd, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default buffer works too
    os.set_blocking(rfd, False)
    worker = threading.Thread(target=_work, args=(prepared.run, wfd, ending.engine_done),
                              name="pcap-stream", daemon=True)
    try:
        worker.start()
    except BaseException:  # no worker: the response's end writes the audit line
        os.close(wfd)
        os.close(rfd)
        raise
    prepared.started = True
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                data = os.read(rfd, CHUNK)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(rfd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(rfd)
                continue
            if not data:
                complete = True
                return
            yield data
            given += len(data)  # the server took it (it asks for more only once sent)
            # Let the loop run between chunks: once the client is gone the server's sends
            # return at once, and without this a pipe the engine keeps full would be read to
            # the end before Starlette's disconnect watch could cancel this stream.
            await asyncio.sleep(0)
    finally:
        os.close(rfd)  # a client gone: the engine's next write gets EPIPE and stops
        ending.stream_done(given, complete)


def _wake(ready: asyncio.Future) -> None:
    if not ready.done():
        ready.set_result(None)


def _work(run: RequestRun, wfd: int, finished: Finished) -> None:
    error: str | None = None
    try:
        run.write(lambda ifaces, **opts: PipeOutput(wfd, ifaces, **opts))
    except ClosedPipe:
        error = "the client stopped reading; result incomplete"
    except PcapVaultError as e:
        error = f"{e}; result incomplete"
    except OSError as e:
        error = f"{e.strerror}: {e.filename}; result incomplete"
    except BaseException as e:  # noqa: BLE001 - a thread's end: said in the journal and audit
        error = f"internal error: {type(e).__name__}: {e}"
    finally:
        out = run.out
        if out is None:
            os.close(wfd)
        else:
            out.close()
    finished(out.packets if out else 0, out.sent if out else 0, error)
