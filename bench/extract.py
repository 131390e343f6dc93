"""Extraction benchmark: npcapextract against tcpdump -r over the same files.

Builds (once, reused when present) a dump set holding one hour of synthetic traffic, at least
5 GB by default, in the recorder's layout (256 MB files closed at 10-minute slot boundaries,
each indexed and linked into the timeline), then times

  (a) selective: one host over a 10-minute window inside the hour, against tcpdump over the
      files that overlap the window (what an operator without an index would read);
  (b) broad: `tcp` over the whole hour, against tcpdump over every file;
  (c) the count of (a) with -l -v (no packet written).

Each case runs REPEAT times with the page cache dropped before every run when the machine
allows it (root) and the programs (Python, numpy, tcpdump) loaded again, and reports the median
wall time and the bytes the process read from disk (rusage ru_inblock, so cached reads do not
count).

    python bench/extract.py [--dir /work/bench-data] [--gb 5] [--repeat 3] [--keep]

Traffic: 4,000 hosts in 10.0.0.0/12 with Zipf-like popularity, 60,000 flows (TCP 85%, UDP
13%, ICMP and ARP the rest; 5% of frames VLAN tagged), packet sizes from a mix of ACK-sized,
mid-sized and full-MTU frames. Generated with numpy: headers are built as a matrix and
scattered into each file's buffer in one operation; payload bytes are zero.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.pcapfile import global_header
from pcapvault.recorder.indexer import index_and_link

NS = 1_000_000_000
HOUR_START = 1763730000  # 2025-11-21T13:00:00Z, a slot boundary
FILE_BYTES = 256 << 20
HDR = 16 + 14 + 20 + 20  # record header + Ethernet + IPv4 + TCP/UDP (UDP uses 8 of 20)


def synth_hour(total_bytes: int, seed: int = 1) -> tuple:
    rng = np.random.default_rng(seed)
    nhosts, nflows = 4000, 60000
    # sizes: 40% ACK-sized, 25% mid, 35% full MTU
    kind = rng.choice(3, p=[0.40, 0.25, 0.35], size=8_000_000)
    wire = np.where(kind == 0, 66, np.where(kind == 1, rng.integers(100, 1000, kind.size), 1514))
    n = int(np.searchsorted(np.cumsum(wire + 16), total_bytes)) + 1
    wire = wire[:n]
    ts = np.sort(rng.integers(0, 3600 * NS, n)) + HOUR_START * NS
    # flows: endpoints drawn from a skewed host popularity
    pop = 1.0 / np.arange(1, nhosts + 1) ** 0.9
    pop /= pop.sum()
    a = rng.choice(nhosts, size=nflows, p=pop)
    b = rng.choice(nhosts, size=nflows, p=pop)
    proto = rng.choice([6, 17, 1], p=[0.85, 0.13, 0.02], size=nflows)
    sport = rng.integers(1024, 65535, nflows)
    dport = rng.choice([80, 443, 22, 53, 123, 8080, 3306, 25], size=nflows)
    fpop = 1.0 / np.arange(1, nflows + 1) ** 0.8
    fpop /= fpop.sum()
    flow = rng.choice(nflows, size=n, p=fpop)
    swap = rng.random(n) < 0.5
    return ts, wire, flow, swap, a, b, proto, sport, dport


def host_ip(h: np.ndarray) -> np.ndarray:
    return (10 << 24) + (h // 250 << 8) + (h % 250) + 1


def build(root: Path, gb: float) -> DumpSet:
    ts, wire, flow, swap, fa, fb, fproto, fsport, fdport = synth_hour(int(gb * 1e9))
    ds = DumpSet.create(root, interface="bench0", linktype=1, snaplen=1536, nanosecond=True)
    n = len(ts)
    slot = (ts // NS - HOUR_START) // 600
    i = 0
    k = 0
    while i < n:
        # a file ends at 256 MB or at the slot boundary, whichever comes first
        j = int(np.searchsorted(slot, slot[i], side="right"))
        cum = np.cumsum(wire[i:j] + 16)
        j = i + max(1, int(np.searchsorted(cum, FILE_BYTES)))
        write_file(ds, k, ts[i:j], wire[i:j], flow[i:j], swap[i:j], fa, fb, fproto, fsport,
                   fdport)
        i = j
        k += 1
    return ds


def write_file(ds, k, ts, wire, flow, swap, fa, fb, fproto, fsport, fdport) -> None:
    m = len(ts)
    src = np.where(swap, fb[flow], fa[flow])
    dst = np.where(swap, fa[flow], fb[flow])
    proto = fproto[flow]
    sp = np.where(swap, fdport[flow], fsport[flow])
    dp = np.where(swap, fsport[flow], fdport[flow])
    vlan = (flow % 20) == 0
    cap = wire.copy()
    h = np.zeros((m, HDR + 4), np.uint8)
    rec = h[:, :16].view("<u4")
    rec[:, 0] = ts // NS
    rec[:, 1] = ts % NS
    eoff = 16
    h[:, eoff : eoff + 6] = (0, 0x16, 0x3E, 1, 2, 3)
    h[:, eoff + 6 : eoff + 12] = (0, 0x16, 0x3E, 4, 5, 6)
    # VLAN frames get 4 more header bytes: shift their layer 3 by building two layouts
    out = np.zeros((m, HDR + 4), np.uint8)
    for tagged in (False, True):
        s = vlan == tagged
        if not s.any():
            continue
        g = h[s].copy()
        l2 = eoff + 12
        if tagged:
            g[:, l2 : l2 + 4] = (0x81, 0x00, 0, 100)
            l2 += 4
        is_arp = (proto[s] == 1) & (flow[s] % 7 == 0)
        et = np.where(is_arp, 0x0806, 0x0800)
        g[:, l2] = et >> 8
        g[:, l2 + 1] = et & 0xFF
        ip = l2 + 2
        w = wire[s] - 14
        g[:, ip] = 0x45
        g[:, ip + 2] = (w >> 8) & 0xFF
        g[:, ip + 3] = w & 0xFF
        g[:, ip + 8] = 64
        g[:, ip + 9] = proto[s]
        sa = host_ip(src[s]).astype(">u4").view(np.uint8).reshape(-1, 4)
        da = host_ip(dst[s]).astype(">u4").view(np.uint8).reshape(-1, 4)
        g[:, ip + 12 : ip + 16] = sa
        g[:, ip + 16 : ip + 20] = da
        l4 = ip + 20
        g[:, l4] = sp[s] >> 8
        g[:, l4 + 1] = sp[s] & 0xFF
        g[:, l4 + 2] = dp[s] >> 8
        g[:, l4 + 3] = dp[s] & 0xFF
        g[:, l4 + 12] = np.where(proto[s] == 6, 0x50, 0)
        g[:, l4 + 13] = np.where(proto[s] == 6, 0x10, 0)
        out[s] = g
        if tagged:
            cap[s] = wire[s] + 4
    cap = np.minimum(cap, 1536)
    rec = out[:, :16].view("<u4")
    rec[:, 2] = cap
    rec[:, 3] = np.where(vlan, wire + 4, wire)
    size = 24 + int((cap + 16).sum())
    buf = np.zeros(size, np.uint8)
    buf[:24] = np.frombuffer(global_header(1, 1536, True), np.uint8)
    offs = 24 + np.concatenate([[0], np.cumsum(cap[:-1] + 16)])
    width = np.minimum(cap + 16, HDR + 4)
    cols = np.arange(HDR + 4)
    mask = cols[None, :] < width[:, None]
    pos = (offs[:, None] + cols[None, :])[mask]
    buf[pos] = out[mask]
    tmp = ds.temp_path(f"bench{k}")
    with open(tmp, "wb") as f:
        f.write(buf.data)
    sf = ds.place(tmp, int(ts[0]))
    index_and_link(ds, sf)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def timed(argv: list[str]) -> tuple[float, int, bytes]:
    """Wall time, bytes read from disk (ru_inblock), stderr of one run."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode not in (0, 1):
        raise SystemExit(f"{argv[0]} failed ({p.returncode}): {err.decode()[-500:]}")
    return dt, ru.ru_inblock * 512, err


def tcpdump_files(files: list[Path], expr: str) -> list[str]:
    script = "; ".join(f"tcpdump -r {f} -w /dev/null '{expr}' 2>/dev/null" for f in files)
    return ["sh", "-c", script]


WARM = [
    [sys.executable, "-c", "import numpy, pyzstd, click, pcapvault.extract.engine, "
     "pcapvault.extract.cli, pcapvault.extract.flowmatch"],
    ["tcpdump", "--version"],
]


def median_runs(argv: list[str], repeat: int, cold: bool) -> tuple[float, int, bytes]:
    """Cold data, warm programs: the page cache is dropped, then the interpreter, numpy and
    tcpdump are loaded again, as on a machine where the tools are in use."""
    runs = []
    for _ in range(repeat):
        if cold:
            drop_caches()
            for w in WARM:
                subprocess.run(w, capture_output=True)
        runs.append(timed(argv))
    t = statistics.median(r[0] for r in runs)
    b = int(statistics.median(r[1] for r in runs))
    return t, b, runs[-1][2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-data")
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the data set afterwards")
    args = ap.parse_args()
    root = Path(args.dir) / "ds"
    free = shutil.disk_usage(Path(args.dir).parent if not Path(args.dir).exists()
                             else args.dir).free
    if not (root / ".pcapvault").exists():
        if free < args.gb * 1.3e9:
            raise SystemExit(f"not enough free space for {args.gb} GB under {args.dir}")
        t0 = time.monotonic()
        build(root, args.gb)
        print(f"built {args.gb} GB dump set in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    ds = DumpSet.open(root)
    files = [sf.pcap for sf in ds.files()]
    total = sum(f.stat().st_size for f in files)
    cold = drop_caches()
    exe = [sys.executable, "-m", "pcapvault.extract.cli"]
    b = HOUR_START + 1510  # 13:25:10 .. 13:35:10 UTC: starts and ends inside files
    e = b + 600
    win = [sf.pcap for sf in ds.files_in_window(b * NS, e * NS)]
    host = "10.0.0.51"  # the 50th most popular host of 4,000
    sel = f"host {host}"
    print(f"dump set: {len(files)} files, {total / 1e9:.2f} GB; window files: {len(win)}, "
          f"{sum(f.stat().st_size for f in win) / 1e9:.2f} GB; cold cache: {cold}")
    rows = []
    ta = median_runs(tcpdump_files(win, sel), args.repeat, cold)
    xa = median_runs([*exe, "-t", str(root), "-b", str(b), "-e", str(e), "-f", sel, "-o",
                      "/dev/null", "-v"], args.repeat, cold)
    rows.append(("(a) selective: host, 10 min", ta, xa))
    tb = median_runs(tcpdump_files(files, "tcp"), args.repeat, cold)
    xb = median_runs([*exe, "-t", str(root), "-b", str(HOUR_START), "-e",
                      str(HOUR_START + 3600), "-f", "tcp", "-o", "/dev/null", "-v"],
                     args.repeat, cold)
    rows.append(("(b) broad: tcp, 1 hour", tb, xb))
    xc = median_runs([*exe, "-t", str(root), "-b", str(b), "-e", str(e), "-f", sel, "-l", "-v"],
                     args.repeat, cold)
    rows.append(("(c) count of (a): -l -v", None, xc))
    print("| case | tcpdump s | tcpdump disk MB | npcapextract s | npcapextract disk MB "
          "| speed-up |")
    print("|---|---|---|---|---|---|")
    for name, t, x in rows:
        tt = f"{t[0]:.2f}" if t else "-"
        tm = f"{t[1] / 1e6:.0f}" if t else "-"
        sp = f"{t[0] / x[0]:.1f}x" if t else "-"
        print(f"| {name} | {tt} | {tm} | {x[0]:.2f} | {x[1] / 1e6:.1f} | {sp} |")
    for name, _, x in rows:
        print(f"{name}: {x[2].decode().strip().splitlines()[-1]}")
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
