"""npcapextract's entry point (also `python -m pcapvault.extract`): connect to the extraction
service early when it will be needed (prestart.py), run the command, and exit without the
interpreter's teardown (docs/BENCHMARKS.md, S1)."""

from __future__ import annotations

import sys

from pcapvault.index.cliutil import exit_now, hold_standard_fds

from . import prestart


def main() -> None:
    """The npcapextract command."""
    hold_standard_fds()  # before the early connection takes a number
    prestart.preconnect(sys.argv[1:])
    from .cli import main as cli_main

    try:
        cli_main()
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


if __name__ == "__main__":
    main()
