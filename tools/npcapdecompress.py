"""`npcapdecompress`: give back the original pcap of a compressed dump-set file, byte for byte."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pcapvault.index.atomicfile import atomic_write
from pcapvault.index.cliutil import run
from pcapvault.index.compressed import CompressedReader
from pcapvault.index.pcapfile import parse_global_header

EPILOG = """\b
Examples:
  npcapdecompress -i 1763737200.123456.pcap.zst -o 1763737200.123456.pcap
  npcapdecompress -i 1763737200.123456.pcap.zst -o - | tcpdump -r - -n
"""


@click.command("npcapdecompress", epilog=EPILOG,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-i", "--input", "src", required=True, type=click.Path(path_type=Path),
              help="A .pcap.zst written by recorder --compress.")
@click.option("-o", "--output", "dst", required=True,
              help="Output pcap, or - for standard output.")
@click.version_option(package_name="pcapvault", prog_name="npcapdecompress")
def command(src: Path, dst: str) -> None:
    """Decompress a pcapvault .pcap.zst file into the pcap it was made from."""
    with CompressedReader(src) as r:
        head = r.pread(0, 24)
        parse_global_header(head, str(src))  # ours holds a pcap; refuse anything else
        if dst == "-":
            r.copy_to(sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        with atomic_write(dst, sync=False) as f:
            r.copy_to(f)


def main() -> None:
    run(command, "npcapdecompress")
