"""npcapindex: build the `.pcap.idx` index of any classic pcap.

The same builder the recorder uses, so a pcap written by another tool (tcpdump, n2disk,
editcap) can be dropped into a dump set or checked against pcapvault's own index. A torn
last record is reported and left out; everything before it is indexed.
"""

from __future__ import annotations

import time

import click

from pcapvault.index.builder import index_pcap
from pcapvault.index.cliutil import run
from pcapvault.index.indexfile import write_index
from pcapvault.index.pcapfile import PcapReader

PROG = "npcapindex"
EXIT_BAD_INPUT = 2


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  npcapindex -i capture.pcap                 # writes capture.pcap.idx
  npcapindex -i /srv/old/trace.pcap -o /tmp/trace.pcap.idx -v
""",
)
@click.version_option(package_name="pcapvault", prog_name="npcapindex")
@click.option("-i", "input_path", required=True, metavar="FILE.pcap", help="pcap to index")
@click.option(
    "-o", "output_path", default=None, metavar="FILE.idx",
    help="index to write (default: FILE.pcap.idx)",
)
@click.option("-v", "verbose", is_flag=True, help="print what was indexed")
def command(input_path: str, output_path: str | None, verbose: bool) -> None:
    """Index a classic pcap (both byte orders, micro- or nanosecond timestamps)."""
    output_path = output_path or input_path + ".idx"
    t0 = time.monotonic()
    with PcapReader(input_path) as reader:
        arr = reader.array()
        idx, records = index_pcap(arr, reader.header)
        del arr
        size = reader.size
    if records.torn:
        click.echo(
            f"{PROG}: warning: {input_path}: torn or corrupt record at byte "
            f"{records.complete_end}; indexed the {len(records)} complete records before it "
            f"({size - records.complete_end} bytes ignored)",
            err=True,
        )
    try:
        write_index(output_path, idx)
    except OSError as e:
        raise click.ClickException(
            f"cannot write {output_path}: {e.strerror or e}"
        ) from None
    if verbose:
        click.echo(
            f"{output_path}: {idx.count} packets, {len(idx.flows)} flows, "
            f"{time.monotonic() - t0:.3f} s"
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line on stderr and exit status 2."""
    run(command, PROG, error_code=EXIT_BAD_INPUT, args=argv)


if __name__ == "__main__":
    main()
