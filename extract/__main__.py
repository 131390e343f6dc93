"""npcapextract's entry point (also `python -m pcapvault.extract`): start what the command
will wait for (prestart.py) before click and the rest load, then run the command."""

from __future__ import annotations

import sys

from pcapvault.index.cliutil import exit_now

from . import prestart


def main() -> None:
    """The npcapextract command."""
    prestart.preconnect(sys.argv[1:])
    if not prestart.connected():
        prestart.plan_ahead(sys.argv[1:])
        # Planning is mostly Python and holds the GIL; importing click beside it would only
        # delay the moment the packets' reads start. Once planned, those reads run in the
        # kernel (the read-ahead thread waits there) while click imports.
        prestart.wait_planned()
    from .cli import main as cli_main

    try:
        cli_main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


if __name__ == "__main__":
    main()
