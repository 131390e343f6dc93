"""npcapserve benchmark: the API against npcapextract, tcpdump and the I/O floor, in one run.

Uses the benchmark hour of bench/extract.py (built once under --dir, reused when present),
handed to a throwaway service account, and a throwaway user of a throwaway extractors'
group with an API token; npcapserve runs as its unit runs it (root start, TLS with a
certificate made here, drop to the service account) on 127.0.0.1. curl is the client of the
timed downloads (a C client: the figures are the server's, not a Python client's).

  (a) selective: bench/extract.py's (a), `host 10.0.0.51` over 10 minutes, cold (the page
      cache dropped before every run; the server already running): over the API, against
      the I/O floor measured in the same run (a bare loop that only reads the matching
      records' byte ranges, all announced at once with POSIX_FADV_WILLNEED, then read),
      against `npcapextract -o /dev/null` and against `tcpdump -r` over the hour's files;
      also through a kept-alive connection from this process (the server's part alone,
      without curl's start and the TLS handshake);
  (b) broad: `tcp` over the whole hour, cold: over the API against `npcapextract -o -` into
      a pipe (the sendfile path), as throughput;
  (c) conversations of the whole hour over the API, cold and warm, with the bytes the
      server read from disk (/proc/PID/io read_bytes);
  (d) 50 clients at once on loopback, each asking in turn for conversations of 10 minutes
      and a one-minute pcap of one host: failures and latency percentiles.

Every case runs --repeat times, the commands taking turns; medians are reported.

    python bench/serve.py [--dir /work/bench-serve] [--gb 1] [--repeat 5] [--clients 50] [--plain]

Needs root (users, PAM service file, dropping caches), curl, openssl and tcpdump.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.indexfile import matches_address, read_index
from pcapvault.index.privileges import give_tree

sys.path.insert(0, str(Path(__file__).parent))
import extract as bx  # noqa: E402, I001 - bench/extract.py: the benchmark hour and helpers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from proctree import descendants  # noqa: E402 - tests/proctree.py

NS = bx.NS
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    p = BIN / name
    return str(p) if p.exists() else name


def sh(*args: str, input: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=input)


@contextmanager
def accounts():
    """A service account, an extractors' group, a member with a password, a PAM service."""
    tag = secrets.token_hex(3)
    svc, group, user, pam = f"pvb{tag}s", f"pvb{tag}g", f"pvb{tag}a", f"pvbench-{tag}"
    try:
        sh("groupadd", group)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", svc)
        sh("useradd", "-M", "-N", "-g", "users", "-G", group, "-s", "/usr/sbin/nologin", user)
        password = secrets.token_urlsafe(12)
        sh("chpasswd", input=f"{user}:{password}\n")
        Path(f"/etc/pam.d/{pam}").write_text((ROOT / "systemd/pam.d/npcapextract").read_text())
        yield svc, group, user, password, pam
    finally:
        # The server's helpers may take a moment to exit, and other sessions' tests may
        # hold the password file's lock.
        for u in (user, svc):
            for _ in range(300):
                if subprocess.run(["userdel", u], capture_output=True).returncode in (0, 6):
                    break
                time.sleep(0.1)
        for g in (group, svc):
            subprocess.run(["groupdel", g], capture_output=True)
        Path(f"/etc/pam.d/{pam}").unlink(missing_ok=True)


@contextmanager
def server(base: Path, root: Path, svc: str, group: str, pam: str, plain: bool = False):
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    tokens = base / "tokens" / "tokens"
    tokens.parent.mkdir(mode=0o750, exist_ok=True)
    shutil.chown(tokens.parent, "root", svc)
    audit = base / "audit.jsonl"
    tls = [] if plain else ["--tls-cert", str(cert), "--tls-key", str(key)]
    proc = subprocess.Popen(
        [tool("npcapserve"), "--listen", "127.0.0.1", "--port", "0", *tls,
         "-u", svc, "--group", group, "--pam-service", pam,
         "--audit-log", str(audit), "--tokens", str(tokens), "--max-connections", "200",
         "-t", str(root)], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"on (https?://\S+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"npcapserve did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    try:
        yield m.group(1), cert, tokens, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)
        audit.unlink(missing_ok=True)


def floor_ranges(ds: DumpSet, b: int, e: int, host: str) -> list[tuple[Path, np.ndarray,
                                                                        np.ndarray]]:
    """(pcap, offsets, lengths) of the records (a) selects, from the indexes (untimed)."""
    out = []
    for sf in ds.files_in_window(b * NS, e * NS):
        idx = read_index(sf.index)
        rows = matches_address(idx.flows, "src", host) | matches_address(idx.flows, "dst", host)
        sel = rows[idx.flow] & (idx.ts_ns >= b * NS) & (idx.ts_ns < e * NS)
        out.append((sf.pcap, idx.offset[sel], idx.caplen[sel].astype(np.int64) + 16))
    return out


def io_floor(ranges) -> float:
    """The bare reads: every range announced at once, then read; cold."""
    bx.drop_caches()
    t0 = time.monotonic()
    fds = []
    for pcap, off, ln in ranges:
        fd = os.open(pcap, os.O_RDONLY)
        fds.append((fd, off.tolist(), ln.tolist()))
        for o, n in zip(off.tolist(), ln.tolist(), strict=True):
            os.posix_fadvise(fd, o, n, os.POSIX_FADV_WILLNEED)
    for fd, offs, lns in fds:
        for o, n in zip(offs, lns, strict=True):
            os.pread(fd, n, o)
        os.close(fd)
    return time.monotonic() - t0


def curl(url: str, cert: Path, token: str, path: str, params: dict[str, str]) -> list[str]:
    args = ["curl", "-sS", "--fail", "--cacert", str(cert), "-H",
            f"Authorization: Bearer {token}", "-G", "-o", "/dev/null", f"{url}{path}"]
    for k, v in params.items():
        args += ["--data-urlencode", f"{k}={v}"]
    return args


def server_reads(pid: int) -> int:
    """Bytes the server and the processes it started (its index workers) read from disk."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/io").read_text().splitlines():
                if line.startswith("read_bytes:"):
                    total += int(line.split()[1])
        except OSError:
            continue  # ended meanwhile
    return total



def clients(url: str, cert: Path, token: str, n: int, rounds: int, b: int
            ) -> tuple[list[float], list[str]]:
    """n threads, each with its own connection, asking in turn for conversations of 10
    minutes and a one-minute pcap of one host; (latencies, failures)."""
    ctx = ssl.create_default_context(cafile=str(cert))
    lat: list[float] = []
    failed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(n)

    def one(k: int) -> None:
        with httpx.Client(base_url=url, verify=ctx, timeout=120,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            start.wait()
            for i in range(rounds):
                t = b + 60 * ((k * rounds + i) % 50)
                if i % 2:
                    req = ("/api/v1/conversations", {"begin": str(t), "end": str(t + 600),
                                                     "limit": "20"})
                else:
                    req = ("/api/v1/pcap", {"begin": str(t), "end": str(t + 60),
                                            "filter": f"host 10.0.{k % 4}.{k % 250 + 1}"})
                t0 = time.monotonic()
                try:
                    r = c.get(req[0], params=req[1])
                    ok = r.status_code == 200
                    why = f"{r.status_code} {r.text[:100]}"
                except httpx.HTTPError as e:
                    ok, why = False, repr(e)
                with lock:
                    lat.append(time.monotonic() - t0)
                    if not ok:
                        failed.append(why)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/work/bench-serve")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=6, help="requests per client in (d)")
    ap.add_argument("--cases", default="abcd", help="which cases to run (default abcd)")
    ap.add_argument("--plain", action="store_true",
                    help="plain HTTP on loopback (the server's --listen 127.0.0.1 without TLS)")
    args = ap.parse_args()
    base = Path(args.dir)
    root = base / "ds"
    if not (root / ".pcapvault").exists():
        base.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        bx.build(root, args.gb)
        print(f"built {args.gb} GB dump set in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    base.chmod(0o755)
    ds = DumpSet.open(root)
    files = [sf.pcap for sf in ds.files()]
    b, e = bx.HOUR_START + 1510, bx.HOUR_START + 2110  # bench/extract.py's (a)
    h0, h1 = bx.HOUR_START, bx.HOUR_START + 3600
    host = "10.0.0.51"
    ranges = floor_ranges(ds, b, e, host)
    nreads = sum(len(o) for _, o, _ in ranges)
    exe = [sys.executable, "-m", "pcapvault.extract"]
    x_b = " ".join([*exe, "-t", str(root), "-b", str(h0), "-e", str(h1), "-f", "tcp", "-o", "-"])
    small = base / "warm"
    if not (small / ".pcapvault").exists():
        bx.build(small, 0.02)
    with accounts() as (svc, group, user, password, pam):
        give_tree(root, pwd.getpwnam(svc))
        with server(base, root, svc, group, pam, args.plain) as (url, cert, tokens, pid):
            token = subprocess.run([tool("npcapserve"), "token", "--tokens", str(tokens),
                                    "create", user], capture_output=True, text=True,
                                   check=True).stdout.strip()
            sel = {"begin": str(b), "end": str(e), "filter": f"host {host}"}
            broad = {"begin": str(h0), "end": str(h1), "filter": "tcp"}
            cmds = {
                "api_a": curl(url, cert, token, "/api/v1/pcap", sel),
                "x_a": [*exe, "-t", str(root), "-b", str(b), "-e", str(e), "-f", f"host {host}",
                        "-o", "/dev/null"],
                "td_a": bx.tcpdump_files(files, f"host {host}"),
                "api_b": curl(url, cert, token, "/api/v1/pcap", broad),
                "x_b": ["sh", "-c", f"{x_b} | cat >/dev/null"],
                "api_c": curl(url, cert, token, "/api/v1/conversations",
                              {"begin": str(h0), "end": str(h1), "limit": "100"}),
            }
            # Cold data, warm programs (as bench/extract.py): the commands' modules and
            # libraries come back into the page cache through runs on a small dump set.
            warm = [[*exe, "-t", str(small), "-b", str(b), "-e", str(e), "-f", f"host {host}",
                     "-o", "/dev/null"],
                    [*exe, "-t", str(small), "-b", str(h0), "-e", str(h1), "-f", "tcp",
                     "-o", "/dev/null"],
                    ["tcpdump", "--version"], ["curl", "--version"]]
            floor: list[float] = []
            kept_a: list[float] = []
            reads: list[int] = []
            cmds = {k: v for k, v in cmds.items() if k[-1] in args.cases}
            runs = {k: [] for k in cmds}
            ctx = ssl.create_default_context(cafile=str(cert))
            kept = httpx.Client(base_url=url, verify=ctx, timeout=600,
                                headers={"Authorization": f"Bearer {token}"})
            kept.get("/api/v1/status")  # the connection is open before the timed request
            for _ in range(args.repeat):
                if "a" in args.cases:
                    floor.append(io_floor(ranges))
                    # The server's part alone: a kept-alive connection, no client start.
                    bx.drop_caches()
                    for w in warm:
                        subprocess.run(w, capture_output=True)
                    t0 = time.monotonic()
                    got = kept.get("/api/v1/pcap", params=sel)
                    kept_a.append(time.monotonic() - t0)
                    assert got.status_code == 200, got.text
                for k, argv in cmds.items():
                    bx.drop_caches()
                    for w in warm:
                        subprocess.run(w, capture_output=True)
                    before = server_reads(pid)
                    runs[k].append(bx.timed(argv))
                    if k == "api_c":
                        reads.append(server_reads(pid) - before)
            warm_c = [bx.timed(cmds["api_c"]).wall for _ in range(args.repeat)
                      if "api_c" in cmds]
            kept.close()
            broad_bytes = int(subprocess.run(["sh", "-c", f"{x_b} | wc -c"],
                                             capture_output=True, text=True).stdout
                              ) if "b" in args.cases else 0
            lat, failed = (clients(url, cert, token, args.clients, args.rounds, b)
                           if "d" in args.cases else ([], []))

    def m(k: str) -> float:
        return bx.med(runs[k], "wall")

    print(f"{'plain HTTP' if args.plain else 'HTTPS'}; dump set: {len(files)} files, "
          f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB;"
          f" (a) reads {nreads} records; load average {os.getloadavg()[0]:.1f}")
    print("| case | what | median wall s | ratio |")
    print("|---|---|---|---|")
    if "a" in args.cases:
        fl = statistics.median(floor)
        print(f"| (a) | API | {m('api_a'):.3f} | {m('api_a') / fl:.2f}x the I/O floor |")
        ka = statistics.median(kept_a)
        print(f"| (a) | API, kept-alive connection | {ka:.3f} | {ka / fl:.2f}x the I/O floor |")
        print(f"| (a) | I/O floor | {fl:.3f} | |")
        print(f"| (a) | npcapextract | {m('x_a'):.3f} | API {m('x_a') / m('api_a'):.2f}x "
              "faster |")
        print(f"| (a) | tcpdump, hour's files | {m('td_a'):.3f} | API "
              f"{m('td_a') / m('api_a'):.1f}x faster |")
    if "b" in args.cases:
        gb = broad_bytes / 1e9
        print(f"| (b) | API | {m('api_b'):.3f} ({gb / m('api_b'):.2f} GB/s) | "
              f"{m('x_b') / m('api_b'):.2f}x npcapextract's throughput |")
        print(f"| (b) | npcapextract -o - | {m('x_b'):.3f} ({gb / m('x_b'):.2f} GB/s) | |")
    if "c" in args.cases:
        print(f"| (c) | API conversations, hour, cold | {m('api_c'):.3f} | server read "
              f"{statistics.median(reads) / 1e6:.1f} MB from disk |")
        print(f"| (c) | API conversations, hour, warm | {statistics.median(warm_c):.3f} | |")
    if lat:
        q = np.percentile(lat, [50, 90, 99])
        print(f"| (d) | {args.clients} clients x {args.rounds} requests | p50 {q[0]:.3f}, p90 "
              f"{q[1]:.3f}, p99 {q[2]:.3f}, max {max(lat):.3f} | {len(failed)} failed |")
    for k in cmds:
        print(f"{k} runs: " + " ".join(f"{r.wall:.3f}" for r in runs[k]))
    if floor:
        print("floor runs: " + " ".join(f"{x:.3f}" for x in floor))
        print("kept-alive runs: " + " ".join(f"{x:.3f}" for x in kept_a))
    for f in failed[:5]:
        print("failed:", f)


if __name__ == "__main__":
    main()
