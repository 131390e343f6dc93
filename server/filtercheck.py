"""A client's filter compiled first in a short-lived child under a CPU limit.

libpcap's optimiser grows about cubically with a filter's terms and cannot be interrupted
from Python; it also runs under a process-wide lock (index/libpcap.py), so one costly filter
compiled in the server would hold up every other request. npcapextractd can give up its
instance after a time-out (extract/service/server.py `bounded`); a long-running server cannot.
So each filter is compiled once in a child forked from a single-threaded fork server (not
from the server itself, whose threads may hold locks at the fork), with RLIMIT_CPU set: the
kernel ends a child that runs too long, and the request is answered 400. A filter that passes
is then compiled for real, at a cost known to be within the limit.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
from multiprocessing.connection import Connection

from pcapvault.index.errors import PcapVaultError
from pcapvault.index.libpcap import FilterError

_CONTEXT = None


class FilterTooCostly(PcapVaultError):
    """Compiling the filter took more CPU time than --filter-cpu-limit allows."""


def _context():  # noqa: ANN202 - multiprocessing's context type is private
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["pcapvault.index.libpcap"])
    return _CONTEXT


def start() -> None:
    """Start the fork server now (at start-up, not on the first request)."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _compile(expr: str, linktypes: list[int], cpu: float, conn: Connection) -> None:
    """In the child: compile for every link type, report the first error (or None)."""
    from pcapvault.index.libpcap import compile_filter, lib

    lib()  # loading libpcap is not the filter's cost
    used = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(used.ru_utime + used.ru_stime + cpu)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    try:
        for lt in linktypes:
            compile_filter(expr, lt).close()
    except FilterError as e:
        conn.send(str(e))
    else:
        conn.send(None)
    conn.close()


def check(expr: str, linktypes: list[int], cpu_limit: float) -> None:
    """Raise FilterError for a bad filter, FilterTooCostly for one past `cpu_limit` seconds.

    Blocking: call it from a worker thread."""
    if not expr.strip():
        return
    ctx = _context()
    ours, theirs = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_compile, args=(expr, sorted(set(linktypes)), cpu_limit, theirs),
                    daemon=True)
    p.start()
    theirs.close()
    try:
        # RLIMIT_CPU counts whole seconds; the wall-clock bound covers a child that waits.
        if ours.poll(math.ceil(cpu_limit) + 2 + cpu_limit):
            try:
                result = ours.recv()
            except EOFError:  # killed by SIGXCPU before it could answer
                result = False
        else:
            result = False
    finally:
        ours.close()
        if p.is_alive():
            p.kill()
        p.join()
    if result is False:
        raise FilterTooCostly(
            f"the filter takes more than {cpu_limit:g} s of CPU time to compile here; "
            "shorten it (fewer terms, or ranges such as portrange and net instead of long "
            "or-lists)")
    if result is not None:
        raise FilterError(result)
