"""npcapserve: the command line, and the start-up from root to the service account.

systemd starts it as root (npcapserve.service). What needs root happens first, in this order:
the group filters are checked, the audit log is opened (the same file as npcapextractd's),
the PAM checker is forked (the small root process that only answers whether a password is
valid, server/auth.py), the listening socket is bound and the TLS key is read. Then the
process becomes the service account for good and only then serves requests, on uvicorn's
event loop (Starlette streams a multi-GB pcap from a pipe without holding it, and is small).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pcapvault.index.clitypes import Number
from pcapvault.index.cliutil import EXIT_USAGE, fail, is_loopback, run
from pcapvault.index.config import expand_config_args
from pcapvault.index.errors import PcapVaultError

if TYPE_CHECKING:
    from .auth import Gate

PROG = "npcapserve"
DEFAULT_PORT = 8443

EPILOG = """\b
Examples:
  npcapserve /etc/pcapvault/npcapserve.conf          # options from a file, as the unit does
  npcapserve --tls-cert /etc/pcapvault/tls/cert.pem --tls-key /etc/pcapvault/tls/key.pem
  npcapserve --listen 127.0.0.1 --port 8080 -t /var/lib/pcapvault/eth0   # plain HTTP, local
  npcapserve token create alice                       # an API token for alice's scripts
  curl --cacert cert.pem -u alice -OJ \\
      "https://sensor:8443/api/v1/pcap?begin=-15m&end=now&filter=host%2010.0.0.5"

\b
Plain HTTP is served only on a loopback address; anywhere else give --tls-cert and --tls-key.
Without -t it serves the dump sets configured in /etc/pcapvault (as npcapextract).
"""


def protocol(request_timeout: float, send_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with the deadlines uvicorn lacks.

    uvicorn closes an idle connection only once it has answered on it, and waits for ever
    for a request's body and for a client to take an answer, so a slow or silent client
    would hold one of --max-connections for ever (slowloris; a Content-Length whose body
    never comes; requests pipelined by a client that never reads the answers). So:
    - a whole request, head and body, must arrive within `request_timeout` of the connection
      or of the previous response;
    - a connection whose client takes nothing for `send_timeout` while the server waits to
      send (the transport paused for writing, or closing with data or TLS's closing
      handshake still to go) is cut: no byte acknowledged by the client's kernel in that
      time. A client that takes its answer, however slowly (a long pcap download), goes on.
    It also answers above `max_connections` (uvicorn's rule: the connections, this one
    included, or the requests in progress) with the JSON 503 every other error has, where
    uvicorn's limit_concurrency answers plain text."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .app import error_response

    busy = error_response(503, f"more than {max_connections} connections at once; try again "
                               "shortly", {"Connection": "close"})

    class Protocol(H11Protocol):
        _request_timer: asyncio.TimerHandle | None = None
        _send_timer: asyncio.TimerHandle | None = None
        _acked = -1
        _lost = False

        def _waiting(self) -> bool:
            """No whole request in hand: none yet, its answer done, or its body to come."""
            cycle = self.cycle
            return cycle is None or cycle.response_complete or cycle.more_body

        def _arm(self) -> None:
            self._disarm()
            if self._lost:
                return
            self._request_timer = self.loop.call_later(request_timeout, self._expired)

        def _disarm(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None

        def _expired(self) -> None:
            self._request_timer = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()
                self._watch()

        def _watch(self) -> None:
            """Cut the connection if the client takes nothing for `send_timeout`."""
            if self._send_timer is None and not self._lost:
                self._acked = _bytes_acked(self.transport)
                self._send_timer = self.loop.call_later(send_timeout, self._stalled)

        def _unwatch(self) -> None:
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = None

        def _stalled(self) -> None:
            self._send_timer = None
            if not (self.flow.write_paused or self.transport.is_closing()):
                return
            acked = _bytes_acked(self.transport)
            if acked >= 0 and acked != self._acked:  # the client takes it, slowly
                self._watch()
                return
            self.transport.abort()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._app = self.app
            self._arm()

        def handle_events(self) -> None:
            full = max(len(self.connections), len(self.tasks)) >= max_connections
            self.app = busy if full else self._app  # what the next request's cycle runs
            super().handle_events()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._waiting():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():  # Connection: close, or a 503
                self._watch()
            else:
                self._arm()

        def timeout_keep_alive_handler(self) -> None:
            super().timeout_keep_alive_handler()
            self._watch()

        def pause_writing(self) -> None:
            super().pause_writing()
            self._watch()

        def resume_writing(self) -> None:
            super().resume_writing()
            if not self.transport.is_closing():
                self._unwatch()

        def shutdown(self) -> None:
            """uvicorn's, but a connection already closing is left to close (and to its
            watch): asyncio's TLS transport closed a second time lets go of the connection,
            which nothing could then end."""
            if not self.transport.is_closing():
                super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._lost = True  # uvicorn's own timers and callbacks may still call
            self._disarm()
            self._unwatch()
            super().connection_lost(exc)

    return Protocol


def _bytes_acked(transport: asyncio.BaseTransport) -> int:
    """The bytes the peer has acknowledged on the connection (Linux's TCP_INFO
    tcpi_bytes_acked): progress that the transport's buffer, drained in bursts of a whole
    answer chunk, does not show. -1 when unknown."""
    try:
        sock = transport.get_extra_info("socket")
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192)
    except (AttributeError, OSError):
        return -1
    return int.from_bytes(info[120:128], sys.byteorder) if len(info) >= 128 else -1


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound as root (a port below 1024 needs it).

    Its connections must have TCP_NODELAY: a response goes out as a head and a body, and
    with Nagle's algorithm the body waits for the ACK of the head, which the client delays
    (40 ms on Linux) - most of a small request's time. asyncio sets it only on sockets
    whose protocol is IPPROTO_TCP, and a connection inherits it from this socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PcapVaultError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.version_option(package_name="pcapvault", prog_name=PROG)
@click.option("-t", "--dumpset", "dumpsets", multiple=True, metavar="DIR",
              help="Dump set to serve; repeat for several interfaces. Default: the sensor's "
                   "dump sets configured in /etc/pcapvault.")
@click.option("--listen", default="0.0.0.0", show_default=True, metavar="ADDRESS",
              help="Address to listen on (plain HTTP only on a loopback address).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port (0: any free port, said on stderr).")
@click.option("--tls-cert", type=click.Path(path_type=Path), metavar="FILE",
              help="TLS certificate chain (PEM).")
@click.option("--tls-key", type=click.Path(path_type=Path), metavar="FILE",
              help="TLS private key (PEM), read as root before the privilege drop.")
@click.option("-u", "--user", "account", default="pcapvault", show_default=True,
              help="Account that serves requests once the start-up is done (the dump sets' "
                   "owner).")
@click.option("--group", default="npcap", show_default=True,
              help="Members of this group may use the API.")
@click.option("--group-filter", "group_filters", multiple=True, metavar="GROUP=FILTER",
              help="Members of GROUP get only what FILTER selects (packets, conversations, "
                   "volume), as with npcapextractd. Repeatable.")
@click.option("--pam-service", default="npcapextract", show_default=True,
              help="PAM service name (/etc/pam.d/NAME).")
@click.option("--audit-log", type=click.Path(path_type=Path),
              default=Path("/var/log/pcapvault/audit.jsonl"), show_default=True,
              help="Append-only JSON-lines audit file (npcapextractd's).")
@click.option("--tokens", "token_file", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/var/lib/pcapvault/npcapserve/tokens"), show_default=True,
              help="The API token store (npcapserve token --help).")
@click.option("--fail-delay", type=Number(0, 60), default=1.0, show_default=True,
              help="Seconds a failed login takes at least.")
@click.option("--metrics-auth", is_flag=True,
              help="Ask for a login on /metrics and /api/v1/status too.")
@click.option("--filter-cpu-limit", "filter_cpu", type=Number(0.1, 60),
              default=2.0, show_default=True,
              help="CPU seconds compiling a client's filter may take; a longer one gets 400.")
@click.option("--max-connections", type=click.IntRange(1, 10000), default=100,
              show_default=True,
              help="Connections served at once; more are answered 503.")
@click.option("--keep-alive", type=click.IntRange(1, 300), default=5, show_default=True,
              help="Seconds an idle connection stays open.")
@click.option("--request-timeout", type=Number(0.1, 300), default=10.0,
              show_default=True,
              help="Seconds a client has to send a whole request (head and body), from the "
                   "connection or from the previous response.")
@click.option("--send-timeout", type=Number(0.1, 3600), default=60.0,
              show_default=True,
              help="Seconds a connection may wait on a client that takes none of its answer "
                   "before it is cut (a slow download that progresses goes on).")
@click.option("--max-rows", type=click.IntRange(1, 10**6), default=10000, show_default=True,
              help="The largest limit= of /api/v1/conversations.")
@click.option("--max-steps", type=click.IntRange(1, 10**6), default=10000, show_default=True,
              help="The most steps /api/v1/volume answers.")
@click.option("--session-idle", type=Number(1, 7 * 86400), default=1800,
              show_default=True,
              help="Seconds a web page login lasts without use (then the page asks again).")
@click.option("--index-workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Worker processes computing conversations and volume (each takes a core "
                   "while it works; more serve more of them at once).")
def command(dumpsets: tuple[str, ...], listen: str, port: int, tls_cert: Path | None,
            tls_key: Path | None, account: str, group: str, group_filters: tuple[str, ...],
            pam_service: str, audit_log: Path, token_file: Path, fail_delay: float,
            metrics_auth: bool,
            filter_cpu: float, max_connections: int, keep_alive: int,
            request_timeout: float, send_timeout: float, max_rows: int, max_steps: int,
            session_idle: float, index_workers: int) -> int:
    """Serve the sensor's packets, conversations, traffic volume, status and metrics over
    HTTPS, to members of the extractors' group (PAM password or API token)."""
    import uvicorn

    from pcapvault.extract.service.policy import Audit, parse_group_filters

    from . import filtercheck
    from .app import MAX_HEAD_BYTES, ServeSettings, create_app
    from .workers import IndexWorkers

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    if tls_cert is None and not is_loopback(listen):
        raise click.UsageError(
            f"plain HTTP only on a loopback address: give --tls-cert and --tls-key to listen "
            f"on {listen}")
    for what, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise click.UsageError(f"{what} {path}: no such file")
    filters = parse_group_filters(group_filters)
    from pcapvault.extract.cli import configured_dumpsets  # npcapextract's default, shared

    served = served_roots(dumpsets or configured_dumpsets())
    audit = Audit(audit_log, PROG)
    gate = _gate(pam_service, token_file, fail_delay, group, filters, session_idle)
    workers = IndexWorkers(index_workers)
    sock = bind(listen, port)
    config = uvicorn.Config(
        create_app(ServeSettings(served, pam_service, filter_cpu, metrics_auth, max_rows,
                            max_steps), gate, audit, workers.conversations, workers.volume),
        ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_keep_alive=keep_alive,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        http=protocol(request_timeout, send_timeout, max_connections), loop="asyncio",
        lifespan="off", access_log=False, server_header=False, log_level="warning",
        proxy_headers=False, timeout_graceful_shutdown=10)
    try:
        config.load()  # reads the TLS key, as root
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise PcapVaultError(f"cannot load the TLS certificate or key: {e}") from None
    _become(account)
    filtercheck.start()
    workers.start()
    _preload()
    host, bound = sock.getsockname()[:2]
    scheme = "https" if tls_cert else "http"
    print(f"{PROG}: serving {', '.join(served)} on {scheme}://{_hostport(host, bound)}",
          file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        workers.stop()
    return 0


def served_roots(paths: tuple[str, ...]) -> tuple[str, ...]:
    """The dump sets to serve, each named by its root as /api/v1/status shows it, so that a
    `dumpset=` copied from there chooses it: `-t DIR/timeline` is DIR (and given twice, one).
    A path that opens no dump set yet (the recorder has not started) stays as given; its
    status says what is wrong."""
    from pcapvault.index.dumpset import DumpSet

    roots: dict[str, None] = {}
    for p in paths:
        try:
            root = str(DumpSet.open(p).root)
        except (PcapVaultError, OSError):
            root = os.path.abspath(p)
        roots[root] = None
    return tuple(roots)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _gate(pam_service: str, token_file: Path, fail_delay: float, group: str,
          filters: tuple, session_idle: float) -> Gate:
    """The authentication gate (server/auth.py): the root PAM helper is forked here."""
    from .auth import Gate, PasswordChecker
    from .limits import LoginLimiter
    from .session import SessionStore
    from .tokens import TokenStore

    checker = PasswordChecker.start(pam_service)
    return Gate(checker, TokenStore(token_file), group, filters,
                LoginLimiter(fail_delay=fail_delay), SessionStore(idle=session_idle))




def _become(account: str) -> None:
    """Become the service account for good (nothing is served as root)."""
    if os.geteuid() != 0:
        return
    from pcapvault.index.privileges import drop_to, lookup

    drop_to(lookup(account))
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PcapVaultError("could not give up root")


def _preload() -> None:
    """The engine's modules and libpcap before the first request (and before any request
    could find the interpreter's tree unreadable to the service account)."""
    from pcapvault.extract import engine, flowmatch, flowplan, output  # noqa: F401
    from pcapvault.index.libpcap import lib

    lib()


def main(argv: list[str] | None = None) -> None:
    """Entry point of npcapserve.service: `npcapserve [CONF] [options]` or
    `npcapserve token ...`. Errors are one line: 2 for usage, 1 at run time."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "token":
        from .tokens import token_cli

        run(token_cli, f"{PROG} token", error_code=1, args=args[1:])
        return
    try:
        args = expand_config_args(args, command)
    except PcapVaultError as e:
        fail(PROG, str(e), EXIT_USAGE)
    run(command, PROG, error_code=1, args=args)


if __name__ == "__main__":
    main()
