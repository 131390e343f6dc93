"""Compression benchmark: ratio and speed against the zstd command, and extraction cost.

1. Ratio and throughput: the tcpdump corpus (real captures) is replayed N times through a veth
   pair into the recorder; its pcaps are then compressed by pcapvault (seekable format, 64 KiB
   frames) and by `zstd -LEVEL` (one stream), CPU seconds measured for each.
2. Selective extraction from a compressed dump set against the same dump set uncompressed
   (bench/extract.py's synthetic hour), cold caches, medians. Target: at most 2x.

Capture drops with and without --compress: `bench/capture.py --tools recorder,"recorder
--compress"` (the same rate runs as the capture benchmark).

Usage: python3 bench/compress.py [--replays 1] [--gb 2] [--repeat 5] [--dir DIR]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from netns import veth_pair  # noqa: E402
from recorderproc import CORPUS, RecorderProc  # noqa: E402

import extract as xbench  # noqa: E402  (bench/extract.py: synthetic hour, timing helpers)
from pcapvault.index import compressed  # noqa: E402
from pcapvault.index.dumpset import DumpSet  # noqa: E402
from pcapvault.recorder.indexer import index_and_link  # noqa: E402


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def record_corpus(root: Path, replays: int) -> list[Path]:
    files = sorted(CORPUS.glob("*.pcap"))
    if not files:
        raise SystemExit(f"corpus not found at {CORPUS}")
    with veth_pair() as pair:
        rec = RecorderProc(pair, root, "-s", "65535", "-p", "64M", "--disk-limit", "20GB")
        for _ in range(replays):
            pair.send(files)
        time.sleep(0.5)
        if rec.stop() != 0:
            raise SystemExit(rec.stderr)
    return [sf.pcap for sf in DumpSet.open(root).files()]


def ratio_and_speed(pcaps: list[Path], level: int, work: Path, repeat: int) -> list[str]:
    """Ratio once; CPU as the median of `repeat` measurements of `loops` passes each."""
    plain = sum(p.stat().st_size for p in pcaps)
    loops = max(1, int(200e6 // plain))  # about 200 MB through each compressor per measurement
    ours = [work / (p.name + ".zst") for p in pcaps]
    cli = [work / (p.name + ".cli.zst") for p in pcaps]
    ours_cpu, cli_cpu = [], []
    for _ in range(repeat):
        t0 = self_cpu()
        for _ in range(loops):
            for p, o in zip(pcaps, ours, strict=True):
                compressed.compress_file(p, o, level)
        ours_cpu.append((self_cpu() - t0) / loops)
        t0 = child_cpu()
        for p, o in zip(pcaps, cli, strict=True):
            subprocess.run(["sh", "-c", f"for i in $(seq {loops}); do zstd -{level} -q -f "
                            f"-o {o} {p}; done"], check=True)
        cli_cpu.append((child_cpu() - t0) / loops)
    ours_size = sum(o.stat().st_size for o in ours)
    cli_size = sum(o.stat().st_size for o in cli)
    oc, cc = statistics.median(ours_cpu), statistics.median(cli_cpu)
    return [
        f"recorded corpus: {plain / 1e6:.2f} MB in {len(pcaps)} pcap(s), level {level}; CPU "
        f"per pass, median of {repeat} measurements of {loops} passes",
        "",
        "| compressor | ratio | CPU ms per pass | MB/s per core |",
        "|---|---|---|---|",
        f"| pcapvault (seekable, 64 KiB frames, checksums) | {plain / ours_size:.2f} | "
        f"{oc * 1e3:.1f} | {plain / oc / 1e6:.0f} |",
        f"| zstd -{level} (one stream) | {plain / cli_size:.2f} | {cc * 1e3:.1f} "
        f"| {plain / cc / 1e6:.0f} |",
    ]


def compressed_copy(src: DumpSet, root: Path) -> DumpSet:
    ds = DumpSet.create(root, interface="bench0", linktype=1, snaplen=1536, nanosecond=True)
    for sf in src.files():
        temp = ds.temp_path("copy")
        shutil.copyfile(sf.pcap, temp)
        index_and_link(ds, ds.place(temp, sf.first_ns), compress=3)
    return ds


def extraction(work: Path, gb: float, repeat: int) -> list[str]:
    plain = xbench.build(work / "plain", gb)
    packed = compressed_copy(plain, work / "packed")
    cold = xbench.drop_caches()
    exe = [sys.executable, "-m", "pcapvault.extract.cli"]
    b = xbench.HOUR_START + 1510
    e = b + 600
    rows = []
    for name, flt in (("host, 10 min", "host 10.0.0.51"), ("port, 10 min", "port 3306")):
        t = {}
        for label, ds in (("plain", plain), ("zstd", packed)):
            t[label] = xbench.median_runs([*exe, "-t", str(ds.root), "-b", str(b), "-e", str(e),
                                           "-f", flt, "-o", "/dev/null", "-v"], repeat, cold)
        rows.append(f"| {name} (`{flt}`) | {t['plain'][0]:.2f} | {t['zstd'][0]:.2f} | "
                    f"{t['zstd'][0] / t['plain'][0]:.2f}x | {t['plain'][1] / 1e6:.1f} | "
                    f"{t['zstd'][1] / 1e6:.1f} |")
    psize = sum(sf.pcap.stat().st_size for sf in plain.files())
    zsize = sum(sf.pcap.stat().st_size for sf in packed.files())
    return [
        f"synthetic hour: {psize / 1e9:.2f} GB plain, {zsize / 1e9:.2f} GB compressed "
        f"(synthetic payloads are zeros: this ratio says nothing); cold cache: {cold}",
        "",
        "| selective query | plain s | compressed s | compressed / plain | plain disk MB "
        "| compressed disk MB |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replays", type=int, default=1,
                    help="corpus replays; more than 1 repeats data, flattering one-stream zstd")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default="/work/bench-data")
    a = ap.parse_args()
    Path(a.dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="compress-", dir=a.dir))
    try:
        pcaps = record_corpus(work / "corpus", a.replays)
        (work / "z").mkdir()
        out = ratio_and_speed(pcaps, a.level, work / "z", a.repeat)
        out += [""] + extraction(work / "x", a.gb, a.repeat)
        print("\n".join(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
