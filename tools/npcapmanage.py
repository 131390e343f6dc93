"""`npcapmanage`: manage what a dump set keeps: legal holds (hold, release, holds)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pcapvault.index.cliutil import printable, run
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.holds import Hold, HoldError, load_holds, place_hold, release_hold
from pcapvault.index.times import HELP, format_time, parse_window

from .npcaprepair import become_common_owner, become_owner
from .rangedelete import append_audit, caller, delete

EPILOG = """\b
Examples:
  npcapmanage hold -t /var/lib/pcapvault/eth0 -b "2025-11-21 14:00:00" -e "2025-11-21 18:00:00" \\
      --reason "incident 4711, legal asked"
  npcapmanage hold -t /var/lib/pcapvault/eth0 -b -2h -e now --reason "ongoing attack"
  npcapmanage holds                  # every hold of the configured dump sets
  npcapmanage holds -t /var/lib/pcapvault/eth0 --json
  npcapmanage release h3
  npcapmanage delete -t /var/lib/pcapvault/eth0 -b "2025-11-21 14:05:00" -e "2025-11-21 14:06:00" \\
      -f "host 10.1.2.3 and port 23"   # a password sent in clear, on purpose, audited

A held file is deleted by nothing: not the recorder's disk budget, not --max-age. When held
files fill the budget the recorder stops recording until a release (or more disk) makes room.
Each hold placed or released is a line of DUMPSET/audit.log and of syslog, as each deletion.
Times are those npcapextract takes: 'YYYY-MM-DD hh:mm:ss[.fraction]' (local time), ISO 8601
with Z or an offset, epoch seconds, or relative (now, -15m, -2h, -1d).
"""


def _dumpsets(given: tuple[Path, ...]) -> list[DumpSet]:
    """The -t dump sets, else those configured in /etc/pcapvault (as npcapextract)."""
    from pcapvault.index.config import config_dir, default_dumpsets

    paths = list(given) or default_dumpsets()
    if not paths:
        raise click.UsageError(f"no dump set given and none configured: pass -t DIR or "
                               f"configure {config_dir()}")
    return [DumpSet.open(p) for p in paths]


@click.group("npcapmanage", epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pcapvault", prog_name="npcapmanage")
def cli() -> None:
    """Manage what the dump sets keep: legal holds, and deleting a time range on purpose."""


@cli.command(epilog="""\b
Example:
  npcapmanage hold -t /var/lib/pcapvault/eth0 -b -2h -e now --reason "incident 4711"
""")
@click.option("-t", "--dumpset", required=True, type=click.Path(path_type=Path),
              help="Dump set directory (or its timeline).")
@click.option("-b", "--begin", required=True, help="Start of the window (as npcapextract -b).")
@click.option("-e", "--end", required=True, help="End of the window, exclusive (as -e).")
@click.option("--reason", required=True, help="Why (a case number): shown by `holds`.")
def hold(dumpset: Path, begin: str, end: str, reason: str) -> None:
    """Hold every file with packets in [BEGIN, END): nothing deletes them until released.

    Files recorded into the window afterwards are held too.
    """
    b, e = _window(begin, end)
    who = caller()
    ds = DumpSet.open(dumpset)
    become_owner(ds)  # the lock and holds files stay the recorder's account's
    h = place_hold(ds, b, e, reason, who["user"])
    _audit(ds, h, "hold", who)
    click.echo(f"hold {h.id} placed on {ds.root}: {format_time(b)} to {format_time(e)}, "
               f"{len(h.files)} file(s) held now; release it with: npcapmanage release {h.id} "
               f"-t {ds.root}")


def _audit(ds: DumpSet, h: Hold, event: str, who: dict) -> None:
    """A hold placed or released is a line of the dump set's audit log, as a deletion is: who
    released a hold, and when, must show afterwards (docs/FORMAT.md, "Audit log")."""
    append_audit(ds, {"event": event, **who, "dumpset": str(ds.root), "id": h.id,
                      "begin": format_time(h.begin_ns), "end": format_time(h.end_ns),
                      "reason": h.reason, "placed_by": h.user,
                      "placed": format_time(h.created_ns), "held_files": len(h.files)})


def _window(begin: str, end: str) -> tuple[int, int]:
    try:
        b, e = parse_window(begin, end)
    except PcapVaultError as err:
        raise click.UsageError(str(err)) from None
    if b == e:
        raise click.UsageError(f"the window {begin!r} to {end!r} is empty; {HELP}")
    return b, e


@cli.command()
@click.argument("hold_id", metavar="ID")
@click.option("-t", "--dumpset", "dumpsets", multiple=True, type=click.Path(path_type=Path),
              help="Dump set holding it [default: the configured ones].")
def release(hold_id: str, dumpsets: tuple[Path, ...]) -> None:
    """Release the hold ID: its files may be deleted again (unless another hold covers them)."""
    who = caller()
    candidates = _dumpsets(dumpsets)
    become_common_owner(candidates)
    found = [ds for ds in candidates if any(h.id == hold_id for h in load_holds(ds).list())]
    if len(found) > 1:
        raise click.UsageError(f"hold {hold_id} exists in several dump sets "
                               f"({', '.join(str(ds.root) for ds in found)}); name one with -t")
    if not found:
        raise HoldError(f"no hold {hold_id!r} in {', '.join(str(ds.root) for ds in candidates)}"
                        "; list them with npcapmanage holds")
    ds = found[0]
    become_owner(ds)
    h = release_hold(ds, hold_id)
    _audit(ds, h, "release", who)
    click.echo(f"hold {printable(h.id)} released on {ds.root} ({printable(h.reason)}; placed "
               f"by {printable(h.user)} at {format_time(h.created_ns)})")


@cli.command("holds")
@click.option("-t", "--dumpset", "dumpsets", multiple=True, type=click.Path(path_type=Path),
              help="Dump set [default: the configured ones]; may be repeated.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
def list_holds(dumpsets: tuple[Path, ...], as_json: bool) -> None:
    """List the holds in force."""
    dss = _dumpsets(dumpsets)
    become_common_owner(dss)
    rows = [(ds, h) for ds in dss for h in load_holds(ds).list()]
    if as_json:
        click.echo(json.dumps([_json(ds, h) for ds, h in rows], indent=1))
        return
    if not rows:
        click.echo("no holds")
        return
    table = [("ID", "BEGIN (UTC)", "END (UTC)", "FILES", "USER", "PLACED (UTC)", "DUMP SET",
              "REASON")]
    table += [(printable(h.id), format_time(h.begin_ns), format_time(h.end_ns),
               str(len(h.files)), printable(h.user), format_time(h.created_ns),
               printable(str(ds.root)), printable(h.reason)) for ds, h in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


cli.add_command(delete)


def _json(ds: DumpSet, h: Hold) -> dict[str, object]:
    return {"dumpset": str(ds.root), "id": h.id, "begin_ns": h.begin_ns, "end_ns": h.end_ns,
            "begin": format_time(h.begin_ns), "end": format_time(h.end_ns),
            "reason": h.reason, "user": h.user, "created_ns": h.created_ns,
            "files": list(h.files)}


def main() -> None:
    run(cli, "npcapmanage")
