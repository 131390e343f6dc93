"""Conversations benchmark: the whole benchmark hour's conversation table from the indexes.

Uses bench/extract.py's dump set (built once, reused when present: one hour, 5 GB by
default, 60,000 flows, 24 files) and times, cold (page cache dropped before every run, the
programs loaded again first by a run on a small second dump set):

  (f0) `npcapflows -t DS -b HOUR -e HOUR+1h`, the command's table of the top 20 (issue 17:
       under 2 s), and (f1) the same with `--json -n 0` (all 60,000 rows);
  (f2) the library call `conversations(Request(...))` in a process that has imported it
       already, as the server calls it (issue 17: under 1 s through the API);
  (f3) the same call with `--by endpoint` and (f4) `volume(...)` at one-minute steps.

Each runs REPEAT times, taking turns; reported are the medians of wall time, CPU time and the
bytes read from the device (ru_inblock for the command, /proc/self/io read_bytes for the
call), beside the size of the window's index files and of its pcaps: reading no pcap byte
means reading about the indexes' size, not the pcaps'.

    python bench/flows.py [--dir /work/bench-data] [--gb 5] [--repeat 5] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from extract import HOUR_START, NS, build, compile_package, drop_caches, timed  # bench/extract.py
from pcapvault.index.dumpset import DumpSet

# The library call in a process of its own: imports first, then the page cache is dropped
# (the parent passes "cold"), then one timed call; prints wall, CPU and bytes read as JSON.
CALL = r"""
import json, os, resource, sys, time
from pcapvault.extract.conversations import conversations, volume
from pcapvault.extract.request import Request
root, b, e, what, cold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if cold == "1":
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")

def io():
    with open("/proc/self/io") as f:
        return dict(line.split(": ") for line in f.read().splitlines())

req = Request([root], b, e, "")
r0, t0, c0 = io(), time.monotonic(), time.process_time()
if what == "volume":
    res = volume(req, 60 * 10**9)
    rows, read = len(res.packets), res.read_packets
else:
    res = conversations(req, what)
    rows, read = res.total_rows, res.read_packets
wall, cpu, r1 = time.monotonic() - t0, time.process_time() - c0, io()
print(json.dumps({"wall": wall, "cpu": cpu, "rows": rows, "read_packets": read,
                  "disk": int(r1["read_bytes"]) - int(r0["read_bytes"])}))
"""


def call(root: Path, b: int, e: int, what: str, cold: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", CALL, str(root), str(b), str(e), what,
                        "1" if cold else "0"], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"library call failed: {r.stderr[-500:]}")
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-data")
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the data sets afterwards")
    args = ap.parse_args()
    root = Path(args.dir) / "ds"
    built = not (root / ".pcapvault").exists()
    if built:
        t0 = time.monotonic()
        build(root, args.gb)
        print(f"built {args.gb} GB dump set in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    small = Path(args.dir) / "warm"
    built_small = not (small / ".pcapvault").exists()
    if built_small:
        build(small, 0.02)
    compile_package()
    ds = DumpSet.open(root)
    files = ds.files()
    pcap_bytes = sum(sf.pcap.stat().st_size for sf in files)
    index_bytes = sum(sf.index.stat().st_size for sf in files)
    b, e = HOUR_START * NS, (HOUR_START + 3600) * NS
    cold = drop_caches()
    print(f"dump set: {len(files)} files, pcaps {pcap_bytes / 1e9:.2f} GB, indexes "
          f"{index_bytes / 1e6:.1f} MB; cold cache: {cold}; load {os.getloadavg()[0]:.2f}")
    exe = [sys.executable, "-m", "pcapvault.extract.npcapflows"]
    argv = [*exe, "-t", str(root), "-b", str(HOUR_START), "-e", str(HOUR_START + 3600),
            "--json", "-n", "0"]
    warm = [*exe, "-t", str(small), "-b", str(HOUR_START), "-e", str(HOUR_START + 3600),
            "--json", "-n", "0"]
    human = argv[:-3]
    runs: dict[str, list] = {k: [] for k in ("f0", "f1", "f2", "f3", "f4")}
    rows = {"f0": 20,
            "f1": len(json.loads(subprocess.run(argv, capture_output=True).stdout)["rows"])}
    for _ in range(args.repeat):
        for k, cmd in (("f0", human), ("f1", argv)):
            if cold:
                drop_caches()
                subprocess.run(warm, capture_output=True)
            r = timed(cmd)
            runs[k].append({"wall": r.wall, "cpu": r.cpu, "disk": r.disk})
        for k, what in (("f2", "conversation"), ("f3", "endpoint"), ("f4", "volume")):
            if cold:
                call(small, b, e, what, False)  # the programs into the page cache
            res = call(root, b, e, what, cold)
            if res["read_packets"]:
                raise SystemExit(f"{what}: packets were read, the index should decide ''")
            rows[k] = res["rows"]
            runs[k].append(res)
    print(f"ru_maxrss of this script's children: "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")
    print("| case | what | rows | wall s (median) | CPU s | disk MB | runs (wall s) |")
    print("|---|---|---|---|---|---|---|")
    names = {"f0": "npcapflows (command, top 20)", "f1": "npcapflows --json -n 0 (command)",
             "f2": "conversations() (library)", "f3": "conversations(by=endpoint)",
             "f4": "volume(step 60 s)"}
    for k, name in names.items():
        rs = runs[k]
        med = {f: statistics.median(x[f] for x in rs) for f in ("wall", "cpu", "disk")}
        print(f"| {k} | {name} | {rows[k]} | {med['wall']:.2f} | {med['cpu']:.2f} | "
              f"{med['disk'] / 1e6:.1f} | " + " ".join(f"{x['wall']:.2f}" for x in rs) + " |")
    if built and not args.keep:
        shutil.rmtree(root)  # only what this script built: the directory may be shared
    if built_small and not args.keep:
        shutil.rmtree(small)


if __name__ == "__main__":
    main()
