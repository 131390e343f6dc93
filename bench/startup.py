"""What npcapextract's start-up measures are worth now, each measured against its absence.

Case (a) of bench/extract.py (one host, 10 minutes, cold data, warm programs), run three ways
that take turns:

  entry      `python -m pcapvault.extract`: the plan of the host query made on a thread
             before click is imported (prestart.plan_ahead), and the exit without the
             interpreter's teardown (cliutil.exit_now);
  no-exit    the same plan ahead, then the command and a normal interpreter exit;
  exit-only  the command alone (it plans when it gets there), then exit_now;
  neither    the command alone, and a normal interpreter exit.

    python bench/startup.py --dir /tmp/bench-final [--repeat 9]

Uses the dump set bench/extract.py builds (and its small warm-up set); run that first with
--keep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from extract import HOUR_START, drop_caches, interleaved

PLAN_AHEAD = ("import sys; from pcapvault.extract import prestart; "
              "prestart.plan_ahead(sys.argv[1:]); prestart.wait_planned(); ")
VARIANTS = {
    "entry": ["-m", "pcapvault.extract"],
    "no-exit": ["-c", PLAN_AHEAD + "from pcapvault.extract.cli import main; main()"],
    "exit-only": ["-c", "from pcapvault.extract.cli import main\n"
                  "from pcapvault.index.cliutil import exit_now\n"
                  "try:\n    main()\nexcept SystemExit as e:\n    exit_now(e.code)"],
    "neither": ["-c", "from pcapvault.extract.cli import main; main()"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-data")
    ap.add_argument("--repeat", type=int, default=9)
    args = ap.parse_args()
    root, small = Path(args.dir) / "ds", Path(args.dir) / "warm"
    if not (root / ".pcapvault").exists() or not (small / ".pcapvault").exists():
        sys.exit(f"no dump sets under {args.dir}: run bench/extract.py --dir {args.dir} --keep")
    b = HOUR_START + 1510
    query = ["-b", str(b), "-e", str(b + 600), "-f", "host 10.0.0.51", "-o", "/dev/null"]
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
