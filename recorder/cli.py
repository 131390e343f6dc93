"""`recorder`: continuous capture from one interface into a disk-budgeted dump set."""

from __future__ import annotations

import logging
import re
import signal
import sys
from importlib.metadata import version
from pathlib import Path

import click

from pcapvault.index.clitypes import Number, OptionalValue
from pcapvault.index.cliutil import EXIT_USAGE, fail, run
from pcapvault.index.config import expand_config_args
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.sizes import parse_size

from .budget import BudgetError, parse_limit

EPILOG = """\b
Examples:
  recorder -i eth0 --disk-limit 80%
  recorder /etc/pcapvault/recorder-eth0.conf -v   # options from a file, then overrides
  recorder -i eth0 -o /srv/pcap/eth0 -p 512M -t 300 --disk-limit 2TB -f "not port 22"
  kill -USR1 $(pidof recorder)   # close the current file now, so it can be extracted
  recorder -i eth0 --disk-limit 2TB --max-age 30d   # keep at most 30 days, within 2 TB
  recorder -i eth0 -u pcapvault --exec-cmd 'zeek -r "$PCAPVAULT_PCAP"' --exec-max 4

The dump set is DIR (default /var/lib/pcapvault/IFACE); its timeline is DIR/timeline.
A SIZE is bytes with an optional unit K/M/G/T (binary: 1K = 1024): 1500, 64K, 256M, 2GB.
A number without a unit is bytes, as in npcapextract (n2disk's -p 256 is -p 256M here).
A DURATION is a number and a unit s, m, h, d or w: 90m, 12h, 30d.
Files under a legal hold (npcapmanage hold) are never deleted; when they fill the budget the
recorder stops writing (held_full: 1 in the stats) until room appears, and keeps running.
The --exec-cmd command gets PCAPVAULT_PCAP, PCAPVAULT_INDEX, PCAPVAULT_DUMPSET,
PCAPVAULT_FIRST_NS and PCAPVAULT_LAST_NS in its environment.
"""


# The smallest -p: a few packets per file; a smaller one is a size meant in MB (n2disk's -p).
MIN_FILE = 16 << 10


def _file_size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        return parse_size(value, param.opts[0], MIN_FILE)
    except PcapVaultError as e:
        raise click.BadParameter(str(e)) from None


def _filter(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from pcapvault.index.libpcap import compile_filter

    try:
        compile_filter(value, 1, 262144).close()
    except PcapVaultError as e:
        raise click.BadParameter(str(e)) from None
    return value


# A limit no filesystem reaches (off_t's range) is a typo, not a budget.
_MAX_LIMIT = (1 << 63) - 1


def _limit(ctx: click.Context, param: click.Parameter, value: str):
    # float() under parse_limit also reads "80 %", "8_0%" and "1e1%"; a share is written 80%.
    text = value.strip()
    if text.endswith("%") and not re.fullmatch(r"\d+(\.\d+)?%", text):
        raise click.BadParameter(f"bad --disk-limit {value!r}: write a share as e.g. 80%")
    try:
        limit = parse_limit(value)
    except PcapVaultError as e:
        raise click.BadParameter(str(e)) from None
    if limit.bytes is not None and limit.bytes > _MAX_LIMIT:
        raise click.BadParameter(f"bad --disk-limit {value!r}: more than any filesystem holds")
    return limit


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from pcapvault.index.times import parse_duration

    try:
        return None if value is None else parse_duration(value, param.opts[0])
    except PcapVaultError as e:
        raise click.BadParameter(str(e)) from None


def _mode(ctx: click.Context, param: click.Parameter, value: str) -> int:
    from pcapvault.index.privileges import parse_mode

    try:
        mode = parse_mode(value, param.opts[0])
    except PcapVaultError as e:
        raise click.BadParameter(str(e)) from None
    # The owner writes the files and directories, and the indexer reads them back, as the
    # owner: without these bits the writer failed on the file's last block and lost it.
    needed, example = (0o700, "0750") if param.opts[0] == "--dir-mode" else (0o600, "0640")
    if mode & needed != needed:
        raise click.BadParameter(f"bad {param.opts[0]} {value!r}: the owner must keep "
                                 f"{needed:o} (e.g. {example})")
    return mode


@click.command(
    "recorder",
    epilog=EPILOG,
    options_metavar="[CONF] [OPTIONS]",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option("-i", "--interface", required=True, help="Interface to capture from.")
@click.option("-o", "--dump-dir", type=click.Path(path_type=Path),
              help="Dump set directory [default: /var/lib/pcapvault/IFACE].")
@click.option("-A", "--timeline-dir", type=click.Path(path_type=Path),
              help="Timeline directory [default: DUMP_DIR/timeline]; kept by the dump set.")
@click.option("-b", "--buffer", "buffer_mb", type=click.IntRange(2, 1 << 16), default=128,
              show_default=True, help="Capture ring size in MB.")
@click.option("-s", "--snaplen", type=click.IntRange(64, 262144), default=1536,
              show_default=True, help="Bytes kept of each packet.")
@click.option("--promisc/--no-promisc", default=True, show_default=True,
              help="Put the interface in promiscuous mode.")
@click.option("-f", "--filter", "bpf", default="", callback=_filter,
              help="tcpdump filter, run in the kernel.")
@click.option("-p", "--max-file-size", default="256M", show_default=True, callback=_file_size,
              metavar="SIZE", help="Close a file at this size (e.g. 256M; at least 16K).")
@click.option("-t", "--max-file-duration", type=click.IntRange(1, 600), default=600,
              show_default=True, help="Close a file after this many seconds.")
@click.option("--disk-limit", default="80%", show_default=True, callback=_limit,
              metavar="SIZE|N%",
              help="Budget for the whole dump set: a SIZE (500MB, 2GB) or % of the filesystem.")
@click.option("--max-age", callback=_duration, metavar="DURATION",
              help="Also delete files whose last packet is older than this (30d, 12h, 90m).")
@click.option("--exec-cmd", metavar="CMD",
              help="Run CMD (via /bin/sh -c, as the -u account) for every file once it is "
                   "indexed and linked; the file's paths are in the environment.")
@click.option("--exec-max", type=click.IntRange(1, 64), default=2, show_default=True,
              help="--exec-cmd commands running at once; more files wait in a queue.")
@click.option("--exec-timeout", type=Number(1), default=600.0, show_default=True,
              help="Seconds an --exec-cmd command may run before it is killed.")
@click.option("--usec", is_flag=True, help="Microsecond timestamps (default: nanosecond).")
@click.option("-r", "--buffered", is_flag=True,
              help="Buffered writes instead of O_DIRECT (chosen by itself where refused).")
@click.option("--stats-interval", type=Number(0.1), default=10.0, show_default=True,
              help="Seconds between stats lines and stats-file updates.")
@click.option("--stats-file", type=click.Path(path_type=Path),
              help="Stats file [default: DUMP_DIR/stats].")
@click.option("--files-per-dir", type=click.IntRange(1), default=1000, show_default=True,
              help="Files per storage directory.")
@click.option("--compress", cls=OptionalValue, alone=3, type=click.IntRange(1, 19),
              default=None, metavar="[LEVEL]",
              help="Store files as seekable zstd (.pcap.zst), compressed after close by the "
                   "indexer process; LEVEL 1-19, default 3.")
@click.option("-u", "--user", help="Run as this account once the capture socket is open.")
@click.option("--file-mode", default="0640", show_default=True, callback=_mode,
              help="Permissions of pcap and index files (octal).")
@click.option("--dir-mode", default="0750", show_default=True, callback=_mode,
              help="Permissions of the dump set's directories (octal).")
@click.option("-v", "--verbose", is_flag=True, help="Log every file closed.")
@click.version_option(version("pcapvault"), "-V", "--version", prog_name="recorder")
def command(interface, dump_dir, timeline_dir, buffer_mb, snaplen, promisc, bpf, max_file_size,
         max_file_duration, disk_limit, max_age, exec_cmd, exec_max, exec_timeout, usec,
         buffered, stats_interval, stats_file, files_per_dir, compress, user, file_mode,
         dir_mode, verbose) -> None:
    """Record packets from INTERFACE into rotating, indexed pcap files under a disk budget."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="recorder: %(message)s",
        stream=sys.stderr,
    )
    from pcapvault.index.dumpset import TimelineMismatch
    from pcapvault.index.repair import lock

    from .capture import HookAsRoot, Recorder, RecorderConfig
    from .stats import StatsPathError

    cfg = RecorderConfig(
        interface=interface,
        dumpset=dump_dir or Path("/var/lib/pcapvault") / interface,
        timeline=timeline_dir,
        buffer_mb=buffer_mb,
        snaplen=snaplen,
        promisc=promisc,
        bpf=bpf,
        max_file_bytes=max_file_size,
        max_file_seconds=max_file_duration,
        disk_limit=disk_limit,
        nanosecond=not usec,
        direct_io=not buffered,
        stats_interval=stats_interval,
        stats_file=stats_file,
        files_per_dir=files_per_dir,
        user=user,
        compress=compress,
        file_mode=file_mode,
        dir_mode=dir_mode,
        max_age_ns=max_age,
        exec_cmd=exec_cmd,
        exec_max=exec_max,
        exec_timeout=exec_timeout,
    )
    try:
        rec = Recorder(cfg)
        rec.inherited_fds.append(lock(rec.ds))
        rc = rec.run()
    except (TimelineMismatch, StatsPathError, BudgetError, HookAsRoot) as e:
        # Options that contradict each other or the dump set (a limit too small for -p).
        raise click.UsageError(str(e)) from None
    sys.exit(rc)


def main() -> None:
    # Until the capture loop takes it (SIGUSR1: close the current file), a reload must not
    # kill the start-up with the signal's default action: there is no file to close yet.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        args = expand_config_args(sys.argv[1:], command)
    except PcapVaultError as e:
        fail("recorder", str(e), EXIT_USAGE)
    run(command, "recorder", args=args)
