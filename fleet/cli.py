"""npcapfleet: one question across every sensor, from a ClickHouse flow catalogue and the
sensors' HTTPS APIs (docs/FLEET.md)."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import click

from pcapvault.extract.npcapflows import table_options
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.sizes import human_size

PROG = "npcapfleet"
EXIT_PARTIAL = 3

EPILOG = """\b
Examples:
  npcapfleet sync                                   # from a systemd timer, every few minutes
  npcapfleet conversations -b "2025-11-21 14:00" -e "2025-11-21 14:20" -f "host 10.1.2.3"
  npcapfleet conversations -b -1h -e now --by endpoint -n 10 --json
  npcapfleet pcap -b -20m -e now -f "host 10.1.2.3 and port 443" -o incident.pcapng
\b
The sensors, their tokens and the catalogue are in the fleet file (--config, default
/etc/pcapvault/fleet.toml, readable by its owner only); credentials never go on the
command line. --catalogue overrides the file's: a directory (ClickHouse in process, chdb)
or https://HOST:PORT (a ClickHouse server).
\b
Exit status:
  0  done
  1  runtime failure: no catalogue, no sensor reachable for sync
  2  usage error: bad option, filter, time or fleet file
  3  partial: a sensor failed or timed out (named on stderr); the rest is complete
"""


class _FleetUsage(click.ClickException):
    exit_code = 2


def _say(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


def _warn(message: str) -> None:
    click.echo(f"{PROG}: warning: {message}", err=True)


class Fleet:
    """The fleet file and the catalogue, opened when a command needs them."""

    def __init__(self, config: Path, catalogue: str | None):
        from .config import FleetFileError, check_url, load

        try:
            self.config = load(config)
        except FleetFileError as e:
            raise _FleetUsage(str(e)) from None
        self.where = catalogue or self.config.catalogue
        if not self.where:
            raise click.UsageError("give --catalogue DIR|https://HOST:PORT, or catalogue = "
                                   "in the fleet file")
        if "://" in self.where:
            try:
                check_url(self.where, "--catalogue")
            except FleetFileError as e:
                raise click.UsageError(f"{e}; the user and password go in the fleet file's "
                                       "[clickhouse] section") from None
        self._store = None

    @property
    def store(self):  # noqa: ANN201 - a store.Store
        if self._store is None:
            from .store import open_store

            self._store = open_store(self.where, self.config.clickhouse,
                                     self.config.retention_days)
        return self._store

    def kept_from(self) -> int:
        """The oldest time the catalogue surely holds (its TTL)."""
        from .query import horizon

        return horizon(self.config.retention_days, time.time_ns())

    def client(self, name: str):  # noqa: ANN201 - a sensors.SensorClient
        """A client of the sensor `name` (SensorError when it cannot be set up)."""
        from .sensors import SensorClient

        return SensorClient(self.config.sensor(name), self.config.timeout)

    def clients(self, names: list[str] | None = None) -> tuple[list, list[str]]:
        """Clients of the sensors (all, or `names`), and the failures of those that could
        not even be set up (a fingerprint that does not match)."""
        from .sensors import SensorClient, SensorError

        out, failed = [], []
        for s in self.config.sensors:
            if names is None or s.name in names:
                try:
                    out.append(SensorClient(s, self.config.timeout))
                except SensorError as e:
                    failed.append(str(e))
        return out, failed


def _window(begin: str, end: str, expr: str) -> tuple[int, int]:
    """The window, and a filter libpcap compiles (so a typo is a usage error here, not a
    failure on every sensor)."""
    from pcapvault.index.libpcap import FilterError, compile_filter
    from pcapvault.index.times import TimeError, parse_window

    try:
        b, e = parse_window(begin, end)
        compile_filter(expr, 1, 65535)
    except (TimeError, FilterError) as err:
        raise _FleetUsage(str(err)) from None
    return b, e


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             epilog=EPILOG)
@click.version_option(package_name="pcapvault", prog_name=PROG)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/pcapvault/fleet.toml"), show_default=True,
              help="The fleet file: sensors, their tokens, the catalogue.")
@click.option("--catalogue", metavar="DIR|URL",
              help="The catalogue: a directory (chdb) or https://HOST:PORT (ClickHouse).")
@click.pass_context
def cli(ctx: click.Context, config: Path, catalogue: str | None) -> None:
    """Search and extract across a fleet of pcapvault sensors."""
    ctx.obj = (config, catalogue)


def _fleet(ctx: click.Context) -> Fleet:
    return Fleet(*ctx.obj)


@cli.command()
@click.option("--sensor", "names", multiple=True, metavar="NAME",
              help="Sync only this sensor (repeatable). Default: all.")
@click.pass_context
def sync(ctx: click.Context, names: tuple[str, ...]) -> int:
    """Pull what each sensor indexed since the last sync into the catalogue; drop the files
    the sensors deleted."""
    from .sync import sync as run_sync

    fleet = _fleet(ctx)
    for n in names:
        try:
            fleet.config.sensor(n)
        except PcapVaultError as e:
            raise _FleetUsage(str(e)) from None
    clients, failed = fleet.clients(list(names) or None)

    def note(s) -> None:  # noqa: ANN001 - a sync.Synced
        if s.error:
            _warn(f"{s.error}; its part of the catalogue is as before")
        else:
            _say(f"{s.sensor} {s.dumpset}: {s.added} files added or updated, {s.removed} "
                 f"removed, {s.conversations} conversation rows")

    for message in failed:
        _warn(f"{message}; its part of the catalogue is as before")
    try:
        done = run_sync(fleet.store, clients, note)
    finally:
        for c in clients:
            c.close()
    failures = len(failed) + sum(1 for s in done if s.error)
    if failures and failures == len(clients) + len(failed):
        raise PcapVaultError("no sensor could be synced (see the warnings above)")
    return EXIT_PARTIAL if failures else 0


@cli.command()
@click.option("-b", "--begin", required=True, help="Start of the window (inclusive).")
@click.option("-e", "--end", required=True, help="End of the window (exclusive).")
@click.option("-f", "--filter", "expr", default="", help="tcpdump filter expression.")
@table_options
@click.pass_context
def conversations(ctx: click.Context, begin: str, end: str, expr: str, by: str, limit: int,
                  sort: str, as_json: bool) -> int:
    """The fleet's conversations, endpoints or service ports of [BEGIN, END) matching FILTER:
    from the catalogue where it answers exactly, else from the sensors, summed."""
    from pcapvault.extract.conversations import Table
    from pcapvault.extract.npcapflows import print_table

    from . import query, rows

    b, e = _window(begin, end, expr)
    t0 = time.monotonic()
    fleet = _fleet(ctx)
    found = query.conversations(fleet.store, [s.name for s in fleet.config.sensors],
                                fleet.client, expr, b, e, fleet.kept_from())
    failed = found.failed
    for w in found.warnings:
        _warn(w)
    for message in failed:
        _warn(f"{message}; the table is partial")
    all_rows = rows.table(found.conversations, by)
    shown = rows.top(all_rows, sort, limit or None)
    table = Table(by, shown, len(all_rows), sum(r["packets"] for r in found.conversations),
                  sum(r["bytes"] for r in found.conversations), False, sort, b, e,
                  found.warnings)
    if as_json:
        click.echo(json.dumps({**{f.name: getattr(table, f.name) for f in fields(table)},
                               "sensors_asked": found.asked, "failed": failed,
                               "partial": bool(failed)}))
    else:
        print_table(table, time.monotonic() - t0)
        asked = ", ".join(found.asked) or "none"
        _say(f"sensors asked directly (the catalogue could not answer for them): {asked}")
    return EXIT_PARTIAL if failed else 0


@cli.command()
@click.option("-b", "--begin", required=True, help="Start of the window (inclusive).")
@click.option("-e", "--end", required=True, help="End of the window (exclusive).")
@click.option("-f", "--filter", "expr", default="", help="tcpdump filter expression.")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="The pcapng to write ('-': standard output).")
@click.pass_context
def pcap(ctx: click.Context, begin: str, end: str, expr: str, output: str) -> int:
    """The packets of [BEGIN, END) matching FILTER from every sensor that may hold some (the
    catalogue says which), merged by time into one pcapng, one interface per sensor dump set
    (named SENSOR:INTERFACE)."""
    from pcapvault.extract.output import Interface

    from . import filters, query
    from .pcap import SensorPart, write

    b, e = _window(begin, end, expr)
    fleet = _fleet(ctx)
    names = [s.name for s in fleet.config.sensors]
    try:
        node, expressible = filters.parse(expr), True
    except filters.NotExpressible:
        node, expressible = None, False
    ks = query.known(fleet.store, names)
    chosen = query.candidates(fleet.store, node, expressible, b, e, names)
    chosen |= query.stale(ks, b, e, fleet.kept_from())
    failed = [f"{n}: never synced, so its dump sets are unknown (run npcapfleet sync)"
              for n in names if not any(k.sensor == n for k in ks)]
    wanted = sorted({s for s, _ in chosen})
    clients, not_set_up = fleet.clients(wanted)
    failed += not_set_up
    for message in failed:
        _warn(f"{message}; the result is partial")
    asked = []
    for c in clients:
        mine = [(i, k) for i, k in enumerate(ks)
                if k.sensor == c.name and (k.sensor, k.dumpset) in chosen]
        asked.append(SensorPart(c, [k.dumpset for _, k in mine], [i for i, _ in mine]))
    interfaces = [Interface(f"{k.sensor}:{k.interface}", k.linktype, k.snaplen, k.nanosecond)
                  for k in ks]

    def said(p) -> None:  # noqa: ANN001 - a pcap.Progress
        if p.error:
            _warn(f"{p.error} (after {p.packets} packets); the result is partial")
        else:
            _say(f"{p.sensor}: {p.packets} packets, {human_size(p.bytes)} in {p.seconds:.2f} s")

    t0 = time.monotonic()
    try:
        packets = write(output, interfaces, asked, b, e, expr, said)
    finally:
        for c in clients:
            c.close()
    failed += [a.progress.error for a in asked if a.progress.error]
    skipped = sum(1 for n in names if n not in wanted and any(k.sensor == n for k in ks))
    _say(f"{packets} packets from {len(asked)} sensors into {output} in "
         f"{time.monotonic() - t0:.2f} s"
         + (f" ({skipped} sensors skipped: the catalogue has nothing of theirs)"
            if skipped else "") + ("; PARTIAL" if failed else ""))
    return EXIT_PARTIAL if failed else 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line and an exit status for every failure (cliutil.run)."""
    from pcapvault.index.cliutil import run

    run(cli, PROG, error_code=1, args=argv)


if __name__ == "__main__":
    main()

