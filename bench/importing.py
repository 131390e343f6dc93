"""Import benchmark: `npcapimport` of many small captures, and of a few large ones.

Generates the captures with numpy (bench/index_build.py's traffic: many flows, IPv4/IPv6,
TCP/UDP, some 802.1Q; IMIX frame sizes), then, run after run with the tools taking turns:

- `npcapimport -t DS INPUTS` into a fresh dump set holding one recorded file of today (as a
  sensor's does), with this venv's command and with another venv's (`--old`, the previous
  code), wall and CPU time (the child's), bytes per second of input, and the pcaps and
  storage directories it made;
- a copy of the same bytes: `cat INPUTS > ONE && sync ONE` (what an import must at least do:
  read them and write them durably), and `cp -r` of the directory with each copy synced
  (`sync FILES`: a durable copy file by file).

Cases:
- `small`: N captures as `tcpdump -G 60 -w %s.pcap` leaves them (one a minute, old
  timestamps: 2019), a few hundred packets each;
- `large`: a few captures of tens of MB each, dense in time (cut by size).

Inputs are in the page cache (just written), as after a copy from the archive.

Usage: python bench/importing.py [--small 875] [--packets 300] [--large 3] [--large-mb 64]
       [--repeat 5] [--old /opt/pv-himport-old/bin/npcapimport] [--cases small,large] [--dir D]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from index_build import IMIX, _flows, _scatter  # noqa: E402

from pcapvault.index.dumpset import DumpSet  # noqa: E402
from pcapvault.index.pcaplayout import global_header  # noqa: E402
from pcapvault.recorder.indexer import index_and_link  # noqa: E402

NS = 1_000_000_000
START_2019 = 1_546_300_800 * NS  # 2019-01-01T00:00:00Z


def write_capture(path: Path, rng: np.random.Generator, head: np.ndarray, ts: np.ndarray
                  ) -> None:
    """A nanosecond pcap of len(ts) IMIX packets of random flows of `head` at times `ts`."""
    n = len(ts)
    lens, probs = zip(*IMIX, strict=True)
    caplen = rng.choice(lens, n, p=probs).astype(np.int64)
    rec = 16 + caplen
    offset = 24 + np.concatenate(([0], np.cumsum(rec)[:-1]))
    buf = np.zeros(24 + int(rec.sum()), dtype=np.uint8)
    buf[:24] = np.frombuffer(global_header(1, 65535, True), np.uint8)
    hdr = np.empty((n, 4), dtype="<u4")
    hdr[:, 0] = ts // NS
    hdr[:, 1] = ts % NS
    hdr[:, 2] = caplen
    hdr[:, 3] = caplen
    _scatter(buf, offset, hdr.view(np.uint8))
    data = head[rng.integers(0, len(head), n)]
    for size in np.unique(caplen):
        rows = caplen == size
        _scatter(buf, offset[rows] + 16, data[rows, : min(size, data.shape[1])])
    path.write_bytes(buf.tobytes())


def small_captures(d: Path, count: int, packets: int) -> list[Path]:
    """`count` one-minute rotations of `packets` packets each, from 2019-01-01."""
    rng = np.random.default_rng(1)
    head = _flows(rng, 2000)
    d.mkdir(parents=True)
    out = []
    for i in range(count):
        t0 = START_2019 + i * 60 * NS
        ts = t0 + np.sort(rng.integers(0, 60 * NS, packets))
        p = d / f"{t0 // NS}.pcap"
        write_capture(p, rng, head, ts)
        out.append(p)
    return out


def large_captures(d: Path, count: int, mb: int) -> list[Path]:
    """`count` captures of about `mb` MB each, dense (a 1 Gbit/s link), one after the other."""
    rng = np.random.default_rng(2)
    head = _flows(rng, 20000)
    d.mkdir(parents=True)
    n = mb * (1 << 20) // 427  # the IMIX mean record
    out = []
    t0 = START_2019 + 86400 * NS
    for i in range(count):
        ts = t0 + np.cumsum(rng.exponential(3400, n).astype(np.int64))
        p = d / f"large-{i}.pcap"
        write_capture(p, rng, head, ts)
        out.append(p)
        t0 = int(ts[-1]) + NS
    return out


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of `cmd`, which must succeed."""
    c0, t0 = child_cpu(), time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, child_cpu() - c0
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed: {r.stderr or r.stdout}")
    return wall, cpu


def live_dumpset(root: Path) -> None:
    """A dump set as a sensor's is when old captures are imported into it: its recorder has
    written a file of today (so the imported files are older than its newest directory)."""
    ds = DumpSet.create(root, interface="eth0", linktype=1, snaplen=65535, nanosecond=True)
    now = time.time_ns()
    tmp = ds.temp_path(1)
    write_capture(tmp, np.random.default_rng(3), _flows(np.random.default_rng(3), 10),
                  now + np.arange(10, dtype=np.int64))
    index_and_link(ds, ds.place(tmp, now))


def import_run(tool: str, work: Path, inputs: list[Path]) -> dict:
    root = work / "ds"
    shutil.rmtree(root, ignore_errors=True)
    live_dumpset(root)
    subprocess.run(["sync", "-f", str(work)], check=True)
    wall, cpu = timed([tool, "-t", str(root), *map(str, inputs)])
    ds = DumpSet.open(root)
    # the recorded file and its directory left out
    out = {"wall": wall, "cpu": cpu, "files": len(ds.files()) - 1,
           "dirs": len(ds.storage_dirs()) - 1}
    shutil.rmtree(root)
    return out


def cat_run(work: Path, inputs: list[Path]) -> dict:
    one = work / "cat.out"
    subprocess.run(["sync", "-f", str(work)], check=True)
    wall, cpu = timed(["sh", "-c", 'o=$1; shift; cat "$@" > "$o" && sync "$o"', "sh", str(one),
                       *map(str, inputs)])
    one.unlink()
    return {"wall": wall, "cpu": cpu, "files": 1, "dirs": 0}


def cp_run(work: Path, inputs: list[Path]) -> dict:
    dst = work / "cp.out"
    subprocess.run(["sync", "-f", str(work)], check=True)
    wall, cpu = timed(["sh", "-c", 'd=$1; s=$2; cp -r "$s" "$d" && sync "$d" "$d"/*', "sh",
                       str(dst), str(inputs[0].parent)])
    shutil.rmtree(dst)
    return {"wall": wall, "cpu": cpu, "files": len(inputs), "dirs": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=875, help="captures in the small case")
    ap.add_argument("--packets", type=int, default=300, help="packets per small capture")
    ap.add_argument("--large", type=int, default=3, help="captures in the large case")
    ap.add_argument("--large-mb", type=int, default=64, help="MB per large capture")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--old", default="", help="the previous code's npcapimport (another venv)")
    ap.add_argument("--cases", default="small,large")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a new "
                    "one under /tmp, removed at the end)")
    a = ap.parse_args()
    new = str(Path(sys.executable).with_name("npcapimport"))
    work = Path(tempfile.mkdtemp(prefix="bench-import-", dir=a.dir))
    tools = {"npcapimport": lambda w, i: import_run(new, w, i)}
    if a.old:
        tools["npcapimport (old)"] = lambda w, i: import_run(a.old, w, i)
    tools["cat + sync"] = cat_run
    tools["cp -r + sync each"] = cp_run
    try:
        for case in a.cases.split(","):
            if case == "small":
                inputs = small_captures(work / "in-small", a.small, a.packets)
            else:
                inputs = large_captures(work / "in-large", a.large, a.large_mb)
            size = sum(p.stat().st_size for p in inputs)
            print(f"\n{case}: {len(inputs)} captures, {size / 1e6:.1f} MB; medians of "
                  f"{a.repeat} runs, the tools taking turns")
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            for _ in range(a.repeat):
                for t, fn in tools.items():
                    runs[t].append(fn(work, inputs))
            base = statistics.median(r["wall"] for r in runs["cat + sync"])
            print(f"{'tool':22} {'wall s':>8} {'cpu s':>8} {'MB/s':>8} {'x cat':>7} "
                  f"{'files':>6} {'dirs':>5}   wall of each run")
            for t, rs in runs.items():
                wall = statistics.median(r["wall"] for r in rs)
                cpu = statistics.median(r["cpu"] for r in rs)
                print(f"{t:22} {wall:8.3f} {cpu:8.3f} {size / 1e6 / wall:8.1f} "
                      f"{wall / base:7.2f} {rs[-1]['files']:6d} {rs[-1]['dirs']:5d}   "
                      + " ".join(f"{r['wall']:.2f}" for r in rs))
            shutil.rmtree(inputs[0].parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
