"""Index build benchmark: packets per second per core and index size relative to the pcap.

Generates realistic traffic with numpy (many hosts and flows with a heavy-tailed popularity,
IPv4 and IPv6, TCP and UDP, some 802.1Q-tagged, capture-like nanosecond timestamps), writes it
as a pcap, then indexes it several times from hot page cache, measuring CPU time.

    python bench/index_build.py [--packets N] [--runs R] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pcapvault.index.builder import index_pcap
from pcapvault.index.indexfile import encode_index
from pcapvault.index.pcapfile import PcapReader, global_header, locate_records

# Internet mix of frame sizes (without FCS): mostly small, a third medium, some full-size.
IMIX = ((60, 0.50), (64, 0.08), (576, 0.25), (1000, 0.05), (1514, 0.12))


def _flows(rng: np.random.Generator, count: int) -> np.ndarray:
    """Per-flow frame headers (count, 78): Ethernet [+802.1Q] + IPv4/IPv6 + TCP/UDP ports."""
    head = np.zeros((count, 78), dtype=np.uint8)
    head[:, 0:6] = rng.integers(0, 256, (count, 6))
    head[:, 6:12] = rng.integers(0, 256, (count, 6))
    tagged = rng.random(count) < 0.2
    v6 = rng.random(count) < 0.15
    tcp = rng.random(count) < 0.7
    l3 = np.where(tagged, 18, 14)
    rows = np.arange(count)
    # 802.1Q tag: TPID + TCI, then the real ethertype
    head[tagged, 12:14] = (0x81, 0x00)
    vid = rng.integers(1, 4095, count)
    head[tagged, 14] = vid[tagged] >> 8
    head[tagged, 15] = vid[tagged] & 0xFF
    et_pos = l3 - 2
    head[rows, et_pos] = np.where(v6, 0x86, 0x08)
    head[rows, et_pos + 1] = np.where(v6, 0xDD, 0x00)
    proto = np.where(tcp, 6, 17)
    # IPv4: 45 00 len id frag ttl proto csum src dst (hosts from a few /16s)
    hosts = rng.integers(0, 1 << 20, (count, 2)) + (10 << 24)
    for i in np.flatnonzero(~v6):
        p = l3[i]
        head[i, p] = 0x45
        head[i, p + 8] = 64
        head[i, p + 9] = proto[i]
        head[i, p + 12 : p + 16] = np.frombuffer(int(hosts[i, 0]).to_bytes(4, "big"), np.uint8)
        head[i, p + 16 : p + 20] = np.frombuffer(int(hosts[i, 1]).to_bytes(4, "big"), np.uint8)
    for i in np.flatnonzero(v6):
        p = l3[i]
        head[i, p] = 0x60
        head[i, p + 6] = proto[i]
        head[i, p + 7] = 64
        head[i, p + 8 : p + 40] = rng.integers(0, 256, 32)
        head[i, p + 8 : p + 10] = (0x20, 0x01)
        head[i, p + 24 : p + 26] = (0x20, 0x01)
    l4 = l3 + np.where(v6, 40, 20)
    sport = rng.integers(1024, 65536, count)
    dport = rng.choice([80, 443, 53, 123, 22, 8080, 25, 3306], count)
    head[rows, l4] = sport >> 8
    head[rows, l4 + 1] = sport & 0xFF
    head[rows, l4 + 2] = dport >> 8
    head[rows, l4 + 3] = dport & 0xFF
    return head


def generate(path: Path, packets: int, sizes: str, seed: int = 1) -> None:
    """Write `packets` packets of `sizes` ('64' or 'mixed') traffic to `path`."""
    rng = np.random.default_rng(seed)
    nflows = max(packets // 20, 1000)
    head = _flows(rng, nflows)
    # heavy-tailed flow popularity (Zipf-like), flows interleaved at random
    weights = 1.0 / np.arange(1, nflows + 1) ** 0.9
    flow = rng.choice(nflows, packets, p=weights / weights.sum())
    if sizes == "64":
        caplen = np.full(packets, 64, dtype=np.int64)
    else:
        lens, probs = zip(*IMIX, strict=True)
        caplen = rng.choice(lens, packets, p=probs).astype(np.int64)
    gap = 67 if sizes == "64" else 800  # ~line rate for 64-byte frames at 10 Gb/s
    ts = 1_763_737_200_000_000_000 + np.cumsum(rng.exponential(gap, packets).astype(np.int64))
    rec = 16 + caplen
    offset = 24 + np.concatenate(([0], np.cumsum(rec)[:-1]))
    buf = np.zeros(24 + int(rec.sum()), dtype=np.uint8)
    buf[:24] = np.frombuffer(global_header(1, 1536, True), np.uint8)
    hdr = np.empty((packets, 4), dtype="<u4")
    hdr[:, 0] = ts // 1_000_000_000
    hdr[:, 1] = ts % 1_000_000_000
    hdr[:, 2] = caplen
    hdr[:, 3] = caplen
    _scatter(buf, offset, hdr.view(np.uint8))
    data = head[flow]
    data[:, 16:18] = 0  # IPv4 total length / IPv6 payload length: not needed by the index
    for size in np.unique(caplen):
        rows = caplen == size
        _scatter(buf, offset[rows] + 16, data[rows, : min(size, data.shape[1])])
    path.write_bytes(buf.tobytes())


def _scatter(buf: np.ndarray, pos: np.ndarray, rows: np.ndarray) -> None:
    width = rows.shape[1]
    view = np.ndarray((len(buf) - width + 1,), np.dtype((np.void, width)), buf, strides=(1,))
    view[pos] = np.ascontiguousarray(rows).view(np.dtype((np.void, width))).reshape(-1)


def measure(path: Path, runs: int) -> dict[str, float]:
    """Median CPU seconds of what build_index + encoding do (mapping the file included), by
    stage, and the sizes. The walk is timed again on its own, for information."""
    times: dict[str, list[float]] = {"map": [], "index": [], "encode": [], "walk": []}
    size = 0
    for _ in range(runs):
        path.read_bytes()  # hot page cache
        t0 = time.process_time()
        with PcapReader(path) as reader:
            arr = reader.array()
            t1 = time.process_time()
            idx, _ = index_pcap(arr, reader.header)
            t2 = time.process_time()
            size = len(encode_index(idx))
            t3 = time.process_time()
            locate_records(arr, reader.header)
            t4 = time.process_time()
            del arr
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[key].append(dt)
    result = {key: statistics.median(v) for key, v in times.items()}
    totals = [a + b + c for a, b, c in zip(times["map"], times["index"], times["encode"],
                                           strict=True)]
    result["total"] = statistics.median(totals)
    result["best"] = min(totals)
    return {**result, "packets": idx.count, "flows": len(idx.flows), "index_bytes": size,
            "pcap_bytes": path.stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--traffic", choices=["64", "mixed", "both"], default="both")
    ap.add_argument("--dir", default=None, help="where to write the generated pcaps")
    ap.add_argument("--profile", action="store_true", help="cProfile one build")
    args = ap.parse_args()
    kinds = ["64", "mixed"] if args.traffic == "both" else [args.traffic]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind in kinds:
            path = Path(tmp) / f"bench-{kind}.pcap"
            generate(path, args.packets, kind)
            if args.profile:
                import cProfile
                import pstats

                cProfile.runctx("measure(path, 1)", globals(), locals(), os.path.join(tmp, "prof"))
                pstats.Stats(os.path.join(tmp, "prof")).sort_stats("cumtime").print_stats(25)
            r = measure(path, args.runs)
            n = r["packets"]
            label = "64-byte" if kind == "64" else "mixed-size (IMIX)"
            print(
                f"{label} traffic: {n} packets, {r['flows']} flows, "
                f"pcap {r['pcap_bytes'] / 1e6:.1f} MB (load average {os.getloadavg()[0]:.1f})"
            )
            print(
                f"  build rate {n / r['total'] / 1e6:.2f} Mpackets/s per core, median of "
                f"{args.runs} (best run {n / r['best'] / 1e6:.2f})"
            )
            print(
                f"  median CPU ns/packet: {r['total'] * 1e9 / n:.0f} = map {r['map'] * 1e9 / n:.0f}"
                f" + index {r['index'] * 1e9 / n:.0f} (record walk {r['walk'] * 1e9 / n:.0f} of"
                f" it) + encode {r['encode'] * 1e9 / n:.0f}"
            )
            print(
                f"  index {r['index_bytes'] / 1e6:.2f} MB = "
                f"{100 * r['index_bytes'] / r['pcap_bytes']:.2f}% of the pcap "
                f"({r['index_bytes'] / n:.2f} bytes/packet)"
            )

if __name__ == "__main__":
    main()
