"""npcapextract: packets of a time window and a tcpdump filter out of one or more dump sets."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from pcapvault.index.errors import PcapVaultError
from pcapvault.index.sizes import SizeError, parse_size

from . import prestart

if TYPE_CHECKING:
    from .request import Request

EPILOG = """\b
Examples:
  npcapextract -t /var/lib/pcapvault/eth0 -b "2025-11-21 14:00:00" -e "2025-11-21 14:10:00" \\
      -f "host 10.0.0.5 and port 443" -o incident.pcap
  npcapextract -b -15m -e now -f "net 192.168.1.0/24" -o - | tcpdump -r - -n
  npcapextract -t eth0-ds -t eth1-ds --pcapng -b -1h -e now -f icmp -o both.pcapng

\b
Times: 'YYYY-MM-DD hh:mm:ss[.fraction]' (local time, as n2disk), ISO 8601 with Z or an
offset, epoch seconds (1763737200.25), or relative: now, -15m, -2h, -30s, -1d.
BEGIN is inclusive, END exclusive. A local time the clocks skip or repeat at a daylight
saving change is refused with the times it can mean: add the UTC offset (+01:00) to say
which.

\b
Exit status:
  0  packets were written (with -l: matching files were listed)
  1  no packet matched
  2  usage error, bad filter or time, unusable dump set, no permission
  3  incomplete: damaged records or files were skipped (warnings name them); what was
     written is a readable capture
"""

class Size(click.ParamType):
    """A byte count with an optional K/M/G/T suffix (powers of 1024; index/sizes.py)."""

    name = "size"

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value), param.opts[0] if param else "size")
        except SizeError as e:
            self.fail(str(e), param, ctx)


def _err(msg: str) -> None:
    click.echo(f"npcapextract: {msg}", err=True)


class _Bar:
    """A one-line progress display on a terminal's stderr."""

    def __init__(self) -> None:
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and done < total:
            return
        self.last = now
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} files")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def _permission_remedy(command: Callable[..., int]) -> Callable[..., int]:
    """A file the user may not read anywhere in the dump set gets the message with the remedy.

    (cliutil.run would only say "permission denied".)
    """

    @functools.wraps(command)
    def guarded(*args: object, **kwargs: object) -> int:
        try:
            return command(*args, **kwargs)
        except PermissionError as e:
            raise PcapVaultError(
                f"no permission to read {e.filename or 'the dump set'}: run as a user who may "
                "read the dump set"
            ) from None

    return guarded


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.version_option(package_name="pcapvault", prog_name="npcapextract")
@click.option(
    "-t", "--dumpset", "dumpsets", multiple=True, metavar="DIR",
    help="Dump set directory (recorder -o) or its timeline; repeat for several interfaces. "
    "Default: the sensor's dump sets configured in /etc/pcapvault.",
)
@click.option("-b", "--begin", required=True, help="Start of the window (inclusive).")
@click.option("-e", "--end", required=True, help="End of the window (exclusive).")
@click.option("-f", "--filter", "expr", default="", help="tcpdump filter expression (libpcap).")
@click.option(
    "-o", "--output", metavar="FILE", help="Output pcap, '-' for stdout; a directory with -P/-N."
)
@click.option("-O", "stdout", is_flag=True, help="Write to stdout (same as -o -).")
@click.option("--pcapng", is_flag=True, help="Write pcapng with one interface per dump set.")
@click.option("-s", "--snaplen", type=click.IntRange(min=1), help="Slice packets to N bytes.")
@click.option("-P", "--split-mb", type=click.IntRange(min=1), help="Split into files of N MiB.")
@click.option("-N", "--split-packets", type=click.IntRange(min=1), help="Split every N packets.")
@click.option("-l", "--list", "list_only", is_flag=True, help="List the matching pcap files only.")
@click.option("-0", "empty", is_flag=True, help="Write an empty capture when nothing matches.")
@click.option("--max-bytes", type=Size(), help="Stop after this much output (e.g. 500M).")
@click.option("--max-packets", type=click.IntRange(min=1), help="Stop after N packets.")
@click.option("-v", "--verbose", is_flag=True, help="Print a summary on stderr.")
@click.option("--service", "use_service", is_flag=True,
              help="Extract through the authenticated extraction service (chosen by itself "
              "when a dump set is not readable).")
@click.option("--password-stdin", is_flag=True,
              help="Read the service password from the first line of stdin (for scripts).")
@click.option("--service-socket", default=prestart.SOCKET, metavar="PATH",
              show_default=True, help="The extraction service's socket.")
@_permission_remedy
def cli(
    dumpsets: tuple[str, ...],
    begin: str,
    end: str,
    expr: str,
    output: str | None,
    stdout: bool,
    pcapng: bool,
    snaplen: int | None,
    split_mb: int | None,
    split_packets: int | None,
    list_only: bool,
    empty: bool,
    max_bytes: int | None,
    max_packets: int | None,
    verbose: bool,
    use_service: bool,
    password_stdin: bool,
    service_socket: str,
) -> int:
    """Extract the packets of [BEGIN, END) that match FILTER from pcapvault dump sets.

    The timeline picks the files of the window, the index skips files and packets that cannot
    match, and libpcap confirms every packet, so the result equals tcpdump's selection over
    the same files.
    """
    from pcapvault.index.times import parse_window

    from .request import Request
    from .service.client import run_remote, service_targets

    if stdout:
        if output not in (None, "-"):
            raise click.UsageError("-O and -o FILE contradict each other")
        output = "-"
    if output is None and not list_only:
        raise click.UsageError("give -o FILE, -o - or -O for stdout, or -l to list files")
    t0 = time.monotonic()

    def request(paths: tuple[str, ...]) -> Request:
        b_ns, e_ns = parse_window(begin, end)
        return Request([os.path.abspath(p) for p in paths], b_ns, e_ns, expr, pcapng, snaplen,
                       max_bytes, max_packets, split_mb << 20 if split_mb else None,
                       split_packets, empty, list_only)

    remote = service_targets(dumpsets, use_service)
    if remote:  # before the engine's imports: the service has its own
        run_remote(request(remote), socket_path=service_socket, password_stdin=password_stdin,
                   automatic=not use_service, output=output, verbose=verbose, t0=t0)
    from .postingsplan import applies
    from .readahead import warm_indexes

    req = request(dumpsets or configured_dumpsets())
    tried = applies(req)
    if tried:
        code = _host_query(req, output, verbose, t0)
        if code is not None:
            return code
    warm_indexes(req.dumpsets, req.begin_ns, req.end_ns)  # the disk works while numpy imports

    from .engine import RequestRun
    from .flowplan import Source, Stats
    from .output import Output

    stats = Stats(count_timeline=verbose)

    def warn(msg: str) -> None:
        stats.warnings.append(msg)
        _err(f"warning: {msg}")

    run = RequestRun(req, [Source(p, i, expr) for i, p in enumerate(req.dumpsets)], stats,
                     warn, postings=not tried)
    written = 0
    bytes_out = 0
    if list_only:
        for path, n in run.listing():
            click.echo(f"{path}\t{n}" if verbose else path)
            written += n
    else:
        bar = _Bar() if output != "-" and sys.stderr.isatty() else None
        try:
            run.write(lambda ifaces, **opts: Output(output, ifaces, **opts), bar)
        finally:
            if run.out is not None:
                run.out.close()
            if bar:
                bar.finish()
        written = run.out.packets
        bytes_out = run.out.bytes
    if verbose:
        _err(stats.line(written, bytes_out, time.monotonic() - t0))
    return stats.exit_status(written)


def _host_query(req: Request, output: str | None, verbose: bool, t0: float) -> int | None:
    """The query planned from the postings and answered without numpy (records.py), or None
    for the engine."""
    from .access import open_query
    from .postingsplan import plan
    from .records import run
    from .report import Stats

    pp = plan(open_query(req.dumpsets[0], req.filter), req.begin_ns, req.end_ns)
    if pp is None:
        return None
    res = run(pp, req.begin_ns, req.end_ns, output, req.empty, req.list_only,
              Stats(count_timeline=verbose))
    if res is None:
        return None
    for path, n in res.files:
        click.echo(f"{path}\t{n}" if verbose else path)
    if verbose:
        _err(res.stats.line(res.written, res.bytes_out, time.monotonic() - t0))
    return res.stats.exit_status(res.written)


def configured_dumpsets() -> tuple[str, ...]:
    """Without -t an analyst on the sensor means its own recorders' dump sets."""
    from pcapvault.index.config import config_dir, default_dumpsets

    found = tuple(str(p) for p in default_dumpsets())
    if not found:
        raise click.UsageError(
            f"no dump set given and none configured: pass -t DIR or configure {config_dir()} "
            "(dumpset= in pcapvault.conf or recorder-*.conf files)"
        )
    return found


def main(argv: list[str] | None = None) -> None:
    """Entry point: tools.cliutil.run turns every failure into one line and an exit status.

    Exit codes as documented: 0 written, 1 nothing matched, 2 for every error (usage, filter,
    time, dump set, permission), 3 incomplete (damage skipped). A reader that closes our
    stdout ends the run quietly.
    """
    from pcapvault.index.cliutil import run

    from .heap import keep_freed_memory

    keep_freed_memory()
    run(cli, "npcapextract", error_code=2, args=argv)


if __name__ == "__main__":
    main()
