"""One way for every command to fail: a single line on stderr and a documented exit code.

click prints usage errors over several lines with a usage banner; operators grep logs and
scripts test exit codes, so every tool runs its click command through `run` instead.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pcapvault.index.errors import PcapVaultError

if TYPE_CHECKING:
    import click

# click is imported where it is used: `exit_now` serves npcapextract's entry point, which must
# reach its early connection to the service before click loads (docs/BENCHMARKS.md, PAM
# service).

EXIT_USAGE = 2


def fail(prog: str, message: str, code: int) -> None:
    """Print `prog: error: message` on one line and exit."""
    import click

    one_line = " ".join(str(message).split())
    click.echo(f"{prog}: error: {one_line}", err=True)
    sys.exit(code)


def run(
    command: click.Command, prog: str, *, error_code: int = 1, args: list[str] | None = None
) -> None:
    """Run a click command; map every expected failure to one line and an exit code.

    Usage errors exit 2; PcapVaultError and OSError exit `error_code`; a closed output pipe
    (`| head`) exits quietly, as tcpdump does.
    """
    import click

    hold_standard_fds()
    try:
        rc = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        sys.exit(130)
    except click.UsageError as e:
        fail(prog, f"{e.format_message()} (see {prog} --help)", EXIT_USAGE)
    except click.ClickException as e:
        fail(prog, e.format_message(), e.exit_code)
    except PcapVaultError as e:
        fail(prog, str(e), error_code)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except PermissionError as e:
        fail(prog, f"permission denied: {e.filename or e}", error_code)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        fail(prog, f"{e.strerror or e}{where}", error_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


def hold_standard_fds() -> None:
    """Put /dev/null, read-only, on any of fds 0 to 2 the command was started without
    (`>&-`): else the next file or socket opened takes that number, and what is meant for
    stdout goes into it (a pcap into the extraction service's connection). Read-only, so a
    write meant for a closed stdout still fails, as it would have."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, os.O_RDONLY) != fd:  # the lowest free number: this one
                raise RuntimeError(f"fd {fd} taken while the standard fds were held") from None


def printable(text: str) -> str:
    """`text` with each non-printable character shown as an escape (\\n, \\x1b): what others
    wrote into a file (a hold's reason) cannot add lines to a listing or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, as in a URL or --listen) stays on this machine:
    where plain HTTP, and the credentials in it, may go."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quiet_broken_pipe() -> None:
    # Python would complain again when flushing stdout at exit; point it at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
    except OSError:
        pass
    sys.exit(0)


def exit_now(code: object) -> None:
    """Exit without the interpreter's teardown, once stdout and stderr are flushed.

    Undoing the imports of a run is a noticeable share of a host query's time
    (docs/BENCHMARKS.md, S1 and D5); and threads still blocked in C (a filter compilation past its
    CPU limit in the extraction service) cannot delay the exit. Callers have closed every
    file they wrote and registered no atexit work."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else int(code)  # type: ignore[call-overload]
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started without that fd
                stream.flush()
        except (OSError, ValueError):
            pass  # a reader that left: the command has already reported how it ended
    os._exit(status)
