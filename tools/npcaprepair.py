"""`npcaprepair DUMPSET`: make a dump set consistent again after a crash or manual meddling."""

from __future__ import annotations

from pathlib import Path

import click

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.repair import live, lock, repair
from pcapvault.tools.cliutil import run

EPILOG = """\b
Examples:
  npcaprepair /var/lib/pcapvault/eth0 --dry-run   # show what would change
  npcaprepair /var/lib/pcapvault/eth0

It keeps every complete packet: it cuts torn last records, drops damaged zstd frames (and
what follows them in that file), finalises files left under
temporary names, rebuilds missing or damaged indexes and indexes that do not describe their
pcap record for record (another file's, or entries whose headers differ), restores a record
header the index proves damaged (the records after it are whole), fixes timeline links and
removes empty directories. A second run finds nothing to do. The recorder runs the same
repair on start (quick: without reading the pcaps). A dry run on a dump set a recorder is
writing says so and leaves the recorder's files in progress out.
"""


@click.command("npcaprepair", epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dumpset", type=click.Path(path_type=Path))
@click.option("-n", "--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--quick", is_flag=True,
              help="Skip reading every pcap to check its records against its index, and "
                   "decompressing .pcap.zst files to verify every frame (the recorder's "
                   "start-up check is quick).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@click.version_option(package_name="pcapvault", prog_name="npcaprepair")
def command(dumpset: Path, dry_run: bool, quick: bool, quiet: bool) -> None:
    """Repair the dump set DUMPSET (or the one of a timeline directory)."""
    ds = DumpSet.open(dumpset)
    recording = False
    if not dry_run:
        lock(ds)
    elif live(ds):
        recording = True
        click.echo(f"{ds.root} is live: a recorder (or a repair) holds its lock; the files it "
                   "is writing, compressing or linking are left out of this dry run")
    prefix = "would " if dry_run else ""

    def report(action) -> None:
        if not quiet:
            click.echo(f"{prefix}{action}")

    actions = repair(ds, dry_run=dry_run, deep=not quick, report=report, live=recording)
    if actions:
        click.echo(f"{len(actions)} change(s) {'needed' if dry_run else 'made'} in {ds.root}")
    else:
        click.echo(f"{ds.root} is consistent; nothing to repair")


def main() -> None:
    run(command, "npcaprepair")
