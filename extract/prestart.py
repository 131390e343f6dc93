"""What npcapextract starts before it parses its command line: the connection to the
extraction service, from a quick scan of argv.

Why connect early: systemd starts a service instance when a client connects, and that
instance's own interpreter start and imports then overlap with this process importing click,
parsing its options and checking the dump sets, instead of following them (docs/BENCHMARKS.md,
"PAM service"). Nothing is sent on the early connection: the client (service/client.py) takes
it over once it has parsed and checked everything, and checks who is listening before it
sends a password. A connection left unused (a usage error, a dump set readable after all)
closes with the process; the service counts that as a client that gave up.

Only `os`, `socket` and the service package's socket path are imported here, and the scan of
the arguments is a best effort: whatever it does not recognise simply means no early
connection. (Planning a host query here too, before click loads, no longer paid for itself:
docs/BENCHMARKS.md, S1.)
"""

from __future__ import annotations

import os
import socket

from .service import SOCKET  # the default of --service-socket

__all__ = ["SOCKET", "preconnect", "take"]

# Options whose value click takes from the next argument (or the same one: -tDIR, --x=V), as
# far as this scan needs to tell them apart; a value is never read as an option.
_VALUED = {
    "-t": "dumpset", "--dumpset": "dumpset", "--service-socket": "socket",
    **dict.fromkeys(("-b", "--begin", "-e", "--end", "-f", "--filter", "-o", "--output", "-s",
                     "--snaplen", "-P", "--split-mb", "-N", "--split-packets", "--max-bytes",
                     "--max-packets"), ""),
}

_held: dict[str, socket.socket] = {}


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



def take(path: str) -> socket.socket | None:
    """The early connection to `path`, if there is one (once)."""
    return _held.pop(path, None)





def _scan(argv: list[str]) -> dict[str, list[str]]:
    """The values of -t and --service-socket (as lists, in order) and whether --service was
    given, as click will read them (the values of other options are skipped); a best effort."""
    out: dict[str, list[str]] = {"dumpset": []}
    it = iter(argv)
    for arg in it:
        if arg == "--":
            break
        if arg == "--service":
            out["service"] = ["1"]
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
