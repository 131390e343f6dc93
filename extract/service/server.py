"""npcapextractd: extraction behind PAM for users who may not read the dump sets.

Recorded packets are personal data, so the dump sets belong to the recorder's account and
nobody else may read them. n2disk lets other users extract through a setuid binary that asks
PAM; Python cannot be setuid, so systemd starts this program once per connection instead
(npcapextract.socket with Accept=yes, the connection on fd 3) and it hands out nothing before
it knows who asks:

1. the peer's uid comes from the kernel (SO_PEERCRED), never from the request;
2. PAM, service `npcapextract`, checks that account's password. pam_unix has to read
   /etc/shadow for another user's password, so this step runs as root;
3. membership of the extractors' group (`npcap`) is the authorization, and the dump sets
   named must be ones this sensor serves: each path is opened once, as root, and what was
   opened is checked and then read through that descriptor (index/anchored.py); members of
   a group given with --group-filter see only the packets that group's filter selects;
4. then the process becomes the service account for good, before it compiles a filter or
   opens a packet, and streams the result through the same engine as a direct extraction.
   The filter is compiled under a CPU-time limit, and a client that hangs up stops the work.

Every attempt, allowed or not, ends as one JSON line in the audit file (opened as root
before the drop, never writable by clients) and in syslog. docs/SECURITY.md has the threat
model and the wire format.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from pcapvault.index.anchored import AnchoredDumpSet, Held, RefusedPath, hold, identities
from pcapvault.index.clitypes import Number
from pcapvault.index.cliutil import exit_now, run
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.times import format_time

from ..request import Request
from . import wire
from .policy import (
    Audit,
    AuditLogError,
    GroupFilter,
    allowed_filter,
    authenticate,
    default_allow,
    effective_filter,
    member_of,
    open_sources,
    parse_group_filters,
)

if TYPE_CHECKING:
    from ..flowplan import Stats
    from .framed import ConnectionOutput

T = TypeVar("T")
PROG = "npcapextractd"
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SEND_BUFFER = 8 << 20  # fewer wake-ups while streaming: the client drains in large reads
STALL_SECONDS = 300  # a client that reads nothing for this long is dropped (--stall-timeout)
TABLE_FRAME = 1 << 20  # a table's JSON travels in DATA frames of this size
DRAIN_SECONDS = 1.0  # after an error reply, what a client still sends is read this long
HANGUP_POLL = 0.2  # how often a hang-up is looked for while the service works


class ServiceError(PcapVaultError):
    """The service itself cannot run (not socket-activated, no audit log, ...)."""


@dataclass(frozen=True)
class Settings:
    account: str
    group: str
    group_filters: tuple[GroupFilter, ...]
    pam_service: str
    audit_log: Path
    allow: tuple[str, ...]
    max_attempts: int
    fail_delay: float
    timeout: float
    filter_cpu: float
    stall: float = STALL_SECONDS


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    user: str | None


def activation_socket() -> socket.socket:
    """The connection systemd accepted for this instance (sd_listen_fds with Accept=yes)."""
    pid = os.environ.pop("LISTEN_PID", None)
    fds = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or fds != "1":
        raise ServiceError(
            "not started by socket activation: expects one connection on fd 3 with "
            "LISTEN_FDS=1 and LISTEN_PID (npcapextract.socket with Accept=yes starts it)"
        )
    try:
        sock = socket.socket(fileno=3)
    except OSError as e:
        raise ServiceError(f"fd 3 is not a socket: {e.strerror}") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ServiceError("fd 3 is not a Unix stream socket")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ServiceError("fd 3 is a listening socket: the socket unit needs Accept=yes")
    sock.set_inheritable(False)
    return sock


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    return Peer(pid, uid, gid, user)


def service_uid(account: str) -> int:
    """Whose dump sets are served: the service account's (ours, when started unprivileged)."""
    if os.geteuid() != 0:
        return os.geteuid()
    from pcapvault.index.privileges import lookup

    return lookup(account).pw_uid


def become(account: str) -> None:
    """Become the service account for good: nothing after this runs as root."""
    if os.geteuid() != 0:
        return  # started unprivileged (see docs/SECURITY.md); nothing to give up
    from pcapvault.index.privileges import drop_to, lookup

    drop_to(lookup(account))
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise ServiceError("could not give up root")


class Preload(threading.Thread):
    """Imports the extraction engine (and loads libpcap) while PAM checks the password.

    A fifth of a second of imports would otherwise come after the check, on every
    connection. The modules must also be loaded before the privilege drop, in case the
    service account cannot read the interpreter's tree."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            from pcapvault.index import indexfile, pcapfile  # noqa: F401
            from pcapvault.index.libpcap import lib

            from .. import engine, flowmatch, flowplan, output  # noqa: F401
            from . import framed  # noqa: F401

            lib()
        except BaseException as e:  # noqa: BLE001 - raised in wait(), where it is reported
            self.error = e

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _log(msg: str) -> None:
    """A line for the journal (stderr of a socket-activated unit)."""
    print(f"{PROG}: {' '.join(msg.split())}", file=sys.stderr, flush=True)


class ClientGone(BaseException):
    """The client hung up while the service was working for it (raised where the session is)."""


class FilterTooCostly(PcapVaultError):
    """Compiling the client's filter took more CPU time than --filter-cpu-limit allows."""


def hung_up(conn: socket.socket) -> bool:
    """Whether the client closed its end (not merely its sending half: a client that
    shuts down writing after its request still reads the answer)."""
    p = select.poll()
    p.register(conn, 0)  # POLLHUP and POLLERR are always reported
    return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))


class HangupWatch(threading.Thread):
    """Raises ClientGone in the main thread when the client hangs up, so that no work goes
    on for nobody (a query over months of files that writes nothing for a while would
    otherwise run to its end). SIGUSR1 carries it; its handler raises once, only while
    armed, and not while the main thread is already unwinding (a failed write, a generator
    being closed): raised there, it would interrupt the clean-up and end as "Exception
    ignored" in the journal. Until it has raised, the watch signals again each poll."""

    def __init__(self, conn: socket.socket):
        super().__init__(daemon=True, name="hangup-watch")
        self.conn = conn
        self.armed = True
        self.raised = False
        self.stop = threading.Event()
        signal.signal(signal.SIGUSR1, self._raise)
        self.start()

    def _raise(self, signum: int, frame: object) -> None:
        if self.armed and not self.raised and sys.exc_info()[0] is None:
            self.raised = True
            raise ClientGone()

    def run(self) -> None:
        while not self.stop.wait(HANGUP_POLL):
            if self.raised or not self.armed:
                return
            if hung_up(self.conn):
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)

    def close(self) -> None:
        self.armed = False
        self.stop.set()


def bounded(work: Callable[[], T], cpu_limit: float, conn: socket.socket) -> T:
    """`work()` (libpcap compiling a client's filter) under a CPU-time limit.

    libpcap's optimiser grows about cubically with the number of terms and cannot be
    interrupted from Python; the call runs on a thread (ctypes releases the GIL) while this
    one watches the process's CPU time and the connection. Past the limit, or when the
    client hangs up, the caller reports it and the instance exits, which ends the thread."""
    result: list = []
    error: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.append(work())
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the session
            error.append(e)
        finally:
            done.set()

    start = time.process_time()
    threading.Thread(target=run, daemon=True, name="compile").start()
    while not done.wait(0.02):
        if time.process_time() - start > cpu_limit:
            raise FilterTooCostly(
                f"the filter takes more than {cpu_limit:g} s of CPU time to compile here; "
                "shorten it (fewer terms, or ranges such as portrange and net instead of "
                "long or-lists)")
        if hung_up(conn):
            raise ClientGone()
    if error:
        raise error[0]
    return result[0]


class Session:
    """One connection: up to max_attempts requests until one is allowed or refused."""

    def __init__(self, conn: socket.socket, settings: Settings, audit: Audit):
        self.conn = conn
        self.settings = settings
        self.audit = audit
        self.preload: Preload | None = None
        self.peer = peer_of(conn)
        self.record: dict | None = None
        self.started = time.monotonic()
        self.audited = False
        self.held: list[Held] = []
        self.sets: list[AnchoredDumpSet] = []
        self.watch: HangupWatch | None = None

    def run(self) -> None:
        # Each request must arrive whole within --timeout of the connection (the first) or
        # of the answer to the one before: a deadline for the request, not for each read.
        turn = time.monotonic()
        for attempt in range(1, self.settings.max_attempts + 1):
            self.started = time.monotonic()
            self.record = self._record(attempt)
            self.audited = False
            if not self._attempt(attempt, turn + self.settings.timeout):
                return
            turn = time.monotonic()

    def _attempt(self, attempt: int, deadline: float) -> bool:
        """One request; True when the client may try again on this connection."""
        s = self.settings
        record, started = self.record, self.started
        try:
            asked = self._read_request(deadline)
        except wire.ProtocolError as e:
            self._audit(record, started, "rejected", str(e))
            self._reply("error", str(e))
            drain(self.conn)
            return False
        if asked is None:
            self.audited = True  # closed without asking: a probe, or a client that gave up
            return False
        # Failures are slowed down from here, not from the connection: a client that waits
        # before it asks must not learn from the answer's speed whether a user exists.
        requested = time.monotonic()
        req = asked.request
        record.update(_describe(req))
        user = self.peer.user
        if user is None:
            self._deny(record, requested, f"uid {self.peer.uid} has no account name")
            return False
        record["pam_user"] = user
        if self.preload is None:
            # Now, not earlier: the imports hold the GIL, and PAM releases it. Started any
            # sooner they would only slow down the way to this call.
            self.preload = Preload()
        ok, why = authenticate(user, asked.password, s.pam_service)
        if not ok:
            left = s.max_attempts - attempt
            msg = f"authentication failed for {user}"
            if not left:
                msg += f" ({s.max_attempts} attempts, no more on this connection)"
            self._deny(record, requested, msg, detail=why, retry=left > 0)
            return left > 0
        gids = set(os.getgrouplist(user, pwd.getpwnam(user).pw_gid))
        if not member_of(s.group, gids):
            self._deny(record, requested,
                       f"{user} is not a member of the group {s.group} whose members may extract")
            return False
        if not self._hold(req, record, requested):
            return False
        restrictions = tuple(f for f in s.group_filters if f.gid in gids)
        allowed = allowed_filter(restrictions)
        record.update(restricted_by=[r.group for r in restrictions],
                      effective_filter=effective_filter(req.filter, allowed))
        self.watch = HangupWatch(self.conn)
        try:
            if req.table:
                self._table(req, record, started, restrictions, allowed)
            else:
                self._extract(req, asked.shared_memory, record, started, restrictions, allowed)
        finally:
            self.watch.close()  # answered: a client that now hangs up is done with us
        return False

    def _hold(self, req: Request, record: dict, requested: float) -> bool:
        """Open every dump set named, as root, once (see index/anchored.py)."""
        s = self.settings
        try:
            owner = service_uid(s.account)
            roots = identities(s.allow)
        except PcapVaultError as e:
            self._deny(record, requested, str(e))
            return False
        for path in req.dumpsets:
            try:
                self.held.append(hold(path, owner, roots))
            except PcapVaultError as e:  # RefusedPath carries where the path led
                real = getattr(e, "real", None)
                record["resolved"] = [h.real for h in self.held] + ([real] if real else [])
                # Why, and where a link led, are for the audit only: root resolved the
                # client's text, so the reason would tell a member what lies in directories
                # they may not search (whether a name exists, where a link there points).
                self._deny(record, requested, f"{path} is not a dump set this service serves",
                           detail=str(e))
                return False
        record["resolved"] = [h.real for h in self.held]
        return True

    def interrupted(self, e: BaseException) -> None:
        """A bug, systemd stopping us or the client hanging up must still leave an audit line
        (and, where someone may still read it, a one-line answer)."""
        if self.watch is not None:
            self.watch.close()
        if isinstance(e, Terminated):
            why, told = "stopped by SIGTERM", "the extraction service was stopped"
        elif isinstance(e, ClientGone):
            why, told = "the client hung up; work stopped", ""
        else:
            why = f"internal error: {type(e).__name__}"
            told = "internal error in the extraction service; see its journal"
            _log(f"internal error: {type(e).__name__}: {e}")
        if self.record is not None and not self.audited:
            self._audit(self.record, self.started, "error", why)
        if told:
            self._reply("error", told)

    def _record(self, attempt: int) -> dict:
        p = self.peer
        return {
            "time": format_time(time.time_ns()),
            "service": self.settings.pam_service,
            "peer_pid": p.pid,
            "peer_uid": p.uid,
            "peer_user": p.user,
            "pam_user": None,
            "attempt": attempt,
        }

    def _read_request(self, deadline: float) -> wire.Asked | None:
        try:
            head = wire.recv_header(self.conn, "request", deadline)
            if head is None:
                return None
            kind, length = head
            if kind != wire.REQUEST:
                raise wire.ProtocolError(f"malformed request: frame type {kind!r}, expected "
                                         f"{wire.REQUEST!r}")
            if length > wire.MAX_REQUEST:
                raise wire.ProtocolError(
                    f"request too large: {length} bytes (limit {wire.MAX_REQUEST})"
                )
            return wire.Asked.decode(wire.recv_exact(self.conn, length, "request", deadline))
        except TimeoutError:
            raise wire.ProtocolError(
                f"no complete request within {self.settings.timeout:g} s"
            ) from None
        except ConnectionError as e:
            raise wire.ProtocolError(f"connection lost while reading the request ({e})") from None

    def _reply(self, status: str, message: str = "", **extra: object) -> None:
        try:
            wire.send_json(self.conn, wire.REPLY, {"status": status, "message": message,
                                                   **extra})
        except OSError:
            pass  # the client left; the audit line still says what happened

    def _deny(self, record: dict, since: float, reason: str, *, detail: str = "",
              retry: bool = False) -> None:
        # Failures take at least fail_delay from the request (PAM's own delay counts), so
        # guessing is slow and a wrong password cannot be told from an unknown or
        # unauthorized user by time.
        time.sleep(max(0.0, self.settings.fail_delay - (time.monotonic() - since)))
        self._audit(record, self.started, "denied", reason + (f" ({detail})" if detail else ""))
        self._reply("denied", reason, retry=retry)

    def _audit(self, record: dict, started: float, outcome: str, reason: str | None = None,
               packets: int = 0, nbytes: int = 0) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        record.update(outcome=outcome, reason=reason, packets=packets, bytes=nbytes,
                      duration_s=round(time.monotonic() - started, 3),
                      cpu_s=round(ru.ru_utime + ru.ru_stime, 3))
        # Not cut short by SIGTERM or a hang-up: they arrive once the line is written.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
        try:
            self.audited = True
            self.audit.write(record)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _shown(self, text: str) -> str:
        """A message as the client and the audit show it: real paths, not /proc/self/fd."""
        for named in (*self.sets, *self.held):
            text = named.shown(text)
        return text

    def _extract(self, req: Request, shared_memory: bool, record: dict, started: float,
                 restrictions: tuple[GroupFilter, ...], allowed: str | None) -> None:
        """Stream the result through the engine, as the service account."""
        (self.preload or Preload()).wait()
        if os.geteuid() == 0:
            self.conn.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SEND_BUFFER)

        from ..engine import RequestRun
        from ..flowplan import Stats
        from ..outfile import ClosedPipe, OutputError
        from .framed import ConnectionOutput
        from .shared import SharedSlots

        stats = Stats()
        warn = self._warner(stats.warnings)
        sources = self._sources(req, record, started, allowed)
        if sources is None:
            return
        try:
            run = RequestRun(req, sources, stats, warn)
        except PcapVaultError as e:
            self._refuse(record, started, e)
            return
        self._stall_bounded()
        self._reply("ok")
        files: list[tuple[str, int]] = []
        try:
            if allowed is not None:
                # Said, so that an analyst who finds fewer packets than expected knows why.
                groups = ", ".join(r.group for r in restrictions)
                warn(f"as a member of {groups} you may extract only packets matching {allowed}")
            if req.list_only:
                files = [(self._shown(f), n) for f, n in run.listing()]
                packets = sum(n for _, n in files)
                if hung_up(self.conn):
                    raise ClosedPipe()
            else:
                shared = None
                if shared_memory and len(sources) == 1:
                    try:
                        shared = SharedSlots(self.conn)
                    except OSError as e:
                        _log(f"no shared buffers ({e.strerror}); sending every byte")
                    else:
                        shared.offer()
                out = run.write(
                    lambda ifaces, **opts: ConnectionOutput(self.conn, ifaces, shared, **opts))
                packets = out.packets
        except (ClosedPipe, OutputError) as e:
            # EAGAIN: the client took nothing for --stall-timeout (_stall_bounded)
            gone = isinstance(e, ClosedPipe) or e.errno == errno.EAGAIN
            why = "the client stopped reading" if gone else str(e)
            self._audit(record, started, "error", f"{why}; result incomplete",
                        *_returned(run.out))
            return
        except (PcapVaultError, OSError) as e:
            msg = str(e) if isinstance(e, PcapVaultError) else f"{e.strerror}: {e.filename}"
            msg = self._shown(msg)
            outcome = "denied" if isinstance(e, RefusedPath) else "error"
            self._audit(record, started, outcome, msg, *_returned(run.out))
            self._trailer(stats, files, run.out, allowed, error=msg)
            return
        # Every packet is with the client (or in its socket) by now. Audit first: whoever
        # sees the end of the result can rely on the audit line being there.
        self._audit(record, started, "allowed", None, packets, _returned(run.out)[1])
        self._trailer(stats, files, run.out, allowed)

    def _stall_bounded(self) -> None:
        """A blocking socket (the engine writes with os.writev) on which a client that takes
        nothing, or acknowledges nothing, for --stall-timeout fails the send (EAGAIN): a
        result the client never reads must not hold this instance for ever."""
        self.conn.settimeout(None)
        sec = self.settings.stall
        stall = struct.pack("ll", int(sec), int(sec % 1 * 1_000_000))
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, stall)
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, stall)  # acknowledgements

    def _warner(self, kept: list[str]) -> Callable[[str], None]:
        """A warning for the client: sent at once (and kept, for the trailer's counts)."""
        from ..outfile import ClosedPipe

        def warn(msg: str) -> None:
            msg = self._shown(msg)
            kept.append(msg)
            try:
                wire.send(self.conn, wire.WARNING, msg.encode())
            except OSError:
                raise ClosedPipe() from None

        return warn

    def _sources(self, req: Request, record: dict, started: float, allowed: str | None
                 ) -> list | None:
        """As the service account: the dump sets held open, each with the filter this user
        may run (compiled under the CPU limit). None when refused (answered and audited)."""
        try:
            become(self.settings.account)
            for h in self.held:
                self.sets.append(h.open())
            return bounded(lambda: open_sources(req.dumpsets, self.sets, req.filter, allowed),
                           self.settings.filter_cpu, self.conn)
        except PcapVaultError as e:
            self._refuse(record, started, e)
        return None

    def _refuse(self, record: dict, started: float, e: PcapVaultError) -> None:
        """Answer and audit a request that cannot start: denied for a path outside what
        the service serves, else an error."""
        msg = self._shown(str(e))
        outcome = "denied" if isinstance(e, RefusedPath) else "error"
        self._audit(record, started, outcome, msg)
        self._reply(outcome, msg)

    def _table(self, req: Request, record: dict, started: float,
               restrictions: tuple[GroupFilter, ...], allowed: str | None) -> None:
        """npcapflows through the service: the window's table from the indexes, over the
        filter this user may run, sent as JSON in DATA frames, then the trailer."""
        (self.preload or Preload()).wait()
        from ..conversations import conversations
        from ..outfile import ClosedPipe

        warnings: list[str] = []
        warn = self._warner(warnings)
        if self._sources(req, record, started, allowed) is None:
            return
        self._stall_bounded()
        self._reply("ok")
        gone = "the client stopped reading; result incomplete"
        try:
            if allowed is not None:
                groups = ", ".join(r.group for r in restrictions)
                warn(f"as a member of {groups} your tables hold only packets matching {allowed}")
            q = Request(req.dumpsets, req.begin_ns, req.end_ns,
                        effective_filter(req.filter, allowed))
            table = conversations(q, req.table or "conversation", req.table_sort,
                                  req.table_limit, warn, sets=self.sets)
            body = json.dumps({**asdict(table), "warnings": warnings}).encode()
        except ClosedPipe:
            self._audit(record, started, "error", gone)
            return
        except (PcapVaultError, OSError) as e:
            msg = self._shown(str(e) if isinstance(e, PcapVaultError)
                              else f"{e.strerror}: {e.filename}")
            self._audit(record, started, "error", msg)
            self._send_trailer({"packets": 0, "bytes": 0, "stats": {}, "files": [],
                                "error": msg})
            return
        try:
            for i in range(0, len(body), TABLE_FRAME):
                wire.send(self.conn, wire.DATA, body[i : i + TABLE_FRAME])
        except OSError:  # gone, or took nothing for --stall-timeout (EAGAIN)
            self._audit(record, started, "error", gone)
            return
        self._audit(record, started, "allowed", None, table.packets, table.bytes)
        self._send_trailer({"packets": table.packets, "bytes": table.bytes, "stats": {},
                            "files": [], "error": None})

    def _trailer(self, stats: Stats, files: list[tuple[str, int]], out: ConnectionOutput | None,
                 allowed: str | None, error: str | None = None) -> None:
        """The end of the result (a client that has left misses nothing else).

        A restricted member gets only the count of what they were given: how many packets
        and bytes were read, or files considered, would tell about traffic outside their
        filter."""
        if allowed is None:
            counts = asdict(stats)
            counts.pop("warnings")
        else:  # and whether damage left records out: the exit status must say so
            counts = {"packets_matched": stats.packets_matched,
                      "incomplete": bool(stats.damaged_records or stats.damaged_files)}
        body = {
            "packets": out.packets if out else sum(n for _, n in files),
            "bytes": out.bytes if out else 0,
            "stats": counts,
            "files": files,
            "error": error,
        }
        self._send_trailer(body)

    def _send_trailer(self, body: dict) -> None:
        """The end of the result; the hang-up watch ends first (nothing is left to stop)."""
        if self.watch is not None:
            self.watch.close()
        try:
            wire.send_json(self.conn, wire.TRAILER, body)
        except OSError:
            pass


def _returned(out: ConnectionOutput | None) -> tuple[int, int]:
    """Packets and bytes that went to the client."""
    return (out.packets, out.sent) if out else (0, 0)


def _describe(req: Request) -> dict:
    """The request as the audit shows it (the password is not part of it)."""
    return {
        "dumpsets": req.dumpsets,
        "begin": format_time(req.begin_ns),
        "end": format_time(req.end_ns),
        "filter": req.filter,
        "options": req.chosen_options(),
    }


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  # systemd starts one per connection through systemd/npcapextract.socket
  systemctl enable --now npcapextract.socket
  systemd-socket-activate --accept -l /run/pcapvault/npcapextract.sock npcapextractd --group npcap
  npcapextract --service -t /var/lib/pcapvault/eth0 -b -15m -e now -f "host 10.0.0.5" -o x.pcap
  # members of group contractors extract only their own network's packets
  npcapextractd --group npcap --group-filter "contractors=net 10.20.0.0/16"
""",
)
@click.version_option(package_name="pcapvault", prog_name="npcapextractd")
@click.option("-u", "--user", "account", default="pcapvault", show_default=True,
              help="Account the extraction runs as once the client is authorized "
                   "(the dump sets' owner).")
@click.option("--group", default="npcap", show_default=True,
              help="Members of this group may extract.")
@click.option("--group-filter", "group_filters", multiple=True, metavar="GROUP=FILTER",
              help="Members of GROUP (who must also be in --group) extract only packets "
                   "matching FILTER: their own filter F runs as (FILTER) and (F). In several "
                   "such groups they get the union, (FILTER1) or (FILTER2). Repeat for more "
                   "groups; each FILTER is compiled at start.")
@click.option("--pam-service", default="npcapextract", show_default=True,
              help="PAM service name (/etc/pam.d/NAME).")
@click.option("--audit-log", type=click.Path(path_type=Path),
              default=Path("/var/log/pcapvault/audit.jsonl"), show_default=True,
              help="Append-only JSON-lines audit file, created 0640.")
@click.option("--allow", multiple=True, metavar="DIR",
              help="A dump set, or a directory of dump sets, that clients may name; repeat. "
                   "[default: /var/lib/pcapvault and the configured sensors' dump sets]")
@click.option("--max-attempts", type=click.IntRange(1, 10), default=3, show_default=True,
              help="Password attempts per connection.")
@click.option("--fail-delay", type=Number(0, 60), default=2.0, show_default=True,
              help="Seconds a failed attempt takes at least.")
@click.option("--timeout", type=Number(0.1, 3600), default=30.0, show_default=True,
              help="Seconds a client has to send its whole request, counted from the "
                   "connection (or from the answer to its previous attempt).")
@click.option("--filter-cpu-limit", "filter_cpu", type=Number(0.1, 3600),
              default=2.0, show_default=True,
              help="CPU seconds that compiling a client's filter may take; a longer one is "
                   "refused (libpcap's optimiser grows about cubically with the number of "
                   "terms).")
@click.option("--stall-timeout", "stall", type=Number(1, 3600),
              default=STALL_SECONDS, show_default=True,
              help="Seconds a client may take nothing of its result before the instance "
                   "drops it (audited as incomplete).")
def command(account: str, group: str, group_filters: tuple[str, ...], pam_service: str,
            audit_log: Path, allow: tuple[str, ...], max_attempts: int, fail_delay: float,
            timeout: float, filter_cpu: float, stall: float) -> int:
    """Serve one authenticated extraction on the connection systemd passes as fd 3.

    Started by npcapextract.socket (Accept=yes) for every client of `npcapextract --service`;
    not meant to be run by hand.
    """
    try:
        filters = parse_group_filters(group_filters)
    except click.BadParameter:
        # Fail closed, before the connection is even looked at; the client still learns why.
        try:
            _refuse(activation_socket(), "the extraction service is misconfigured; ask the "
                                         "administrator")
        except ServiceError:
            pass  # run by hand: the one-line error is all there is to say
        raise
    conn = activation_socket()
    settings = Settings(account, group, filters, pam_service, audit_log,
                        allow or default_allow(), max_attempts, fail_delay, timeout, filter_cpu,
                        stall)
    try:
        audit = Audit(audit_log, PROG)
    except (ServiceError, AuditLogError):
        # Fail closed: without an audit trail nobody gets packets.
        _refuse(conn, "the extraction service cannot write its audit log; ask the "
                      "administrator")
        raise
    session = Session(conn, settings, audit)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        session.run()
    except (Exception, Terminated, ClientGone) as e:  # noqa: BLE001 - no traceback, no silent attempt
        session.interrupted(e)
        return 1
    return 0


_refused: list[socket.socket] = []  # drained at exit, once the journal has the reason


def _refuse(conn: socket.socket, message: str) -> None:
    """The answer to a client of an instance that cannot serve anyone."""
    try:
        wire.send_json(conn, wire.REPLY, {"status": "error", "message": message})
    except OSError:
        return
    _refused.append(conn)


def drain(conn: socket.socket) -> None:
    """After a last reply: read what the client still sends, for a while, so that closing
    does not reset the connection before it has read the reply (a Unix socket closed with
    unread data makes the peer's reads fail with ECONNRESET)."""
    try:
        conn.shutdown(socket.SHUT_WR)
        until = time.monotonic() + DRAIN_SECONDS
        while (left := until - time.monotonic()) > 0:
            conn.settimeout(left)
            if not conn.recv(1 << 16):
                return
    except OSError:
        pass


class Terminated(BaseException):
    """SIGTERM (systemctl stop npcapextract.socket), raised where the session is."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main() -> None:
    """Entry point of npcapextract@.service."""
    from ..heap import keep_freed_memory

    keep_freed_memory()
    code: object = 0
    try:
        run(command, PROG, error_code=1)
    except SystemExit as e:
        code = e.code
    for conn in _refused:
        drain(conn)
    exit_now(code)

if __name__ == "__main__":
    main()
