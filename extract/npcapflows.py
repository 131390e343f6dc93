"""npcapflows: who talked to whom in a time window, from the dump sets' indexes.

The shell user's view of what npcapserve answers on /api/v1/conversations: the same library
call (conversations.py), printed as a table a person reads at a glance (like `ss` or
Wireshark's Conversations), or as JSON or CSV for scripts.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING

import click

from pcapvault.index.errors import PcapVaultError
from pcapvault.index.sizes import human_size

from .service import SOCKET

if TYPE_CHECKING:
    from .conversations import Table

PROG = "npcapflows"

EPILOG = """\b
Examples:
  npcapflows -t /var/lib/pcapvault/eth0 -b -1h -e now
  npcapflows -b "2025-11-21 14:00:00" -e "2025-11-21 14:10:00" -f "host 10.0.0.5" --by port
  npcapflows -b -15m -e now --by endpoint -n 0 --json | jq '.rows[0]'

\b
Times: as npcapextract takes them: 'YYYY-MM-DD hh:mm:ss[.fraction]' (local time), ISO 8601
with Z or an offset, epoch seconds, or relative: now, -15m, -2h, -30s, -1d.
BEGIN is inclusive, END exclusive.

\b
Tables (bytes are frame lengths on the wire; VLAN tags are not part of a conversation):
  conversation  address and port A <-> B, protocol, packets and bytes each way, start and
                duration; A is the source of the conversation's first packet in the window
  endpoint      per address: packets and bytes sent (tx) and received (rx)
  port          per service port (the lower port of each conversation): packets, bytes,
                conversations

\b
Counted from the indexes alone, without reading a pcap byte, unless the filter looks at
packet bytes the index does not hold (TCP flags, payload): then the packets it cannot decide
are read, and the totals line says so.

\b
A user who may not read a dump set is asked for their password and gets the table through
the PAM-gated extraction service (npcapextractd, as npcapextract does; --service to choose
it): a member of a --group-filter group gets only the traffic their filter allows.

\b
Exit status:
  0  the table was printed (even when empty)
  1  runtime failure: no permission to read a dump set, unreadable files, the service
     refused or is not available
  2  usage error: bad option, filter or time, a dump set that does not exist
"""


class _BadInput(click.ClickException):
    """Input the user can correct (filter, time, dump set path): exit 2."""

    exit_code = 2


def table_options(command: Callable) -> Callable:
    """The options that choose and print a table: --by, -n, --sort, --json (npcapflows and
    npcapfleet conversations)."""
    for option in reversed([
        click.option("--by", type=click.Choice(["conversation", "endpoint", "port"]),
                     default="conversation", show_default=True, help="Which table."),
        click.option("-n", "--limit", type=click.IntRange(min=0), default=20,
                     show_default=True, help="Rows to show, the largest first; 0 for all."),
        click.option("--sort", type=click.Choice(["bytes", "packets"]), default="bytes",
                     show_default=True, help="Order of the rows (descending)."),
        click.option("--json", "as_json", is_flag=True, help="Print the table as JSON."),
    ]):
        command = option(command)
    return command


@click.command(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.version_option(package_name="pcapvault", prog_name=PROG)
@click.option(
    "-t", "--dumpset", "dumpsets", multiple=True, metavar="DIR",
    help="Dump set directory (recorder -o); repeat for several interfaces (their traffic is "
    "summed). Default: the sensor's dump sets configured in /etc/pcapvault.",
)
@click.option("-b", "--begin", default="-1h", show_default=True,
              help="Start of the window (inclusive).")
@click.option("-e", "--end", default="now", show_default=True,
              help="End of the window (exclusive).")
@click.option("-f", "--filter", "expr", default="", help="tcpdump filter expression (libpcap).")
@table_options
@click.option("--csv", "as_csv", is_flag=True, help="Print the rows as CSV with a header line.")
@click.option("--service", "use_service", is_flag=True,
              help="Ask the authenticated extraction service (chosen by itself when this user "
                   "cannot read a dump set), as npcapextract --service.")
@click.option("--password-stdin", is_flag=True,
              help="Read the service password from the first line of stdin (for scripts).")
@click.option("--service-socket", default=SOCKET, metavar="PATH", show_default=True,
              help="The extraction service's socket.")
def cli(dumpsets: tuple[str, ...], begin: str, end: str, expr: str, by: str, limit: int,
        sort: str, as_json: bool, as_csv: bool, use_service: bool, password_stdin: bool,
        service_socket: str) -> int:
    """Conversations, endpoints or service ports of [BEGIN, END) matching FILTER."""
    from pcapvault.index.config import ConfigError
    from pcapvault.index.dumpset import DumpSetError
    from pcapvault.index.libpcap import FilterError
    from pcapvault.index.times import TimeError, parse_window

    from .access import AccessError, open_dumpset
    from .cli import configured_dumpsets  # npcapextract's defaults, the same message
    from .conversations import Table, TableError, conversations
    from .request import Request
    from .service.client import service_targets, table_remote

    if as_json and as_csv:
        raise click.UsageError("--json and --csv contradict each other")
    t0 = time.monotonic()
    def warn(message: str) -> None:
        click.echo(f"{PROG}: warning: {message}", err=True)

    try:
        b_ns, e_ns = parse_window(begin, end)
        remote = service_targets(dumpsets, use_service)
        if remote:  # a dump set this user cannot read: the service may let them
            req = Request([os.path.abspath(p) for p in remote], b_ns, e_ns, expr, table=by,
                          table_sort=sort, table_limit=limit or None)
            table = Table(**table_remote(req, socket_path=service_socket,
                                         password_stdin=password_stdin,
                                         automatic=not use_service, warn=warn))
            return _show(table, by, as_json, as_csv, t0)
        paths = [os.path.abspath(p) for p in dumpsets or configured_dumpsets()]
        for p in paths:
            try:
                open_dumpset(p)
            except AccessError:
                raise PcapVaultError(
                    f"no permission to read dump set {p}; run as its owner or a member of its "
                    "group, or ask through the extraction service (npcapflows --service)"
                ) from None
        table = conversations(Request(paths, b_ns, e_ns, expr), by, sort, limit or None,
                              warn=warn)
    except (FilterError, TimeError, DumpSetError, ConfigError, TableError) as e:
        raise _BadInput(str(e)) from None
    except PermissionError as e:
        raise PcapVaultError(
            f"no permission to read {e.filename or 'the dump set'}; run as a user who may read "
            "the dump set, or ask npcapserve's API (GET /api/v1/conversations)") from None
    return _show(table, by, as_json, as_csv, t0)


def _show(table: Table, by: str, as_json: bool, as_csv: bool, t0: float) -> int:
    if as_json:
        # the rows are JSON-ready already: asdict would deep-copy every one of them
        click.echo(json.dumps({f.name: getattr(table, f.name) for f in fields(table)}))
    elif as_csv:
        _csv(table.rows, by)
    else:
        print_table(table, time.monotonic() - t0)
    return 0


# Columns of each table: (heading, row field or a function of the row, right-aligned).
def _port(v: int | None) -> str:
    return "-" if v is None else str(v)


def _start(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec)) + f".{frac // 1000:06d}"


COLUMNS = {
    "conversation": [
        ("Address A", lambda r: r["address_a"], False),
        ("Port A", lambda r: _port(r["port_a"]), True),
        ("", lambda r: "<->", False),
        ("Address B", lambda r: r["address_b"], False),
        ("Port B", lambda r: _port(r["port_b"]), True),
        ("Proto", lambda r: r["protocol"], False),
        ("Pkts A>B", lambda r: str(r["packets_a_to_b"]), True),
        ("Bytes A>B", lambda r: human_size(r["bytes_a_to_b"]), True),
        ("Pkts B>A", lambda r: str(r["packets_b_to_a"]), True),
        ("Bytes B>A", lambda r: human_size(r["bytes_b_to_a"]), True),
        ("Packets", lambda r: str(r["packets"]), True),
        ("Bytes", lambda r: human_size(r["bytes"]), True),
        ("Start", lambda r: _start(r["start_ns"]), False),
        ("Duration", lambda r: f"{r['duration_s']:.3f} s", True),
    ],
    "endpoint": [
        ("Address", lambda r: r["address"], False),
        ("Packets", lambda r: str(r["packets"]), True),
        ("Bytes", lambda r: human_size(r["bytes"]), True),
        ("Tx Pkts", lambda r: str(r["tx_packets"]), True),
        ("Tx Bytes", lambda r: human_size(r["tx_bytes"]), True),
        ("Rx Pkts", lambda r: str(r["rx_packets"]), True),
        ("Rx Bytes", lambda r: human_size(r["rx_bytes"]), True),
    ],
    "port": [
        ("Proto", lambda r: r["protocol"], False),
        ("Port", lambda r: str(r["port"]), True),
        ("Packets", lambda r: str(r["packets"]), True),
        ("Bytes", lambda r: human_size(r["bytes"]), True),
        ("Conversations", lambda r: str(r["conversations"]), True),
    ],
}
NOUNS = {"conversation": "conversations", "endpoint": "endpoints", "port": "service ports"}


def print_table(table: Table, seconds: float) -> None:
    """Aligned columns with human sizes, then one totals line."""
    cols = COLUMNS[table.by]
    cells = [[h for h, _, _ in cols]] + [[f(r) for _, f, _ in cols] for r in table.rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        line = "  ".join(c.rjust(w) if right else c.ljust(w)
                         for c, w, (_, _, right) in zip(row, widths, cols, strict=True))
        click.echo(line.rstrip())
    shown = f" (the first {len(table.rows)} shown)" if len(table.rows) < table.total_rows else ""
    read = ("; the filter needed packet bytes: the packets the index could not decide were "
            "read") if table.read_packets else "; from the indexes, no packet read"
    click.echo(f"{table.total_rows} {NOUNS[table.by]}{shown}; {table.packets} packets, "
               f"{human_size(table.bytes)} in the window{read} ({seconds:.2f} s)")


def _csv(rows: list[dict], by: str) -> None:
    from .conversations import FIELDS

    w = csv.DictWriter(sys.stdout, fieldnames=FIELDS[by], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    """Entry point: cliutil.run turns every failure into one line and an exit status."""
    from pcapvault.index.cliutil import run

    run(cli, PROG, error_code=1, args=argv)


if __name__ == "__main__":
    main()
