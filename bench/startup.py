"""What npcapextract's start-up measure is worth now, measured against its absence.

Case (a) of bench/extract.py (one host, 10 minutes, cold data, warm programs), or with
--case b its broad case (`tcp`, the whole hour), run several ways that take turns:

  entry         `python -m pcapvault.extract`, which exits without the interpreter's teardown
                (cliutil.exit_now);
  no-exit       the command with a normal interpreter exit;
  no-heap       the command without extract/heap.py's malloc tuning (keep_freed_memory);
  find-library  the command plus a ctypes.util.find_library("pcap") call, what loading
                libpcap by soname (index/libpcap.py) saves.

(At de1566e it also measured planning the host query on a thread before click is imported,
which no longer paid and was removed: docs/BENCHMARKS.md, S1.)

    python bench/startup.py --dir /tmp/bench-final [--repeat 15] [--case a|b]

Uses the dump set bench/extract.py builds (and its small warm-up set); run that first with
--keep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from extract import HOUR_START, drop_caches, interleaved

_ENTRY = "from pcapvault.extract.__main__ import main; main()"
VARIANTS = {
    "entry": ["-m", "pcapvault.extract"],
    "no-exit": ["-c", "from pcapvault.extract.cli import main; main()"],
    "no-heap": ["-c", "import pcapvault.extract.heap as h; h.keep_freed_memory = lambda: True; "
                + _ENTRY],
    "find-library": ["-c", "import ctypes.util; ctypes.util.find_library('pcap'); " + _ENTRY],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-data")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--case", choices=("a", "b"), default="a")
    args = ap.parse_args()
    root, small = Path(args.dir) / "ds", Path(args.dir) / "warm"
    if not (root / ".pcapvault").exists() or not (small / ".pcapvault").exists():
        sys.exit(f"no dump sets under {args.dir}: run bench/extract.py --dir {args.dir} --keep")
    b = HOUR_START + 1510
    query = (["-b", str(b), "-e", str(b + 600), "-f", "host 10.0.0.51", "-o", "/dev/null"]
             if args.case == "a" else
             ["-b", str(HOUR_START), "-e", str(HOUR_START + 3600), "-f", "tcp", "-o", "/dev/null"])
    cmds = {k: [sys.executable, *v, "-t", str(root), *query] for k, v in VARIANTS.items()}
    warm = [[sys.executable, *v, "-t", str(small), *query] for v in VARIANTS.values()]
    r = interleaved(cmds, args.repeat, drop_caches(), warm)
    print("| variant | wall s (median) | CPU s (median) | runs |")
    print("|---|---|---|---|")
    for k, runs in r.items():
        print(f"| {k} | {statistics.median(x.wall for x in runs):.3f} | "
              f"{statistics.median(x.cpu for x in runs):.3f} | {len(runs)} |")


if __name__ == "__main__":
    main()
