"""A client's filter compiled first in a short-lived child under a CPU limit.

libpcap's optimiser grows about cubically with a filter's terms and cannot be interrupted
from Python; it also runs under a process-wide lock (index/libpcap.py), so one costly filter
compiled in the server would hold up every other request. npcapextractd can give up its
instance after a time-out (extract/service/server.py `bounded`); a long-running server cannot.

So each filter is compiled once in a child with a CPU-time timer (ITIMER_PROF, whose signal
ends it) and RLIMIT_CPU behind it (whole seconds only): the kernel ends a child that runs too
long, and the request is answered 400. The children are forked by a small helper
process started once (`start`, after the privilege drop), single-threaded and with libpcap
loaded: forking the server itself could copy a lock another of its threads holds, and a
fresh interpreter per request would cost a fifth of a second. The server hands the helper
one end of a new socketpair per check; the child answers on it and exits. A filter that
passes is then compiled in the server, at a cost known to be within the limit.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading

from pcapvault.extract.service.server import FilterTooCostly
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.libpcap import FilterError

MAX_MESSAGE = 1 << 16  # a request: the filter (the query string is at most 8 KiB) and types

_helper: socket.socket | None = None
_proc: subprocess.Popen | None = None
_lock = threading.Lock()


def start() -> None:
    """Start the helper (once; as the account that serves, after the privilege drop)."""
    global _helper, _proc
    if _helper is not None:
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    code = "from pcapvault.server.filtercheck import _serve; _serve()"
    try:
        _proc = subprocess.Popen([sys.executable, "-I", "-c", code, str(theirs.fileno())],
                                 pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, cwd="/")
    finally:
        theirs.close()
    _helper = ours


def check(expr: str, linktypes: list[int], cpu_limit: float) -> None:
    """Raise FilterError for a bad filter, FilterTooCostly for one past `cpu_limit` seconds.

    Blocking: call it from a worker thread."""
    if not expr.strip():
        return
    start()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            request = json.dumps({"expr": expr, "linktypes": sorted(set(linktypes)),
                                  "cpu": cpu_limit}).encode()
            with _lock:
                socket.send_fds(_helper, [request], [theirs.fileno()])
        except OSError as e:
            raise PcapVaultError(f"cannot check the filter now ({e.strerror}); see the "
                                 "server's journal") from None
        finally:
            theirs.close()
        # The wall-clock bound covers a child that waits rather than computes.
        ours.settimeout(math.ceil(cpu_limit) + 2 + cpu_limit)
        try:
            answer = _recv_all(ours)
        except TimeoutError:
            answer = b""
    if not answer:  # ended by SIGXCPU (or killed) before it could answer
        raise FilterTooCostly(
            f"the filter takes more than {cpu_limit:g} s of CPU time to compile here; "
            "shorten it (fewer terms, or ranges such as portrange and net instead of long "
            "or-lists)")
    message = json.loads(answer)
    if message is not None:
        raise FilterError(message)


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(MAX_MESSAGE):
        parts.append(chunk)
    return b"".join(parts)


def _serve() -> None:
    """The helper: fork a child per request; exit when the server's end closes."""
    from pcapvault.index.libpcap import lib

    lib()
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except InterruptedError:
            continue
        if not msg:
            return
        if not fds:
            continue
        if os.fork() == 0:
            sock.close()
            _child(msg, fds[0])
        os.close(fds[0])


def _child(msg: bytes, fd: int) -> None:
    """Compile for every link type within the CPU limit; answer None or libpcap's message."""
    from pcapvault.index.libpcap import compile_filter

    code = 0
    try:
        conn = socket.socket(fileno=fd)
        req = json.loads(msg)
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = math.ceil(used.ru_utime + used.ru_stime + float(req["cpu"]))
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
        signal.signal(signal.SIGPROF, signal.SIG_DFL)  # its default action: terminate
        signal.setitimer(signal.ITIMER_PROF, float(req["cpu"]))
        answer = None
        try:
            for lt in req["linktypes"]:
                compile_filter(str(req["expr"]), int(lt)).close()
        except FilterError as e:
            answer = str(e)
        conn.sendall(json.dumps(answer).encode())
    except BaseException:  # noqa: BLE001 - no answer: the server reports the check failed
        code = 1
    os._exit(code)
