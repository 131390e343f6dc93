"""Replay benchmark: disk2n against tcpreplay on the same veth pair, the same pcaps, the same run.

A veth pair whose ends live in two network namespaces created (and always removed) here;
nothing leaves the machine. Runs alternate between the two tools, so a noisy neighbour hurts
both alike, and every figure is the median over the repetitions.

topspeed  `disk2n --topspeed` and `tcpreplay --topspeed -K` (pcap preloaded) send the same
          pcap (64-byte frames, and an IMIX-like mix) several times over. The rate is taken
          on the receiving side, independent of either tool's own report: the peer's
          rx_packets counter is sampled every 2 ms and the rate is the slope between the
          moments 10% and 90% of the frames had arrived (start-up and the tail excluded).
timing    both tools replay a pcap of 64-byte frames exactly 100 us apart (10 kpps) with the
          original timing into the recorder on the other end. Each frame carries its number;
          its error is (received - original) minus the median of that difference over the
          run (the schedule's zero point is arbitrary), taken from the recorder's kernel
          timestamps. Reported: median, p99 and max of |error|, plus disk2n's own figures.

    python bench/replay.py                 # 5 repetitions (about 4 minutes)
    python bench/replay.py --repeat 3 --timing-packets 20000

Needs root (namespaces) and tcpreplay (Debian tcpreplay). Data goes to /tmp/pv-bench-replay
and is deleted.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netns import VethPair, veth_pair  # noqa: E402
from recorderproc import RecorderProc, recorded_frames, tool  # noqa: E402

from pcapvault.index.pcapfile import global_header  # noqa: E402

WORK = Path("/tmp/pv-bench-replay")
NS = 1_000_000_000
T0 = 1_763_730_000 * NS
# Ethernet + IPv4 + UDP header of every synthetic frame; the frame number follows at 42.
HEAD = bytes.fromhex(
    "020000000002" "020000000001" "0800"
    "4500002e00004000401100000a0000010a000002" "0fa01388001a0000"
)
IMIX = (64, 64, 64, 64, 64, 64, 64, 590, 590, 590, 590, 1514)
TOOLS = ("disk2n", "tcpreplay")


def synth_pcap(path: Path, n: int, sizes: tuple[int, ...], gap_ns: int) -> None:
    """n UDP frames numbered at byte 42, sizes cycling through `sizes`, `gap_ns` apart."""
    size = np.resize(np.array(sizes, np.int64), n)
    rec = size + 16
    end = np.cumsum(rec)
    start = end - rec
    buf = np.zeros(int(end[-1]), np.uint8)
    ts = T0 + np.arange(n, dtype=np.int64) * gap_ns
    hdr = np.empty((n, 4), "<u4")
    hdr[:, 0], hdr[:, 1] = ts // NS, ts % NS
    hdr[:, 2] = hdr[:, 3] = size
    rows = np.add.outer(start, np.arange(16))
    buf[rows] = hdr.view(np.uint8).reshape(n, 16)
    rows = np.add.outer(start + 16, np.arange(len(HEAD)))
    buf[rows] = np.frombuffer(HEAD, np.uint8)
    seq = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    buf[np.add.outer(start + 16 + 42, np.arange(4))] = seq
    with open(path, "wb") as f:
        f.write(global_header(1, 65535, True))
        f.write(buf.tobytes())


# --- sending ------------------------------------------------------------------------------


def sender(pair: VethPair, name: str, pcap: Path, *mode: str, loops: int = 1) -> list[str]:
    """Command line of one tool replaying `pcap` `loops` times."""
    if name == "disk2n":
        cmd = [tool("disk2n"), "-i", pair.tx, "-r", str(pcap), "--loop", str(loops),
               "--stats-interval", "0", *mode]
    else:
        tcpmode = ["--topspeed", "-K"] if "--topspeed" in mode else []
        cmd = ["tcpreplay", "-q", "-i", pair.tx, "--loop", str(loops), *tcpmode, str(pcap)]
    return ["ip", "netns", "exec", pair.tx_ns, *cmd]


class RxCounter:
    """Samples the receiving end's rx_packets, read through /proc/PID/net/dev of a process
    living in that namespace (no fork per sample)."""

    def __init__(self, pair: VethPair):
        self.pair = pair
        self.holder = pair.run_rx("sleep", "3600")
        time.sleep(0.05)
        self.path = f"/proc/{self.holder.pid}/net/dev"
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()

    def count(self) -> int:
        with open(self.path) as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == self.pair.rx:
                    return int(rest.split()[1])
        raise RuntimeError(f"{self.pair.rx} not found in {self.path}")

    def start(self) -> None:
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.count()))
            time.sleep(0.002)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.monotonic(), self.count()))
        return self.samples

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


def steady_rate(samples: list[tuple[float, int]]) -> tuple[float, int]:
    """(packets per second between 10% and 90% of the arrivals, packets arrived)."""
    t = np.array([s[0] for s in samples])
    c = np.array([s[1] for s in samples], np.int64)
    c -= c[0]
    total = int(c[-1])
    lo, hi = np.searchsorted(c, 0.1 * total), np.searchsorted(c, 0.9 * total)
    if hi <= lo or t[hi] <= t[lo]:
        return 0.0, total
    return float((c[hi] - c[lo]) / (t[hi] - t[lo])), total


def topspeed_run(pair: VethPair, rx: RxCounter, name: str, pcap: Path, loops: int,
                 expect: int) -> tuple[float, float]:
    """(steady packets per second at the receiver, CPU microseconds per packet sent)."""
    rx.start()
    p = subprocess.Popen(sender(pair, name, pcap, "--topspeed", loops=loops),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    samples = rx.stop()
    if p.returncode != 0:
        raise SystemExit(f"{name} failed: {err.strip()}")
    rate, got = steady_rate(samples)
    if got != expect:
        print(f"  warning: {name}: {got} of {expect} frames arrived", file=sys.stderr)
    return rate, (usage.ru_utime + usage.ru_stime) / expect * 1e6


def topspeed(pair: VethPair, pcaps: dict[str, Path], repeat: int, packets: int,
             loops: int) -> None:
    rx = RxCounter(pair)
    try:
        for label, pcap in pcaps.items():
            rates: dict[str, list[float]] = {t: [] for t in TOOLS}
            cpu: dict[str, list[float]] = {t: [] for t in TOOLS}
            for i in range(repeat):
                for t in TOOLS if i % 2 == 0 else TOOLS[::-1]:
                    r, c = topspeed_run(pair, rx, t, pcap, loops, packets * loops)
                    rates[t].append(r)
                    cpu[t].append(c)
            med = {t: statistics.median(rates[t]) for t in TOOLS}
            for t in TOOLS:
                runs = ", ".join(f"{r:,.0f}" for r in rates[t])
                print(f"topspeed {label} {t}: {med[t]:,.0f} pps (runs {runs}); CPU "
                      f"{statistics.median(cpu[t]):.2f} us/packet", flush=True)
            print(f"topspeed {label}: disk2n / tcpreplay = "
                  f"{med['disk2n'] / med['tcpreplay']:.2f}x", flush=True)
    finally:
        rx.close()


# --- timing -------------------------------------------------------------------------------


def timing_run(pair: VethPair, name: str, pcap: Path, n: int, gap_ns: int,
               work: Path) -> tuple[dict[str, float], str]:
    ds = work / f"ds-{name}"
    shutil.rmtree(ds, ignore_errors=True)
    rec = RecorderProc(pair, ds, "--disk-limit", "1GB", "-b", "64")
    r = subprocess.run(sender(pair, name, pcap), capture_output=True, text=True)
    time.sleep(0.3)
    rec.stop()
    if r.returncode != 0:
        raise SystemExit(f"{name} failed: {r.stderr.strip()}")
    frames = recorded_frames(ds)
    shutil.rmtree(ds, ignore_errors=True)
    seq = np.array([struct.unpack_from(">I", f, 42)[0] for _, f, _ in frames if len(f) >= 46])
    rx = np.array([t for t, f, _ in frames if len(f) >= 46], np.int64)
    ok = seq < n
    seq, rx = seq[ok], rx[ok]
    diff = rx - seq.astype(np.int64) * gap_ns
    err = np.abs(diff - int(np.median(diff)))
    return {
        "received": len(seq),
        "median": float(np.median(err)) / 1e3,
        "p99": float(np.percentile(err, 99)) / 1e3,
        "max": float(err.max()) / 1e3,
    }, r.stderr.strip()


_OWN = re.compile(r"median ([\d.]+) (us|ms) p99 ([\d.]+) (us|ms) max ([\d.]+) (us|ms)")


def own_figures(summary: str) -> tuple[float, float, float] | None:
    """disk2n's own timing error line, in microseconds."""
    m = _OWN.search(summary)
    if not m:
        return None
    v = [float(m.group(i)) * (1000 if m.group(i + 1) == "ms" else 1) for i in (1, 3, 5)]
    return v[0], v[1], v[2]


# --- main ---------------------------------------------------------------------------------


def timing(pair: VethPair, pcap: Path, repeat: int, packets: int, gap_ns: int) -> None:
    res: dict[str, list[dict[str, float]]] = {t: [] for t in TOOLS}
    own: list[tuple[float, float, float]] = []
    for i in range(repeat):
        for t in TOOLS if i % 2 == 0 else TOOLS[::-1]:
            figures, stderr = timing_run(pair, t, pcap, packets, gap_ns, WORK)
            res[t].append(figures)
            if t == "disk2n" and own_figures(stderr):
                own.append(own_figures(stderr))
    for t in TOOLS:
        m = {k: statistics.median(r[k] for r in res[t]) for k in res[t][0]}
        runs = ", ".join(f"{r['p99']:.1f}" for r in res[t])
        print(f"timing 10 kpps {t}: |error| median {m['median']:.1f} us, p99 {m['p99']:.1f} us "
              f"(runs {runs}), max {m['max']:.1f} us; received {m['received']:.0f} of "
              f"{packets}", flush=True)
    if own:
        o = [statistics.median(x[k] for x in own) for k in range(3)]
        print(f"timing 10 kpps disk2n, own report (send returned vs schedule): median "
              f"{o[0]:.1f} us, p99 {o[1]:.1f} us, max {o[2]:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--top-packets", type=int, default=200_000,
                    help="frames in the top-speed pcaps (each run plays them --top-loops times)")
    ap.add_argument("--top-loops", type=int, default=5)
    ap.add_argument("--timing-packets", type=int, default=20_000)
    ap.add_argument("--only", choices=["topspeed", "timing"])
    a = ap.parse_args()
    if not shutil.which("tcpreplay"):
        raise SystemExit("tcpreplay is not installed (apt-get install tcpreplay)")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    try:
        pcaps = {"64 B": WORK / "top64.pcap", "IMIX": WORK / "topimix.pcap"}
        synth_pcap(pcaps["64 B"], a.top_packets, (64,), 1000)
        synth_pcap(pcaps["IMIX"], a.top_packets, IMIX, 1000)
        gap = NS // 10_000
        timed = WORK / "timing10k.pcap"
        synth_pcap(timed, a.timing_packets, (64,), gap)
        with veth_pair(mtu=1500) as pair:
            if a.only != "timing":
                topspeed(pair, pcaps, a.repeat, a.top_packets, a.top_loops)
            if a.only != "topspeed":
                timing(pair, timed, a.repeat, a.timing_packets, gap)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
