"""npcapextract's entry point: connect to the extraction service before anything else loads,
when the command line shows that the service will be needed.

Why: systemd starts a service instance when a client connects, and that instance's own
interpreter start and imports (about 0.1 s) then overlap with this process importing click,
parsing its options and checking the dump sets, instead of following them: the fixed cost of
an extraction through the service (docs/BENCHMARKS.md, "PAM service"). Nothing is sent on the
early connection: the client (client.py) takes it over once it has parsed and checked
everything, and checks who is listening before it sends a password. A connection left unused
(a usage error, a dump set readable after all) closes with the process; the service counts
that as a client that gave up.

Only `os`, `socket` and `sys` are imported here, and the scan of the arguments is a best
effort: whatever it does not recognise simply means no early connection.
"""

from __future__ import annotations

import os
import socket
import sys

SOCKET = "/run/pcapvault/npcapextract.sock"  # the default of --service-socket

_held: dict[str, socket.socket] = {}


def main() -> None:
    """The npcapextract command."""
    preconnect(sys.argv[1:])
    from .cli import main as cli_main

    cli_main()


def preconnect(argv: list[str]) -> None:
    """Connect to the service now if these arguments will need it (--service, or a dump set
    this user may not read); never fails."""
    dumpsets, forced, path = _scan(argv)
    if not forced and not any(not os.access(d, os.R_OK | os.X_OK) for d in dumpsets):
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


def _scan(argv: list[str]) -> tuple[list[str], bool, str]:
    """The -t/--dumpset values, --service, and --service-socket, as click will read them.
    Other options' values are not skipped: none of them can look like these."""
    dumpsets: list[str] = []
    forced = False
    path = SOCKET
    it = iter(argv)
    for arg in it:
        if arg == "--":
            break
        if arg == "--service":
            forced = True
        elif arg in ("-t", "--dumpset", "--service-socket"):
            value = next(it, None)
            if value is None:
                break
            if arg == "--service-socket":
                path = value
            else:
                dumpsets.append(value)
        elif arg.startswith("--dumpset="):
            dumpsets.append(arg.partition("=")[2])
        elif arg.startswith("--service-socket="):
            path = arg.partition("=")[2]
        elif arg.startswith("-t") and not arg.startswith("--"):
            dumpsets.append(arg[2:])
    return dumpsets, forced, path


if __name__ == "__main__":
    # Run as `python -m`, this file is __main__: hand over to the module the client imports,
    # or the connection would be held where the client does not look.
    from pcapvault.extract.early import main as canonical_main

    canonical_main()
