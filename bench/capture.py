"""Capture benchmark: the recorder against tcpdump, dumpcap, netsniff-ng and pcapy-ng.

Traffic is fixed-size UDP frames from trafgen on a veth pair whose ends live in two network
namespaces created (and always removed) here; nothing leaves the machine. Two measurements:

rate   trafgen sends N frames as fast as one core can; each consumer records them in the
       other namespace. Reported: packets offered (reached the capture interface), written
       (records counted in the output files), dropped (the tool's own count), and CPU seconds
       per million packets of the whole process tree (the recorder's indexer included),
       taken from wait4() rusage minus a baseline sampled after a warm-up burst, so start-up
       imports are not counted but closing and indexing the last file is.
drain  the consumer's ceiling, independent of the generator: SIGSTOP it, fill its 1 GiB ring
       with a burst, SIGCONT it and time until it goes idle: packets written / seconds.

    python bench/capture.py                      # full run, 3 repetitions (about 15 min)
    python bench/capture.py --quick              # 1 repetition, smaller bursts
    python bench/capture.py --sizes 64 --tools recorder,tcpdump --only drain

Needs root (namespaces), trafgen and netsniff-ng (Debian netsniff-ng), tcpdump, dumpcap,
pcapy-ng for the libpcap-from-Python peer. Data goes to /tmp/pv-bench and is deleted.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from netns import VethPair, veth_pair  # noqa: E402

WORK = Path("/tmp/pv-bench")
SNAPLEN = 1536
TICK = os.sysconf("SC_CLK_TCK")
# Frames in a burst: what a 1 GiB TPACKET_V3 ring holds with room to spare (a 64-byte frame
# takes a 152-byte slot, a 1000-byte one 1088 bytes).
DRAIN_BURST = {64: 4_000_000, 1000: 700_000}
RATE_PACKETS = {64: 3_000_000, 1000: 2_000_000}


# --- consumers ---------------------------------------------------------------------------------


@dataclass
class Tool:
    name: str
    argv: Callable[[str, Path, int], list[str]]  # (interface, output dir, ring MB)
    ready: str  # printed once it captures
    drops: Callable[[str], int | None]  # from its output at exit
    stop: int = signal.SIGINT
    sizes: tuple[int, ...] = (64, 1000)


def _recorder_drops(out: str) -> int | None:
    m = re.search(r"final: received \d+ dropped (\d+)", out)
    return int(m.group(1)) if m else None


def _tcpdump_drops(out: str) -> int | None:
    m = re.search(r"(\d+) packets? dropped by kernel", out)
    return int(m.group(1)) if m else None


def _dumpcap_drops(out: str) -> int | None:
    m = re.search(r"Packets received/dropped on interface '[^']*': \d+/(\d+)", out)
    return int(m.group(1)) if m else None


def _netsniff_drops(out: str) -> int | None:
    # "N packets incoming (U unread on exit)", "N packets passed filter",
    # "N packets failed filter (out of space)"; the kernel's ring drops are incoming - passed.
    inc = re.search(r"(\d+)\s+packets incoming", out)
    passed = re.search(r"(\d+)\s+packets passed filter", out)
    if not (inc and passed):
        return None
    return int(inc.group(1)) - int(passed.group(1))


def _pcapy_drops(out: str) -> int | None:
    m = re.search(r"pcapy: received \d+ dropped (\d+)", out)
    return int(m.group(1)) if m else None


def _recorder(extra: list[str], exe: str | None = None
              ) -> Callable[[str, Path, int], list[str]]:
    exe = exe or shutil.which("recorder") or "recorder"
    return lambda i, d, mb: [exe, "-i", i, "-o", str(d), "-b", str(mb), "-s", str(SNAPLEN),
                             "--disk-limit", "40GB", *extra]


TOOLS = {
    "recorder": Tool("recorder", _recorder([]), "recording ", _recorder_drops, signal.SIGTERM),
    "recorder -r": Tool("recorder -r", _recorder(["-r"]), "recording ", _recorder_drops,
                        signal.SIGTERM, sizes=(1000,)),
    "recorder --compress": Tool("recorder --compress", _recorder(["--compress"]), "recording ",
                                _recorder_drops, signal.SIGTERM),
    "tcpdump": Tool("tcpdump", lambda i, d, mb: [
        "tcpdump", "-i", i, "-w", str(d / "out.pcap"), "-s", str(SNAPLEN), "-B", str(mb * 1024),
        "-n"], "listening on", _tcpdump_drops),
    "dumpcap": Tool("dumpcap", lambda i, d, mb: [
        "dumpcap", "-i", i, "-w", str(d / "out.pcap"), "-P", "-s", str(SNAPLEN), "-B", str(mb)],
        "Capturing on", _dumpcap_drops),
    "netsniff-ng": Tool("netsniff-ng", lambda i, d, mb: [
        "netsniff-ng", "--in", i, "--out", str(d / "out.pcap"), "-s", "-S", f"{mb}MiB",
        "-T", "0xa1b2c3d4"], "Running!", _netsniff_drops),
    "pcapy-ng": Tool("pcapy-ng", lambda i, d, mb: [
        sys.executable, str(Path(__file__).resolve()), "--pcapy-consumer", i,
        str(d / "out.pcap"), str(mb)], "pcapy: capturing", _pcapy_drops, signal.SIGTERM),
}


def pcapy_consumer(iface: str, out: str, mb: int) -> None:
    """libpcap from Python the fast way pcapy-ng offers: next_batch, then one write per batch.

    next_batch gives (sec, usec, offset, caplen) per packet: no nanoseconds and no wire
    length, so the files it can write are microsecond pcaps with wire length = caplen.
    """
    import pcapy

    cap = pcapy.create(iface)
    cap.set_snaplen(SNAPLEN)
    cap.set_promisc(1)
    cap.set_timeout(50)
    cap.set_buffer_size(mb << 20)
    cap.activate()
    cap.setnonblock(1)
    poller = select.poll()
    poller.register(cap.getfd(), select.POLLIN)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rec = struct.Struct("<IIII").pack
    with open(out, "wb", buffering=0) as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, 1))
        print("pcapy: capturing", file=sys.stderr, flush=True)
        while not stop:
            pkts, meta = cap.next_batch(4096)
            if not meta:
                poller.poll(100)
                continue
            parts = []
            for sec, usec, off, cl in struct.iter_unpack("=IIII", meta):
                parts.append(rec(sec, usec, cl, cl))
                parts.append(pkts[off : off + cl])
            f.write(b"".join(parts))
    recv, drop, _ifdrop = cap.stats()
    print(f"pcapy: received {recv} dropped {drop}", file=sys.stderr, flush=True)


# --- processes and CPU -------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(p))
    return kids


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants, plus the children they already reaped."""
    kids = _children()
    todo, total = [pid], 0.0
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime stime cutime cstime are fields 14..17 (index 11..14 after the comm)
            total += sum(int(x) for x in fields[11:15]) / TICK
        except (OSError, IndexError, ValueError):
            continue
        todo.extend(kids.get(p, []))
    return total


def own_cpu(pid: int) -> float:
    """CPU seconds of `pid` alone (all its threads), without its children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def run_ns(pid: int) -> int:
    """Nanoseconds the process (all threads) has run, to find when it goes idle."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        pass
    return total


class Consumer:
    """One capture tool running in the receive namespace; output collected for its stats."""

    def __init__(self, tool: Tool, pair: VethPair, outdir: Path, ring_mb: int):
        self.tool = tool
        self.cmd = tool.argv(pair.rx, outdir, ring_mb)
        self.proc = pair.run_rx(*self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        self.out: list[str] = []
        self.ready = threading.Event()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        if not self.ready.wait(30) or self.proc.poll() is not None:
            self.kill()
            raise RuntimeError(f"{tool.name} did not start: {self.cmd}\n{self.text}")
        self.cpu = 0.0

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            if self.tool.ready in line:
                self.ready.set()
        self.ready.set()

    @property
    def text(self) -> str:
        return "".join(self.out)

    def finish(self) -> float:
        """Stop the tool, wait for it; return the CPU seconds of its whole tree (rusage)."""
        os.kill(self.proc.pid, self.tool.stop)
        deadline = time.monotonic() + 120
        while True:
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.tool.name} did not stop")
            time.sleep(0.02)
        self.pump.join(5)
        return ru.ru_utime + ru.ru_stime

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# --- traffic -----------------------------------------------------------------------------------


def trafgen_conf(size: int) -> Path:
    """A fixed UDP frame of `size` bytes (without FCS)."""
    path = WORK / f"udp{size}.cfg"
    path.write_text(
        "{ eth(da=02:00:00:00:00:02, sa=02:00:00:00:00:01), "
        "ipv4(saddr=10.0.0.1, daddr=10.0.0.2), udp(sp=4000, dp=5000), "
        f"fill(0xab, {size - 42}) }}\n"
    )
    return path


def send(pair: VethPair, conf: Path, count: int) -> tuple[int, float]:
    """trafgen `count` frames on one core, as fast as it goes; (frames sent, seconds)."""
    t = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", pair.tx_ns, "trafgen", "--dev", pair.tx,
                        "--conf", str(conf), "-P1", "-n", str(count)],
                       capture_output=True, text=True)
    dt = time.monotonic() - t
    m = re.search(r"(\d+) packets outgoing", r.stdout + r.stderr)
    if r.returncode or not m:
        raise RuntimeError(f"trafgen failed: {r.stdout}\n{r.stderr}")
    return int(m.group(1)), dt


def rx_counter(pair: VethPair, name: str) -> int:
    r = subprocess.run(["ip", "netns", "exec", pair.rx_ns, "cat",
                        f"/sys/class/net/{pair.rx}/statistics/{name}"],
                       capture_output=True, text=True, check=True)
    return int(r.stdout)


def count_records(outdir: Path) -> int:
    """Records in every pcap under `outdir` (real files only: the timeline holds symlinks)."""
    total = 0
    rec = struct.Struct("<I").unpack_from
    for root, _dirs, files in os.walk(outdir):
        for name in files:
            p = Path(root) / name
            if name.endswith(".pcap.zst") and not p.is_symlink():
                from pcapvault.index.pcapfile import PcapReader

                with PcapReader(p) as r:
                    total += len(r.scan())
                continue
            if p.is_symlink() or not (name.endswith(".pcap") or name.endswith(".part")):
                continue
            size = p.stat().st_size
            if size <= 24:
                continue
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                pos, n = 24, 0
                while pos + 16 <= size:
                    pos += 16 + rec(m, pos + 8)[0]
                    n += 1
                if pos > size:
                    n -= 1  # torn last record
            total += n
    return total


# --- measurements ------------------------------------------------------------------------------


@dataclass
class Result:
    tool: str
    size: int
    offered: int = 0
    sent: int = 0
    rate_mpps: float = 0.0
    written: int = 0
    dropped: int | None = None
    cpu: float = 0.0
    own: float = 0.0  # the capture process alone, while the traffic ran
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def us_per_pkt(self) -> float:
        return self.cpu / self.written * 1e6 if self.written else float("nan")

    @property
    def mpps(self) -> float:
        return self.written / self.seconds / 1e6 if self.seconds else float("nan")


WARMUP = 2000


def _start(tool: Tool, pair: VethPair, size: int, ring_mb: int, tag: str
           ) -> tuple[Consumer, Path, Path]:
    outdir = WORK / f"{tag}-{tool.name.replace(' ', '')}-{size}"
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    conf = trafgen_conf(size)
    c = Consumer(tool, pair, outdir, ring_mb)
    # Warm-up: the first packets and, for the recorder, the first file closed and indexed, so
    # one-time imports are not charged to the measured traffic.
    send(pair, conf, WARMUP)
    if tool.name.startswith("recorder"):
        time.sleep(0.3)
        os.kill(c.proc.pid, signal.SIGUSR1)
        time.sleep(1.5)
    else:
        time.sleep(0.5)
    return c, outdir, conf


def measure_rate(tool: Tool, pair: VethPair, size: int, count: int, ring_mb: int) -> Result:
    c, outdir, conf = _start(tool, pair, size, ring_mb, "rate")
    try:
        base, own0 = tree_cpu(c.proc.pid), own_cpu(c.proc.pid)
        rx0 = rx_counter(pair, "rx_packets")
        sent, dt = send(pair, conf, count)
        offered = rx_counter(pair, "rx_packets") - rx0
        time.sleep(1.0)
        own = own_cpu(c.proc.pid) - own0
        cpu = c.finish() - base
    finally:
        c.kill()
    res = Result(tool.name, size, offered=offered, sent=sent, rate_mpps=sent / dt / 1e6,
                 cpu=cpu, own=own, seconds=dt)
    res.written = count_records(outdir) - WARMUP
    res.dropped = tool.drops(c.text)
    if c.proc.returncode not in (0, None):
        res.notes.append(f"exit {c.proc.returncode}")
    shutil.rmtree(outdir, ignore_errors=True)
    return res


def measure_drain(tool: Tool, pair: VethPair, size: int, burst: int) -> Result:
    c, outdir, conf = _start(tool, pair, size, 1024, "drain")
    try:
        pid = c.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            sent, _ = send(pair, conf, burst)
            time.sleep(0.2)  # let the last ring block retire
            cpu0 = tree_cpu(pid)
            run0 = run_ns(pid)
        finally:
            os.kill(pid, signal.SIGCONT)
        t0 = time.monotonic()
        last_busy, last_run, now = t0, run0, t0
        # Done when the consumer has not run for more than 2% of a 200 ms window.
        while now - last_busy < 0.2 and now - t0 < 120:
            time.sleep(0.004)
            now = time.monotonic()
            r = run_ns(pid)
            if r - last_run > 0.5 * 4e6:
                last_busy = now
            last_run = r
        seconds = last_busy - t0
        cpu = tree_cpu(pid) - cpu0
        c.finish()
    finally:
        c.kill()
    res = Result(tool.name, size, sent=sent, cpu=cpu, seconds=seconds)
    res.written = count_records(outdir) - WARMUP
    res.dropped = tool.drops(c.text)
    shutil.rmtree(outdir, ignore_errors=True)
    return res


# --- report ------------------------------------------------------------------------------------


def _med(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]
    return statistics.median(vals) if vals else float("nan")


def _fmt_int(v: float) -> str:
    return "-" if v != v else f"{int(round(v)):,}"


def rate_table(results: dict[tuple[int, str], list[Result]]) -> str:
    lines = [
        "| frame | consumer | offered Mpps | offered | written | kept | dropped (tool) "
        "| CPU us/pkt | capture process us/pkt | runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, name), rs in results.items():
        drops = [r.dropped for r in rs if r.dropped is not None]
        own = _med([r.own / r.written * 1e6 if r.written else float("nan") for r in rs])
        kept = _med([r.written / r.offered * 100 if r.offered else float("nan") for r in rs])
        lines.append(
            f"| {size} B | {name} | {_med([r.rate_mpps for r in rs]):.3f} "
            f"| {_fmt_int(_med([r.offered for r in rs]))} "
            f"| {_fmt_int(_med([r.written for r in rs]))} | {kept:.1f}% "
            f"| {_fmt_int(_med(drops)) if drops else '?'} "
            f"| {_med([r.us_per_pkt for r in rs]):.3f} | {own:.3f} | {len(rs)} |"
        )
    return "\n".join(lines)


def drain_table(results: dict[tuple[int, str], list[Result]]) -> str:
    lines = [
        "| frame | consumer | burst | written | dropped (tool) | drain Mpps | drain Gbit/s "
        "| CPU us/pkt | runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, name), rs in results.items():
        drops = [r.dropped for r in rs if r.dropped is not None]
        mpps = _med([r.mpps for r in rs])
        lines.append(
            f"| {size} B | {name} | {_fmt_int(_med([r.sent for r in rs]))} "
            f"| {_fmt_int(_med([r.written for r in rs]))} "
            f"| {_fmt_int(_med(drops)) if drops else '?'} | {mpps:.2f} "
            f"| {mpps * size * 8 / 1000:.2f} | {_med([r.us_per_pkt for r in rs]):.3f} "
            f"| {len(rs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,1000", help="frame sizes in bytes [64,1000]")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help=f"consumers, comma-separated [{','.join(TOOLS)}]")
    ap.add_argument("--only", choices=("rate", "drain"), help="run one of the two measurements")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration [3]")
    ap.add_argument("--quick", action="store_true", help="1 run, bursts and counts / 4")
    ap.add_argument("--ring-mb", type=int, default=128, help="ring size for the rate runs [128]")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply packet counts")
    ap.add_argument("--base-recorder", metavar="PATH",
                    help="another build's recorder (e.g. a venv of the previous commit), "
                         "measured as the tool 'recorder-base' in the same run")
    ap.add_argument("--pcapy-consumer", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.pcapy_consumer:
        pcapy_consumer(a.pcapy_consumer[0], a.pcapy_consumer[1], int(a.pcapy_consumer[2]))
        return
    if os.geteuid() != 0:
        sys.exit("bench/capture.py needs root (network namespaces, raw sockets)")
    scale = a.scale * (0.25 if a.quick else 1.0)
    repeat = 1 if a.quick else a.repeat
    sizes = [int(s) for s in a.sizes.split(",")]
    if a.base_recorder:
        TOOLS["recorder-base"] = Tool("recorder-base", _recorder([], a.base_recorder),
                                      "recording ", _recorder_drops, signal.SIGTERM)
    tools = [TOOLS[t.strip()] for t in a.tools.split(",")]
    WORK.mkdir(parents=True, exist_ok=True)
    rate: dict[tuple[int, str], list[Result]] = {}
    drain: dict[tuple[int, str], list[Result]] = {}
    try:
        with veth_pair() as pair:
            for size in sizes:
                for rep in range(repeat):
                    # Interleave the tools within each repetition, so a noisy neighbour
                    # spreads over all of them rather than hitting one.
                    for tool in tools:
                        if size not in tool.sizes:
                            continue
                        if a.only in (None, "rate"):
                            r = measure_rate(tool, pair, size, int(RATE_PACKETS[size] * scale),
                                             a.ring_mb)
                            rate.setdefault((size, tool.name), []).append(r)
                            print(f"rate  {size:5d} {tool.name:12s} run {rep + 1}: offered "
                                  f"{r.offered} written {r.written} dropped {r.dropped} "
                                  f"{r.us_per_pkt:.3f} us/pkt {' '.join(r.notes)}",
                                  file=sys.stderr, flush=True)
                        if a.only in (None, "drain"):
                            r = measure_drain(tool, pair, size, int(DRAIN_BURST[size] * scale))
                            drain.setdefault((size, tool.name), []).append(r)
                            print(f"drain {size:5d} {tool.name:12s} run {rep + 1}: "
                                  f"{r.written} in {r.seconds:.3f}s = {r.mpps:.2f} Mpps, "
                                  f"dropped {r.dropped}, {r.us_per_pkt:.3f} us/pkt",
                                  file=sys.stderr, flush=True)
    finally:
        for p in WORK.glob("*-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    if rate:
        print("\nRate (trafgen on one core, as fast as it goes):\n")
        print(rate_table(rate))
    if drain:
        print("\nDrain of a full 1 GiB ring:\n")
        print(drain_table(drain))


if __name__ == "__main__":
    main()
