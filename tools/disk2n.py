"""`disk2n`: replay recorded traffic onto an interface (the open counterpart of n2disk's disk2n).

Input: a dump-set window selected exactly as npcapextract selects it, or pcap files. Output:
an AF_PACKET TX ring on the interface, with the original timing, a speed factor, a packet or
bit rate, or as fast as possible. Progress and the summary go to stderr.
"""

from __future__ import annotations

import gc
import re
import signal
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pcapvault.index.clitypes import Number
from pcapvault.index.cliutil import run
from pcapvault.index.config import expand_config_args
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.sizes import human_size

if TYPE_CHECKING:
    from .replay_engine import Counters, Replayer
    from .replay_pace import Pace
    from .replay_source import DumpSetInput, FileInput

PROG = "disk2n"

EPILOG = """\b
Examples:
  disk2n -i eth1 -t /var/lib/pcapvault/eth0 -b "2025-11-21 15:00:00" -e "2025-11-21 15:05:00"
  disk2n -i eth1 -t /var/lib/pcapvault/eth0 -b -10m -e now -f "host 10.0.0.5" --speed 4
  disk2n -i eth1 -r incident.pcap --mbps 500 --loop 0
  disk2n -i eth1 -m replays.txt --topspeed --dst-mac 02:00:00:00:00:01
  disk2n /etc/pcapvault/disk2n-lab.conf        # options from a file, then overrides

\b
Times (-b, -e) are npcapextract's: 'YYYY-MM-DD hh:mm:ss[.fraction]' (local time), ISO 8601
with Z or an offset, epoch seconds, or now, -15m, -2h, -30s, -1d. BEGIN inclusive, END
exclusive. A local time skipped or repeated at a daylight saving change is refused: add the
UTC offset (+01:00) to say which is meant.

\b
Loops: --loop 1 (play once) is the default. n2disk's disk2n loops forever unless told
otherwise; a replay into an IDS or a firewall under test usually must not repeat the traffic
by surprise (duplicate alerts, skewed counters), so here repeating is asked for: --loop N, or
--loop 0 for forever (stop with Ctrl-C or SIGTERM).

\b
Timing: the original gaps between frames (the default; --speed 2 plays twice as fast), a
constant --pps or --mbps (frame bytes, without preamble and FCS), or --topspeed. Each file
and each loop starts right after the previous one ends.

\b
Frames larger than the interface MTU + 14 (+ 4 with an 802.1Q tag) cannot be sent: by
default they are skipped and counted (--oversize skip), or the replay stops (--oversize fail).
Frames are sent as captured (a snaplen-cut frame is sent cut).

\b
Exit status: 0 replayed, also when SIGINT or SIGTERM stopped it (within 0.1 s, even in the
middle of a long pause; the summary then says "interrupted"); 1 an unusable interface, no
permission, unreadable input, nothing to replay, or an oversized frame with --oversize fail;
2 usage error.
"""

# Readability is left to the readers: an unreadable input is a runtime failure (exit 1).
_PATH = click.Path(path_type=Path, readable=False)
_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-]?)[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


# The bounds keep schedules in int64 nanoseconds: a rate near zero or an infinite
# interval overflowed into a traceback or sent everything at once.
_RATE = Number(min=0.001, max=10**9)
_SECONDS = Number(min=0, max=10**6)


def _mac(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    if value is None:
        return None
    if not _MAC.match(value):
        raise click.BadParameter(f"{value!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return bytes.fromhex(re.sub("[:-]", "", value))


@click.command(
    PROG,
    epilog=EPILOG,
    options_metavar="[CONF] [OPTIONS]",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("-i", "--interface", required=True, help="Interface to send on.")
@click.option("-t", "--dumpset", "dumpsets", multiple=True, metavar="DIR",
              help="Dump set (recorder -o) or its timeline; repeat to merge interfaces.")
@click.option("-b", "--begin", help="Start of the dump-set window (inclusive).")
@click.option("-e", "--end", help="End of the dump-set window (exclusive).")
@click.option("-f", "--filter", "expr", default="", help="tcpdump filter (libpcap).")
@click.option("-r", "--read", "files", multiple=True, type=_PATH,
              metavar="FILE", help="pcap file to replay; repeat to play several in order.")
@click.option("-m", "--playlist", "playlists", multiple=True, type=_PATH,
              metavar="FILE", help="Text file naming one pcap per line (after any -r).")
@click.option("--speed", type=_RATE,
              help="Original timing, this many times faster.")
@click.option("--pps", type=_RATE,
              help="Constant rate in packets per second.")
@click.option("--mbps", type=_RATE,
              help="Constant rate in megabits per second.")
@click.option("--topspeed", is_flag=True, help="As fast as the interface takes frames.")
@click.option("--max-gap", type=_SECONDS, metavar="SEC",
              help="Original timing: shorten longer pauses to SEC seconds.")
@click.option("--loop", type=click.IntRange(min=0), default=1, show_default=True,
              help="Play the input N times; 0 = forever (see below).")
@click.option("--src-mac", callback=_mac, help="Rewrite the source MAC of every frame.")
@click.option("--dst-mac", callback=_mac, help="Rewrite the destination MAC of every frame.")
@click.option("--oversize", type=click.Choice(["skip", "fail"]), default="skip",
              show_default=True, help="Frames over the interface MTU: skip and count, or stop.")
@click.option("--stats-interval", type=_SECONDS, default=1.0, show_default=True,
              help="Seconds between progress lines; 0 for the summary only.")
@click.version_option(version("pcapvault"), "-V", "--version", prog_name=PROG)
def command(
    interface: str,
    dumpsets: tuple[str, ...],
    begin: str | None,
    end: str | None,
    expr: str,
    files: tuple[Path, ...],
    playlists: tuple[Path, ...],
    speed: float | None,
    pps: float | None,
    mbps: float | None,
    topspeed: bool,
    max_gap: float | None,
    loop: int,
    src_mac: bytes | None,
    dst_mac: bytes | None,
    oversize: str,
    stats_interval: float,
) -> int:
    """Replay recorded traffic onto an interface.

    Input is a dump-set window (-t DIR -b BEGIN -e END [-f FILTER]), selected exactly as
    npcapextract selects it, or pcap files (-r FILE ..., -m PLAYLIST), optionally filtered
    with -f. Frames leave through an AF_PACKET TX ring; progress and a summary (packets,
    bytes, rate, timing error against the schedule) go to stderr.
    """
    from .replay_engine import Replayer
    from .replay_pace import prepare_for_timing
    from .replay_tx import TxRing

    pace = _pace(speed, pps, mbps, topspeed, max_gap)
    source = _source(dumpsets, begin, end, expr, files, playlists)
    try:
        with TxRing(interface) as tx:
            report = Report(tx.ifname, pace.describe())
            rep = Replayer(tx, pace, src_mac=src_mac, dst_mac=dst_mac,
                           fail_oversize=oversize == "fail",
                           report=report.progress if stats_interval else None,
                           interval_ns=int(stats_interval * 1e9))
            report.rep = rep
            prepare_for_timing()
            stopped = _stop_on_signals(rep.stop)
            try:
                _play(rep, source, loop, bool(dumpsets))
            finally:
                _restore_signals()
            report.final(stopped[0])
    finally:
        source.close()
    return 0


def _play(rep: Replayer, source: DumpSetInput | FileInput, loop: int, dumpset: bool) -> None:
    """`loop` passes over `source` (0: until stopped); a pass with nothing to send ends it."""
    passes = 0
    while loop == 0 or passes < loop:
        offered = rep.play(source)
        passes += 1
        # The GC is off while replaying (prepare_for_timing); free any cycles between passes,
        # so that --loop 0 cannot grow for weeks. Only objects made since the start are seen.
        gc.collect()
        if rep.stop[0]:
            break
        if not offered:
            raise PcapVaultError(_nothing(dumpset, rep.counters))
    rep.finish()


def _pace(speed: float | None, pps: float | None, mbps: float | None, topspeed: bool,
          max_gap: float | None) -> Pace:
    from .replay_pace import NS, Pace

    chosen = [n for n, v in (("--speed", speed), ("--pps", pps), ("--mbps", mbps),
                             ("--topspeed", topspeed)) if v]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(chosen)} contradict each other; give one")
    if max_gap is not None and (pps or mbps or topspeed):
        raise click.UsageError("--max-gap applies to the original timing only")
    return Pace(speed=speed or 1.0, pps=pps, mbps=mbps, topspeed=topspeed,
                max_gap_ns=None if max_gap is None else int(max_gap * NS))


def _source(dumpsets: tuple[str, ...], begin: str | None, end: str | None, expr: str,
            files: tuple[Path, ...], playlists: tuple[Path, ...]) -> DumpSetInput | FileInput:
    from .replay_source import DumpSetInput, FileInput, read_playlist

    if dumpsets and (files or playlists):
        raise click.UsageError("give a dump set (-t) or pcap files (-r/-m), not both")
    if dumpsets:
        if begin is None or end is None:
            raise click.UsageError("a dump set needs a window: -b BEGIN -e END")
        from pcapvault.index.times import parse_window

        b_ns, e_ns = parse_window(begin, end)
        return DumpSetInput(list(dumpsets), b_ns, e_ns, expr, _warn)
    if begin is not None or end is not None:
        raise click.UsageError("-b/-e select a window of a dump set (-t)")
    paths = list(files)
    for pl in playlists:
        paths += read_playlist(pl)
    if not paths:
        raise click.UsageError("nothing to replay: give -t DIR -b BEGIN -e END, -r FILE or -m "
                               "PLAYLIST")
    return FileInput(paths, expr, _warn)


def _nothing(dumpset: bool, c: Counters) -> str:
    skipped = ""
    if c.oversize or c.runts:
        skipped = f" ({c.oversize} over the MTU and {c.runts} runts skipped)"
    if dumpset:
        return "nothing to replay: no packet of the dump set matched the window and filter" \
            + skipped
    return "nothing to replay: the input holds no sendable packet" + skipped


def _warn(msg: str) -> None:
    click.echo(f"{PROG}: warning: {msg}", err=True)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_saved: dict[int, object] = {}


def _stop_on_signals(stop: list[bool]) -> list[bool]:
    """SIGINT/SIGTERM end the replay between two sends; the summary is still printed."""
    stopped = [False]

    def handler(signum: int, frame: object) -> None:
        stop[0] = True
        stopped[0] = True

    for s in _SIGNALS:
        _saved[s] = signal.signal(s, handler)
    return stopped


def _restore_signals() -> None:
    for s, h in _saved.items():
        signal.signal(s, h)
    _saved.clear()


class Report:
    """Progress lines and the final summary on stderr, one line each."""

    def __init__(self, ifname: str, pace: str):
        self.ifname = ifname
        self.pace = pace
        self.rep: Replayer | None = None
        self._last = (0, 0, 0)  # time, packets, bytes at the previous progress line

    def progress(self, now: int) -> None:
        c = self.rep.counters
        t, p, b = self._last
        if not t:
            t = c.first_ns
        dt = max(now - t, 1) / 1e9
        self._last = (now, c.packets, c.bytes)
        click.echo(
            f"{PROG}: {self.ifname}: sent {c.packets} packets {human_size(c.bytes)}; "
            f"{(c.packets - p) / dt:.0f} pps {(c.bytes - b) * 8 / dt / 1e6:.1f} Mbps; "
            f"{self.rep.errors.summary()}",
            err=True,
        )

    def final(self, interrupted: bool) -> None:
        c = self.rep.counters
        secs = (c.last_ns - c.first_ns) / 1e9 if c.packets > 1 else 0.0
        rate = (f"{(c.packets - 1) / secs:.0f} pps {c.bytes * 8 / secs / 1e6:.1f} Mbps"
                if secs > 0 else "rate n/a")
        skipped = ""
        if c.oversize or c.runts:
            skipped = f"; skipped {c.oversize} over the MTU, {c.runts} runts"
        if c.refused_bytes:
            skipped += f"; the kernel refused {c.refused_bytes} bytes of frames"
        click.echo(
            f"{PROG}: {'interrupted' if interrupted else 'done'}: {self.ifname}: sent "
            f"{c.packets} packets ({c.bytes} bytes) in {secs:.3f} s at {self.pace}: {rate}; "
            f"{self.rep.errors.summary()}{skipped}",
            err=True,
        )


def main() -> None:
    """Entry point: `disk2n [CONF] [OPTIONS]`; every failure is one line on stderr."""
    try:
        args = expand_config_args(sys.argv[1:], command)
    except PcapVaultError as e:
        from pcapvault.index.cliutil import EXIT_USAGE, fail

        fail(PROG, str(e), EXIT_USAGE)
    from pcapvault.index.cliutil import exit_now

    try:
        run(command, PROG, args=args)
    except SystemExit as e:
        # Skipping the interpreter's teardown keeps the exit after SIGTERM well inside 0.1 s;
        # closing the TX ring already takes the kernel a good part of that (docs/BENCHMARKS.md,
        # D5 and R2).
        exit_now(e.code)


if __name__ == "__main__":
    main()

