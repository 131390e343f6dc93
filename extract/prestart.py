"""What npcapextract starts before it parses its command line, from a quick scan of argv.

Two things can start this early: the connection to the extraction service, when the command
line shows that the service will be needed, and otherwise the plan of a host query
(`plan_ahead`, see extract/hostquery.py), whose disk reads then overlap with the imports.

Why connect early: systemd starts a service instance when a client connects, and that instance's own
interpreter start and imports then overlap with this process importing click, parsing its
options and checking the dump sets, instead of following them (docs/BENCHMARKS.md, "PAM
service"). Nothing is sent on the early connection: the client (service/client.py) takes it
over once it has parsed and checked everything, and checks who is listening before it sends a
password. A connection left unused (a usage error, a dump set readable after all) closes with the
process; the service counts that as a client that gave up.

Only `os`, `socket`, `sys`, `threading` and the service package's socket path are imported
here, and the scan of the arguments
is a best effort: whatever it does not recognise simply means no early connection or plan.
The command (cli.py) takes what was started (`take`, `planned_ahead`) only for the very
request it parses itself.
"""

from __future__ import annotations

import os
import socket
import threading

from .service import SOCKET  # the default of --service-socket

__all__ = ["SOCKET", "connected", "plan_ahead", "planned_ahead", "preconnect", "take",
           "wait_planned"]

# Options whose value click takes from the next argument (or the same one: -tDIR, --x=V), as
# far as this scan needs to tell them apart; a value is never read as an option.
_VALUED = {
    "-t": "dumpset", "--dumpset": "dumpset", "-b": "begin", "--begin": "begin",
    "-e": "end", "--end": "end", "-f": "filter", "--filter": "filter",
    "--service-socket": "socket", "-o": "", "--output": "", "-s": "snaplen",
    "--snaplen": "snaplen", "-P": "split_mb", "--split-mb": "split_mb", "-N": "split_packets",
    "--split-packets": "split_packets", "--max-bytes": "max_bytes",
    "--max-packets": "max_packets",
}
_SHAPING = ("snaplen", "split_mb", "split_packets", "max_bytes", "max_packets")

_held: dict[str, socket.socket] = {}
_ahead: tuple[threading.Thread, list] | None = None


def preconnect(argv: list[str]) -> None:
    """Connect to the service now if these arguments will need it (--service, or a dump set
    this user may not read); never fails."""
    args = _scan(argv)
    forced = bool(args.get("service"))
    path = (args.get("socket") or [SOCKET])[-1]
    if not forced and not any(not os.access(d, os.R_OK | os.X_OK) for d in args["dumpset"]):
        return
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return
    _held[path] = sock


def connected() -> bool:
    """Whether preconnect made a connection (then there is no host query to plan)."""
    return bool(_held)


def take(path: str) -> socket.socket | None:
    """The early connection to `path`, if there is one (once)."""
    return _held.pop(path, None)


def plan_ahead(argv: list[str]) -> None:
    """Start planning a host query (extract/hostquery.py) on a thread, for one dump set and a
    window: its imports and index reads, then the disk reading the packets, overlap with
    click's import and everything the command does before it asks for the plan
    (`planned_ahead`). Nothing is decided here: the command uses the plan only for the very
    request it parses itself, and reports every error itself."""
    global _ahead
    args = _scan(argv)
    dumpsets, begin, end = args["dumpset"], args.get("begin"), args.get("end")
    if not begin or not end:
        return
    expr = (args.get("filter") or [""])[-1]
    box: list = []

    def work() -> None:
        try:
            from pcapvault.index.times import parse_window

            from .hostquery import applies, plan
            from .request import Request

            if not applies(dumpsets, pcapng="pcapng" in args,
                           **{k: args[k] for k in _SHAPING if k in args}):
                return
            b, e = parse_window(begin[-1], end[-1])
            req = Request([dumpsets[0]], b, e, expr)
            box.append((req, plan(req)))
        except Exception:
            pass

    t = threading.Thread(target=work, name="plan-ahead", daemon=True)
    _ahead = (t, box)
    t.start()


def wait_planned() -> None:
    if _ahead is not None:
        _ahead[0].join()


def planned_ahead() -> tuple | None:
    """(request, plan or None) from plan_ahead, waiting for it; None if nothing was planned
    (once)."""
    global _ahead
    ahead, _ahead = _ahead, None
    if ahead is None:
        return None
    t, box = ahead
    t.join()
    return box[0] if box else None


def _scan(argv: list[str]) -> dict[str, list[str]]:
    """The values of -t, -b, -e, -f, --service-socket and the output-shaping options (as
    lists, in order) and whether --service or --pcapng was given, as click will read them; a
    best effort."""
    out: dict[str, list[str]] = {"dumpset": []}
    it = iter(argv)
    for arg in it:
        if arg == "--":
            break
        if arg in ("--service", "--pcapng"):
            out[arg[2:]] = ["1"]
            continue
        name, eq, value = arg.partition("=")
        if arg.startswith("--") and eq and name in _VALUED:
            key = _VALUED[name]
        elif arg in _VALUED:
            key = _VALUED[arg]
            value = next(it, None)
            if value is None:
                break
        elif arg[:2] in _VALUED and not arg.startswith("--"):
            key, value = _VALUED[arg[:2]], arg[2:]
        else:
            continue
        if key:
            out.setdefault(key, []).append(value)
    return out
