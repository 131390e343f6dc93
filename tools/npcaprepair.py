"""`npcaprepair DUMPSET`: make a dump set consistent again after a crash or manual meddling."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import click

from pcapvault.index.cliutil import run
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.errors import DumpSetError
from pcapvault.index.privileges import drop_to
from pcapvault.index.repair import live, lock, repair

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
writing says so and leaves the recorder's files in progress out. Run as root on a dump set
that belongs to another account (the recorder's -u), it becomes that account first, so that
what it writes belongs to the dump set's owner like everything else there.
"""


@click.command("npcaprepair", epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dumpset", type=click.Path(path_type=Path))
@click.option("-n", "--dry-run", is_flag=True, help="Report what would change; change nothing.")
@click.option("--quick", is_flag=True,
              help="Skip reading every pcap to check its records against its index, and "
                   "decompressing .pcap.zst files to verify every frame (the recorder's "
                   "start-up check is quick).")
@click.option("--upgrade", is_flag=True,
              help="Also rewrite sound indexes of an older format version as the current one "
                   "(reads those pcaps): older indexes are read as they are, without the newer "
                   "parts (version 5's time bins: the volume of a long window then decodes "
                   "every packet).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@click.version_option(package_name="pcapvault", prog_name="npcaprepair")
def command(dumpset: Path, dry_run: bool, quick: bool, upgrade: bool, quiet: bool) -> None:
    """Repair the dump set DUMPSET (or the one of a timeline directory)."""
    ds = DumpSet.open(dumpset)
    become_owner(ds)
    problem = ds.timeline_problem()
    if problem:
        raise DumpSetError(
            f"{ds.root}: {problem}; start the recorder on it (with -A DIR for a timeline "
            "elsewhere) to give it one: the start links every file into it"
        )
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

    actions = repair(ds, dry_run=dry_run, deep=not quick, report=report, live=recording,
                     upgrade=upgrade)
    if actions:
        click.echo(f"{len(actions)} change(s) {'needed' if dry_run else 'made'} in {ds.root}")
    else:
        click.echo(f"{ds.root} is consistent; nothing to repair")


def become_owner(ds: DumpSet) -> None:
    """Root repairs as the dump set's owner: indexes, links and directories it made as root
    would be refused by the extraction service and could not be deleted by the budget."""
    owner = ds.root.stat().st_uid
    if os.geteuid() != 0 or owner == 0:
        return
    try:
        pw = pwd.getpwuid(owner)
    except KeyError:
        raise DumpSetError(f"{ds.root} belongs to uid {owner}, which has no account; chown it "
                           "to the recorder's account first") from None
    drop_to(pw)


def become_common_owner(dumpsets: list[DumpSet]) -> None:
    """Root reads what the dump sets' owner may have put there (the holds file, the import
    registry) as that owner, when they all have one: a FIFO or a link in place of a file then
    fails as it would for the owner. Dump sets of different accounts are read as root, by
    the readers that open only small regular files (index.atomicfile.read_small_file)."""
    if len({ds.root.stat().st_uid for ds in dumpsets}) == 1:
        become_owner(dumpsets[0])


def main() -> None:
    run(command, "npcaprepair")
