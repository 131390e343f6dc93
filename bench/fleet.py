"""Fleet benchmark: the catalogue's size and host look-up for a generated day, and
`npcapfleet pcap` across three sensors against each sensor's own API time.

  (s) simulation (any user): a day of per-file conversation summaries for SENSORS sensors,
      FILES files a day each (144: the recorder's 10-minute files), ROWS conversations per
      file, generated inside chdb (INSERT ... SELECT FROM numbers(), so the load is
      ClickHouse's speed, not Python's) into the catalogue's own schema (fleet/store.py).
      Each sensor watches its own 4,096 internal hosts (10.S.0.0/20) talking to 65,536
      external ones shared by all sensors. Reported: rows, bytes on disk (compressed) per
      row and per day, and the host look-up `npcapfleet conversations -f "host H"` runs over
      the day (fleet/query.py's two queries: rows the window cuts, and the summed rows) for
      an internal host (on the sorting key's side) and an external one (seen by every
      sensor, often on the bloom filter's side), medians of --repeat hosts each;
  (p) pcap (root: users, a PAM service, three npcapserve): three sensors, each serving a
      copy of bench/extract.py's benchmark hour (--gb), synced into a chdb catalogue; a
      selective query (`host 10.0.0.51`, 10 minutes) through `npcapfleet pcap` against the
      slowest sensor's own /api/v1/pcap time for its part (curl, as bench/serve.py times it),
      alone and with the three sensors asked at once by three curls (the sharing of this
      one machine's cores and disk that the fleet's run has too).

    python bench/fleet.py sim [--sensors 100] [--rows 1000] [--repeat 5]
    python bench/fleet.py pcap [--dir /work/bench-fleet] [--gb 0.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcapvault.fleet import filters, query
from pcapvault.fleet.config import ClickHouse
from pcapvault.fleet.store import open_store

NS = 10**9
# The simulated day: yesterday (UTC), well inside the catalogue's TTL.
DAY_START = (int(time.time()) // 86400 - 1) * 86400


def simulate(store, sensors: int, files: int, rows: int) -> float:
    """Load the generated day; its seconds."""
    db, t0 = store.db, time.monotonic()
    d0 = DAY_START
    span = 86400 // files
    n = sensors * files * rows
    store.command(f"""
        INSERT INTO {db}.conversations
        SELECT toDate({d0}) AS day, concat('s', toString(s)) AS sensor,
               '/var/lib/pcapvault/eth0' AS dumpset,
               concat(toString({d0} + f * {span}), '.000000.pcap') AS file,
               0 AS view, 4 AS ipver, ['tcp', 'udp', 'tcp', 'tcp'][1 + h % 4] AS protocol,
               1 AS ported, least(inner, outer) AS addr_lo,
               if(inner < outer, iport, oport) AS port_lo,
               greatest(inner, outer) AS addr_hi, if(inner < outer, oport, iport) AS port_hi,
               1 + h % 200 AS packets_lo_hi, packets_lo_hi * (60 + h % 1400) AS bytes_lo_hi,
               h % 150 AS packets_hi_lo,
               packets_hi_lo * (60 + bitShiftRight(h, 8) % 1400) AS bytes_hi_lo,
               bitShiftRight(h, 16) % 2 AS a_is_lo,
               ({d0} + f * {span}) * {NS} + bitShiftRight(h, 20) % ({span} * {NS}) AS first_ns,
               first_ns + bitShiftRight(h, 40) % (({d0} + (f + 1) * {span}) * {NS} - first_ns)
                   AS last_ns
        FROM (SELECT intDiv(number, {files * rows}) AS s,
                     intDiv(number % {files * rows}, {rows}) AS f,
                     cityHash64(number) AS h,
                     toIPv6(IPv4NumToString(toUInt32(167772160 + s * 65536 + h % 4096)))
                         AS inner,
                     toIPv6(IPv4NumToString(toUInt32(1681915904 + bitShiftRight(h, 24) % 65536)))
                         AS outer,
                     toUInt16(1024 + bitShiftRight(h, 12) % 60000) AS iport,
                     [443, 80, 53, 22, 25][1 + bitShiftRight(h, 32) % 5] AS oport
              FROM numbers({n}))""")
    store.command(f"""
        INSERT INTO {db}.files
        SELECT toDate({d0}), concat('s', toString(intDiv(number, {files}))),
               '/var/lib/pcapvault/eth0',
               concat(toString({d0} + number % {files} * {span}), '.000000.pcap'),
               ({d0} + number % {files} * {span}) * {NS},
               ({d0} + (number % {files} + 1) * {span}) * {NS} - 1, 0, {rows} * 200, 10
        FROM numbers({sensors * files})""")
    store.command(f"OPTIMIZE TABLE {db}.conversations FINAL")
    return time.monotonic() - t0


def lookup(store, host: str, sensors: list[str]) -> tuple[float, int]:
    """The catalogue's part of `npcapfleet conversations -f "host H"` over the day."""
    b, e = DAY_START * NS, (DAY_START + 86400) * NS
    t0 = time.monotonic()
    cond = filters.conditions(filters.parse(f"host {host}"))
    cut = query.straddling(store, cond, b, e, sensors)
    found = query.catalogue_rows(store, cond, b, e, sensors, cut)
    return time.monotonic() - t0, len(found)


def sim(args: argparse.Namespace) -> None:
    out = {}
    for sensors in (3, args.sensors):
        where = tempfile.mkdtemp(prefix="pv-fleet-sim-", dir=args.tmp)
        try:
            store = open_store(where, ClickHouse(), 30)
            load_s = simulate(store, sensors, args.files, args.rows)
            db = store.db
            rows, disk = store.query(
                f"SELECT sum(rows), sum(data_compressed_bytes) FROM system.parts WHERE "
                f"database = '{db}' AND table = 'conversations' AND active")[0]
            names = [f"s{k}" for k in range(sensors)]
            times: dict[str, list[float]] = {"internal": [], "external": []}
            hits: dict[str, list[int]] = {"internal": [], "external": []}
            for k in range(args.repeat):
                for kind, host in (("internal", f"10.{k % sensors}.{k}.{17 + k}"),
                                   ("external", f"100.64.{3 * k}.{29 + k}")):
                    t, n = lookup(store, host, names)
                    times[kind].append(t)
                    hits[kind].append(n)
            out[sensors] = {
                "rows": int(rows), "load_s": round(load_s, 1),
                "bytes_on_disk": int(disk), "bytes_per_row": round(int(disk) / int(rows), 1),
                **{f"{k}_lookup_s": round(statistics.median(v), 3) for k, v in times.items()},
                **{f"{k}_conversations": int(statistics.median(v)) for k, v in hits.items()}}
            store.close()
        finally:
            shutil.rmtree(where, ignore_errors=True)
        print(json.dumps({"sensors": sensors, "files_per_day": args.files,
                          "rows_per_file": args.rows, **out[sensors]}), flush=True)


def pcap(args: argparse.Namespace) -> None:
    """Three sensors serving copies of the benchmark hour; the fleet's pcap against theirs."""
    sys.path.insert(0, str(Path(__file__).parent))
    import serve as bs  # bench/serve.py: accounts, npcapserve, curl

    import extract as bx  # bench/extract.py: the benchmark hour
    from pcapvault.index.privileges import give_tree

    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    hour = base / "hour"
    if not (hour / ".pcapvault").exists():
        bx.build(hour, args.gb)
    base.chmod(0o755)
    b, e = bx.HOUR_START + 1510, bx.HOUR_START + 2110  # bench/serve.py's (a)
    params = {"begin": str(b), "end": str(e), "filter": "host 10.0.0.51", "format": "pcapng"}
    with bs.accounts() as (svc, group, user, _password, pam):
        roots = []
        for k in range(3):
            root = base / f"ds{k + 1}"
            if not root.exists():
                shutil.copytree(hour, root, symlinks=True)
            give_tree(root, pwd.getpwnam(svc))
            roots.append(root)
        with contextlib.ExitStack() as stack:
            running = []
            for k, r in enumerate(roots):
                (base / f"srv{k + 1}").mkdir(exist_ok=True)
                running.append(stack.enter_context(bs.server(base / f"srv{k + 1}", r, svc,
                                                             group, pam)))
            tokens = [subprocess.run([bs.tool("npcapserve"), "token", "--tokens", str(t),
                                      "create", user], check=True, capture_output=True,
                                     text=True).stdout.strip() for _, _, t, _ in running]
            conf = base / "fleet.toml"
            shutil.rmtree(base / "catalogue", ignore_errors=True)  # a first sync each run
            # the benchmark hour is old: a retention that keeps it
            conf.write_text('catalogue = "catalogue"\nretention_days = 3650\n' + "".join(
                f'[[sensor]]\nname = "s{k + 1}"\nurl = "{u}"\nca = "{c}"\n'
                f'token = "{tokens[k]}"\n' for k, (u, c, _, _) in enumerate(running)))
            conf.chmod(0o600)
            fleet = [bs.tool("npcapfleet"), "--config", str(conf)]
            t0 = time.monotonic()
            r = subprocess.run([*fleet, "sync"], capture_output=True, text=True)
            sync_s = time.monotonic() - t0
            if r.returncode:
                raise SystemExit(f"npcapfleet sync failed: {r.stderr}")
            own: list[list[float]] = [[], [], []]
            both: list[float] = []
            merged: list[float] = []
            together: list[float] = []
            for _ in range(args.repeat):
                for k, (u, c, _, _) in enumerate(running):
                    bx.drop_caches()
                    t0 = time.monotonic()
                    subprocess.run(bs.curl(u, c, tokens[k], "/api/v1/pcap", params),
                                   check=True)
                    own[k].append(time.monotonic() - t0)
                # the same three parts asked at once, as the fleet asks them: on this one
                # machine the sensors then share its two cores and its disk, as they would not
                # on sensors of their own; the slowest's time under that sharing
                bx.drop_caches()
                t0 = time.monotonic()
                curls = [subprocess.Popen(bs.curl(u, c, tokens[k], "/api/v1/pcap", params))
                         for k, (u, c, _, _) in enumerate(running)]
                if any(p.wait() for p in curls):
                    raise SystemExit("a sensor's own /api/v1/pcap failed")
                together.append(time.monotonic() - t0)
                bx.drop_caches()
                t0 = time.monotonic()
                r = subprocess.run([*fleet, "pcap", "-b", params["begin"], "-e", params["end"],
                                    "-f", params["filter"], "-o", os.devnull], check=True,
                                   capture_output=True, text=True)
                both.append(time.monotonic() - t0)
                # the command's own line: the streams' part, from the first request to the end
                merged.append(float(re.search(r" in ([\d.]+) s$", r.stderr.strip()).group(1)))
                packets = int(re.search(r"(\d+) packets from", r.stderr).group(1))
            slowest = max(statistics.median(t) for t in own)
            print(json.dumps({"gb_per_sensor": args.gb, "sync_s": round(sync_s, 2),
                              "packets": packets,
                              "sensor_api_s": [round(statistics.median(t), 3) for t in own],
                              "fleet_pcap_s": round(statistics.median(both), 3),
                              "fleet_streams_s": round(statistics.median(merged), 3),
                              "ratio_to_slowest": round(statistics.median(both) / slowest, 2),
                              "streams_ratio_to_slowest":
                                  round(statistics.median(merged) / slowest, 2),
                              "sensors_at_once_s": round(statistics.median(together), 3),
                              "streams_ratio_to_at_once":
                                  round(statistics.median(merged)
                                        / statistics.median(together), 2)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sim")
    s.add_argument("--sensors", type=int, default=100)
    s.add_argument("--files", type=int, default=144)
    s.add_argument("--rows", type=int, default=1000)
    s.add_argument("--repeat", type=int, default=5)
    s.add_argument("--tmp", default="/var/tmp")
    p = sub.add_parser("pcap")
    p.add_argument("--dir", default="/work/bench-fleet")
    p.add_argument("--gb", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    (sim if args.what == "sim" else pcap)(args)


if __name__ == "__main__":
    main()
