"""Web page benchmark: the first view of the benchmark hour, measured in a real browser.

The dump set is bench/extract.py's benchmark hour (built once under --dir, reused when
present; 1 GB by default), or any dump set given with -t. npcapserve runs as in
bench/serve.py (throwaway service account, group, member and PAM service; TLS). Debian's
headless Chromium (tests/webworld.py) logs in, then opens the page afresh --repeat times;
each time the page shows the whole dump set with no filter, as an analyst's first look.

Reported per run, from the browser's own clocks (milliseconds from the navigation's start):
Navigation Timing's DOMContentLoaded and load, and the moments the chart and the
conversations table are filled (the page's performance marks pv-chart and pv-table); the
first view is ready at the later of the two. Also each API call's duration (Resource
Timing). Medians are printed as a Markdown table row for docs/BENCHMARKS.md.

The server's page cache is warm (the dump set's indexes read by earlier runs) unless --cold,
which drops the machine's page cache before every run (it disturbs anything else running).

    python bench/web.py [--dir /work/bench-web] [--gb 1] [--repeat 5] [--cold]
                        [-t DUMPSET] [--record] [--screenshot docs/web-page.png]

--record makes DUMPSET (or DIR/recorded) first, with the recorder on a veth pair: about
70 s of tests/extract_helpers.py's traffic mix at 100 packets/s with a burst of another
mix at 1000/s in the middle (docs/web-page.png is that dump set's first view).

Needs root (users, PAM service file), openssl, chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import pwd
import statistics
import sys
import time
from pathlib import Path

from pcapvault.index.privileges import give_tree

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import extract as bx  # noqa: E402, I001 - bench/extract.py: the benchmark hour
import serve as bs  # noqa: E402 - bench/serve.py: throwaway accounts and the server
from webworld import browser, filled, login  # noqa: E402 - tests/webworld.py: Chromium

TIMES = """
const nav = performance.getEntriesByType('navigation')[0];
const mark = (n) => {
  const m = performance.getEntriesByName(n);
  return m.length ? m[0].startTime : null;
};
const api = {};
for (const r of performance.getEntriesByType('resource')) {
  const path = new URL(r.name).pathname;
  if (path.startsWith('/api/') || path === '/session') api[path] = r.duration;
}
return {dcl: nav.domContentLoadedEventEnd, load: nav.loadEventEnd, chart: mark('pv-chart'),
        table: mark('pv-table'), api: api,
        rows: document.querySelectorAll('#table tbody tr').length,
        points: +document.getElementById('chart').dataset.points};
"""


def first_views(url: str, user: str, password: str, repeat: int, cold: bool,
                screenshot: Path | None, size: tuple[int, int]) -> list[dict]:
    runs = []
    with browser(*size) as driver:
        login(driver, url, user, password)
        for _ in range(repeat):
            if cold:
                bx.drop_caches()
            driver.get(url + "/")
            filled(driver)
            t = driver.execute_script(TIMES)
            t["ready"] = max(t["chart"], t["table"])
            runs.append(t)
            print(f"ready {t['ready']:.0f} ms (chart {t['chart']:.0f}, table {t['table']:.0f}, "
                  f"load {t['load']:.0f}); api "
                  + ", ".join(f"{k} {v:.0f}" for k, v in sorted(t["api"].items())),
                  file=sys.stderr)
        if screenshot:
            time.sleep(0.5)  # the chart's last frame
            driver.save_screenshot(str(screenshot))
    return runs


def record(root: Path) -> None:
    """Real recorded traffic for the screenshot: a steady mix with a burst in the middle."""
    from extract_helpers import synthetic_traffic, write_pcap
    from netns import veth_pair
    from recorderproc import RecorderProc

    steady, burst = root.parent / "steady.pcap", root.parent / "burst.pcap"
    write_pcap(steady, synthetic_traffic(3000, time.time_ns(), seed=11, span_s=1.0))
    write_pcap(burst, synthetic_traffic(3000, time.time_ns(), seed=12, span_s=1.0))
    with veth_pair() as pair:
        rec = RecorderProc(pair, root, "-p", "1M", "--disk-limit", "1GB")
        for src, pps in ((steady, 100), (burst, 1000), (steady, 100)):
            pair.send([src], pps=pps)
        time.sleep(0.5)
        if rec.stop() != 0:
            raise SystemExit(f"the recorder failed: {rec.stderr}")
    steady.unlink()
    burst.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-web")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each view")
    ap.add_argument("-t", "--dumpset", type=Path, help="serve this dump set instead")
    ap.add_argument("--record", action="store_true",
                    help="record the dump set first on a veth pair (see above)")
    ap.add_argument("--screenshot", type=Path, help="save the last view as PNG")
    ap.add_argument("--size", default="1280x800", help="the browser window (WIDTHxHEIGHT)")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    root = args.dumpset or base / ("recorded" if args.record else "ds")
    if args.record and not (root / ".pcapvault").exists():
        record(root)
    elif not (root / ".pcapvault").exists():
        t0 = time.monotonic()
        bx.build(root, args.gb)
        print(f"built {args.gb} GB dump set in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    with bs.accounts() as (svc, group, user, password, pam):
        give_tree(root, pwd.getpwnam(svc))
        with bs.server(base, root, svc, group, pam) as (url, _cert, _tokens, _pid):
            runs = first_views(url, user, password, args.repeat, args.cold, args.screenshot,
                               tuple(int(x) for x in args.size.split("x")))

    def m(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    apis = sorted({k for r in runs for k in r["api"]})
    api = ", ".join(f"{k.rsplit('/', 1)[-1]} "
                    f"{statistics.median(r['api'].get(k, 0) for r in runs):.0f}" for k in apis)
    print(f"| {'cold' if args.cold else 'warm'} | {m('dcl'):.0f} | {m('load'):.0f} | "
          f"{m('chart'):.0f} | {m('table'):.0f} | **{m('ready'):.0f}** | {api} | "
          f"{runs[0]['points']} steps, {runs[0]['rows']} rows |")


if __name__ == "__main__":
    main()
