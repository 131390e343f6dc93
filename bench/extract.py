"""Extraction benchmark: npcapextract against tcpdump -r over the same files.

Builds (once, reused when present) a dump set holding one hour of synthetic traffic, at least
5 GB by default, in the recorder's layout (256 MB files closed at 10-minute slot boundaries,
each indexed and linked into the timeline), checks that (a) (and with --verify-broad, (b))
writes exactly what tcpdump selects, then times

  (a) selective: one host over a 10-minute window inside the hour, against tcpdump over the
      files that overlap the window (an analyst who picks the files by their names) and over
      the hour's files (an analyst who does not);
  (b) broad: `tcp` over the whole hour, against tcpdump over every file;
  (c) the count of (a) with -l -v (no packet written).

Each command runs REPEAT times, the commands taking turns, with the page cache dropped before
every run when the machine allows it (root) and the programs (Python, numpy, tcpdump) loaded
again. Reported: the median wall time, the median CPU time (user + system, children included)
and the bytes the process read from the device (rusage ru_inblock, so cached reads do not
count).

    python bench/extract.py [--dir /work/bench-data] [--gb 5] [--repeat 5] [--keep]
                            [--verify-broad]

Traffic: 4,000 hosts in 10.0.0.0/12 with Zipf-like popularity, 60,000 flows (TCP 85%, UDP
13%, ICMP and ARP the rest; 5% of frames VLAN tagged), packet sizes from a mix of ACK-sized,
mid-sized and full-MTU frames. Generated with numpy: headers are built as a matrix and
scattered into each file's buffer in one operation; payload bytes are zero.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.pcapfile import PcapReader, global_header
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


def compile_package() -> None:
    """Bytecode for the package, as pip writes it when it installs one: from an editable
    install under PYTHONDONTWRITEBYTECODE every run would compile the modules it imports from
    source (40 ms on this machine, a tenth of case (a))."""
    import compileall

    import pcapvault.extract
    import pcapvault.index
    import pcapvault.tools

    for pkg in (pcapvault.extract, pcapvault.index, pcapvault.tools):
        compileall.compile_dir(Path(pkg.__file__).parent, quiet=1)


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


@dataclass
class Run:
    wall: float  # seconds
    cpu: float  # user + system seconds of the process and its children
    disk: int  # bytes read from the device (ru_inblock)
    err: bytes


def timed(argv: list[str], out: str | None = None) -> Run:
    """One run: wall and CPU time, bytes read from disk (ru_inblock), stderr."""
    t0 = time.monotonic()
    with open(out or os.devnull, "wb") as sink:
        p = subprocess.Popen(argv, stdout=sink, stderr=subprocess.PIPE)
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
    dt = time.monotonic() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1):
        raise SystemExit(f"{argv[0]} failed ({rc}): {err.decode()[-500:]}")
    return Run(dt, ru.ru_utime + ru.ru_stime, ru.ru_inblock * 512, err)


def tcpdump_files(files: list[Path], expr: str) -> list[str]:
    """What an analyst without an index runs: tcpdump over each file, one after the other."""
    script = "; ".join(f"tcpdump -r {f} -w /dev/null '{expr}' 2>/dev/null" for f in files)
    return ["sh", "-c", script]


def interleaved(cmds: dict[str, list[str]], repeat: int, cold: bool, warm: list[list[str]]
                ) -> dict[str, list[Run]]:
    """Cold data, warm programs: before every run the page cache is dropped, then the
    programs are loaded again by running `warm` (the same commands on another, small dump
    set), as on a machine where the tools are in use: every module and library a command
    touches is then cached, not only those it imports first. The commands take turns, so
    that load from other work on a shared machine falls on all of them alike."""
    runs: dict[str, list[Run]] = {k: [] for k in cmds}
    for _ in range(repeat):
        for k, argv in cmds.items():
            if cold:
                drop_caches()
                for w in warm:
                    subprocess.run(w, capture_output=True)
            runs[k].append(timed(argv))
    return runs


def med(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def records(path: str) -> list[tuple[int, bytes]]:
    """(timestamp, record bytes) of every record of a pcap file or a tcpdump -w - stream."""
    with PcapReader(path) as r:
        t = r.scan()
        arr = r.array()
        return [
            (ts, bytes(arr[o + 16 : o + 16 + c]))
            for ts, o, c in zip(t.ts_ns.tolist(), t.offset.tolist(), t.caplen.tolist(),
                                strict=True)
        ]


def verify(exe: list[str], root: Path, win: list[Path], b: int, e: int, expr: str,
           tmp: Path) -> int:
    """Case (a) written to a file equals tcpdump's selection of the window's files."""
    ours, theirs = tmp / "ours.pcap", tmp / "tcpdump.pcap"
    timed([*exe, "-t", str(root), "-b", str(b), "-e", str(e), "-f", expr, "-o", str(ours)])
    want = []
    for f in win:
        subprocess.run(["tcpdump", "--time-stamp-precision=nano", "-r", str(f), "-w",
                        str(theirs), expr], check=True, capture_output=True)
        want += [p for p in records(str(theirs)) if b * NS <= p[0] < e * NS]
    got = records(str(ours))
    ours.unlink()
    theirs.unlink()
    if got != want:
        raise SystemExit(f"(a) differs from tcpdump: {len(got)} packets against {len(want)}")
    return len(got)


def records_digest(argvs: list[list[str]]) -> tuple[str, int]:
    """SHA-256 of the records (global headers skipped) the commands write to stdout, in turn."""
    h = hashlib.sha256()
    n = 0
    for argv in argvs:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        head = p.stdout.read(24)
        if len(head) not in (0, 24):
            raise SystemExit(f"{argv[0]}: short output")
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
        if p.wait() not in (0, 1):
            raise SystemExit(f"{argv[0]} failed")
    return h.hexdigest(), n


def verify_broad(exe: list[str], root: Path, files: list[Path], h0: str, h1: str) -> int:
    """Case (b)'s output equals tcpdump's over every file (all packets lie in the hour)."""
    ours = records_digest([[*exe, "-t", str(root), "-b", h0, "-e", h1, "-f", "tcp", "-O"]])
    theirs = records_digest([["tcpdump", "--time-stamp-precision=nano", "-r", str(f), "-w", "-",
                              "tcp"] for f in files])
    if ours != theirs:
        raise SystemExit(f"(b) differs from tcpdump: {ours[1]} bytes against {theirs[1]}")
    return ours[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-data")
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the data set afterwards")
    ap.add_argument("--verify-broad", action="store_true",
                    help="also check (b)'s 4 GB output against tcpdump's (slow)")
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
    compile_package()
    files = [sf.pcap for sf in ds.files()]
    total = sum(f.stat().st_size for f in files)
    cold = drop_caches()
    exe = [sys.executable, "-m", "pcapvault.extract"]  # what `npcapextract` runs
    b = HOUR_START + 1510  # 13:25:10 .. 13:35:10 UTC: starts and ends inside files
    e = b + 600
    h0, h1 = str(HOUR_START), str(HOUR_START + 3600)
    win = [sf.pcap for sf in ds.files_in_window(b * NS, e * NS)]
    host = "10.0.0.51"  # the 50th most popular host of 4,000
    sel = f"host {host}"
    print(f"dump set: {len(files)} files, {total / 1e9:.2f} GB; window files: {len(win)}, "
          f"{sum(f.stat().st_size for f in win) / 1e9:.2f} GB; cold cache: {cold}")
    n = verify(exe, root, win, b, e, sel, Path(args.dir))
    print(f"(a) verified: {n} packets, identical to tcpdump's selection of the window's files")
    if args.verify_broad:
        n = verify_broad(exe, root, files, h0, h1)
        print(f"(b) verified: {n} bytes of records, identical to tcpdump's")
    cmds = {
        "td_a_win": tcpdump_files(win, sel),
        "td_a_hour": tcpdump_files(files, sel),
        "a": [*exe, "-t", str(root), "-b", str(b), "-e", str(e), "-f", sel, "-o", "/dev/null",
              "-v"],
        "c": [*exe, "-t", str(root), "-b", str(b), "-e", str(e), "-f", sel, "-l", "-v"],
        "td_b": tcpdump_files(files, "tcp"),
        "b": [*exe, "-t", str(root), "-b", h0, "-e", h1, "-f", "tcp", "-o", "/dev/null", "-v"],
    }
    small = Path(args.dir) / "warm"
    if not (small / ".pcapvault").exists():
        build(small, 0.02)
    warm = [[*a[:a.index("-t") + 1], str(small), *a[a.index("-t") + 2:]]
            for k, a in cmds.items() if not k.startswith("td_")]
    warm.append(["tcpdump", "--version"])
    r = interleaved(cmds, args.repeat, cold, warm)
    print("| case | command | files | wall s (median) | CPU s | disk MB | ratio |")
    print("|---|---|---|---|---|---|---|")

    def row(case: str, key: str, what: str, nfiles: int, base: str | None) -> None:
        ratio = f"{med(r[base], 'wall') / med(r[key], 'wall'):.1f}x" if base else "-"
        print(f"| {case} | {what} | {nfiles} | {med(r[key], 'wall'):.2f} | "
              f"{med(r[key], 'cpu'):.2f} | {med(r[key], 'disk') / 1e6:.1f} | {ratio} |")

    row("(a) host, 10 min", "td_a_win", "tcpdump, window's files", len(win), None)
    row("(a) host, 10 min", "td_a_hour", "tcpdump, hour's files", len(files), None)
    row("(a) host, 10 min", "a", "npcapextract", len(win), "td_a_win")
    print(f"|  | ... against tcpdump over the hour's files |  |  |  |  | "
          f"{med(r['td_a_hour'], 'wall') / med(r['a'], 'wall'):.1f}x |")
    row("(b) tcp, 1 hour", "td_b", "tcpdump", len(files), None)
    row("(b) tcp, 1 hour", "b", "npcapextract", len(files), "td_b")
    row("(c) count of (a)", "c", "npcapextract -l -v", len(win), None)
    for k in ("a", "b", "c"):
        print(f"({k}) runs: " + " ".join(f"{x.wall:.2f}" for x in r[k]) + " s; "
              + r[k][-1].err.decode().strip().splitlines()[-1])
    for k in ("td_a_win", "td_a_hour", "td_b"):
        print(f"{k} runs: " + " ".join(f"{x.wall:.2f}" for x in r[k]) + " s")
    if not args.keep:
        shutil.rmtree(root)  # only what this script built: the directory may be shared
        shutil.rmtree(small)
        try:
            Path(args.dir).rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    main()
