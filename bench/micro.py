"""Micro-benchmarks behind design choices the code's comments name (docs/BENCHMARKS.md, "Design
choices", D1 to D18): each measures one mechanism against the alternative it was chosen over,
the variants taking turns run by run, and prints the median of each and their ratio.

    python bench/micro.py NAME [NAME ...] [--repeat 7] [--dir /work/bench-micro] [--keep]
    python bench/micro.py all

NAME is one of the keys of BENCHMARKS below (`python bench/micro.py --help` lists them). The
disk ones (direct-read, scattered-reads) use a 1 GiB file in --dir, made on first use and
deleted afterwards unless --keep; they make it cold with POSIX_FADV_DONTNEED on that file
only, so other work on the machine keeps its page cache. Needs no root. Each sub-benchmark
takes under about 20 s at the default --repeat.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import mmap
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from index_build import generate

from extract import timed
from pcapvault.index import pcapfile
from pcapvault.index.directio import open_direct, read_full
from pcapvault.index.indexfile import _byte_planes
from pcapvault.index.zstdlib import zstd

MiB = 1 << 20
BIG_FILE = 1 << 30


def alternate(variants: dict[str, Callable[[], float]], repeat: int) -> dict[str, list[float]]:
    """Each variant's figures over `repeat` rounds, the variants taking turns in every round,
    so that load from other work falls on all of them alike."""
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for k, fn in variants.items():
            out[k].append(fn())
    return out


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    """A variant timing `calls` calls of `fn`: seconds per call."""
    def run() -> float:
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t) / calls
    return run


def report(title: str, res: dict[str, list[float]], unit: str, scale: float) -> None:
    """Medians (and the spread of single runs) in `unit` (seconds times `scale`), each variant
    as a ratio against the first, the chosen one."""
    print(f"{title} ({len(next(iter(res.values())))} runs each, medians)")
    base = statistics.median(next(iter(res.values())))
    for k, v in res.items():
        m = statistics.median(v)
        ratio = f"  {m / base:.2f}x the first" if base else ""
        print(f"  {k:<44} {m * scale:10.3f} {unit}  (runs {min(v) * scale:.3f} to "
              f"{max(v) * scale:.3f}){ratio}")


def child(code: str) -> float:
    """Run `code` in a fresh interpreter; the float it prints (its own measure)."""
    p = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                       check=True)
    return float(p.stdout.split()[-1])


def child_run(code: str, field: str) -> Callable[[], float]:
    """A variant running `code` in a fresh interpreter: its wall or CPU seconds (wait4)."""
    return lambda: getattr(timed([sys.executable, "-P", "-c", code]), field)


# --- recorder/ring.py -------------------------------------------------------------------------

def ring_cast(repeat: int, work: Path) -> None:
    """D1: the (tp_mac, tp_net) candidates of a 4 MiB ring block, a contiguous uint64 ->
    uint32 cast against a strided uint32 view, each compared with the key as ring.py does."""
    rng = np.random.default_rng(1)
    blk = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
    count = (len(blk) - 48 - 64) // 8 + 1
    words = blk[64 + 24: 64 + 24 + 8 * count]
    key = np.uint32(0x00500042)
    res = alternate({
        "astype(uint32) of the uint64 words": per_call(
            lambda: np.flatnonzero(words.view(np.uint64).astype(np.uint32) == key), 20),
        "strided view (every other uint32)": per_call(
            lambda: np.flatnonzero(words.view(np.uint32)[::2] == key), 20),
    }, repeat)
    report("D1 ring-cast: candidates of one 4 MiB block", res, "ms", 1e3)


# --- index/ -----------------------------------------------------------------------------------

def blas_threads(repeat: int, work: Path) -> None:
    """D2: CPU seconds of a fresh interpreter importing numpy and doing a little array work,
    with one OpenBLAS thread against OpenBLAS's default (one per core)."""
    work_ = "import numpy as np; a = np.ones((64, 64)); a @ a; np.sort(np.arange(10**6))"
    res = alternate({
        "OPENBLAS_NUM_THREADS=1": child_run(
            "import os; os.environ['OPENBLAS_NUM_THREADS'] = '1'; " + work_, "cpu"),
        "OpenBLAS default threads": child_run(
            "import os; os.environ.pop('OPENBLAS_NUM_THREADS', None); " + work_, "cpu"),
    }, repeat)
    report("D2 blas-threads: CPU of a process importing numpy", res, "s", 1)


def sort_keys(repeat: int, work: Path) -> None:
    """D3: grouping 1 M 64-bit hashes (index/builder.py, index/indexfile.py _ranks): the
    position packed into the low bits and a plain value sort, against an argsort, and against
    np.unique with index and inverse (extract/flowmatch.py _distinct)."""
    n = 1 << 20
    h = np.random.default_rng(2).integers(0, 1 << 63, n, dtype=np.uint64)
    bits = np.uint64((n - 1).bit_length())

    def packed() -> None:
        key = (h >> bits) << bits | np.arange(n, dtype=np.uint64)
        key.sort()
        (key & np.uint64((1 << int(bits)) - 1)).astype(np.intp)

    res = alternate({
        "packed value sort": per_call(packed, 2),
        "np.argsort": per_call(lambda: np.argsort(h), 2),
        "np.unique(return_index, return_inverse)": per_call(
            lambda: np.unique(h, return_index=True, return_inverse=True), 2),
    }, repeat)
    report("D3 sort-keys: permutation of 1 M 64-bit hashes", res, "ms", 1e3)


def cumsum_int32(repeat: int, work: Path) -> None:
    """D4: running count of 1 M booleans (index/indexfile.py _ranks), int32 against the
    default int64 accumulator."""
    new = np.random.default_rng(3).random(1 << 20) < 0.3
    res = alternate({
        "np.cumsum(dtype=int32)": per_call(lambda: np.cumsum(new, dtype=np.int32), 20),
        "np.cumsum (int64)": per_call(lambda: np.cumsum(new), 20),
    }, repeat)
    report("D4 cumsum-int32: cumsum of 1 M booleans", res, "ms", 1e3)


def teardown(repeat: int, work: Path) -> None:
    """D5: a fresh interpreter that imports what an extraction imports, leaving with
    cliutil.exit_now (no teardown) against a normal exit: wall and CPU seconds (wait4)."""
    imports = "import click, numpy, pcapvault.extract.cli, pcapvault.index.indexfile; "
    codes = {"exit_now (os._exit after flushing)":
             imports + "from pcapvault.index.cliutil import exit_now; exit_now(0)",
             "normal interpreter exit": imports + "raise SystemExit(0)"}
    cpu: dict[str, list[float]] = {k: [] for k in codes}

    def run(name: str) -> Callable[[], float]:
        def go() -> float:
            r = timed([sys.executable, "-P", "-c", codes[name]])
            cpu[name].append(r.cpu)
            return r.wall
        return go

    res = alternate({k: run(k) for k in codes}, repeat)
    report("D5 teardown: import an extraction's modules, then exit: wall", res, "ms", 1e3)
    report("D5 teardown: the same runs, CPU", cpu, "ms", 1e3)


def _import_time(stmt: str) -> Callable[[], float]:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    return lambda: child(code)


def zstd_import(repeat: int, work: Path) -> None:
    """D6: import time of the zstd bindings in a fresh interpreter (index/zstdlib.py,
    index/compressed.py)."""
    res = alternate({
        "backports.zstd (index sections)": _import_time(
            "from pcapvault.index.zstdlib import zstd"),
        "pyzstd": _import_time("import pyzstd"),
    }, repeat)
    report("D6 zstd-import: import time", res, "ms", 1e3)


def _index_columns(n: int) -> list[np.ndarray]:
    """Columns shaped like a packet index's (indexfile._packet_columns: i8, u8, u4, u4, u4):
    small timestamp deltas, record gaps of zero, caplens of a size mix, zero excess, Zipf-like
    flow numbers."""
    rng = np.random.default_rng(4)
    sizes = rng.choice([64, 64, 64, 64, 64, 64, 64, 590, 590, 590, 590, 1514], n)
    return [rng.exponential(800, n).astype("<i8"), np.zeros(n, "<u8"), sizes.astype("<u4"),
            np.zeros(n, "<u4"), np.minimum(rng.zipf(1.3, n), 43_000).astype("<u4")]


def byte_planes(repeat: int, work: Path) -> None:
    """D7: zstd on 1 M packets' index columns, byte-transposed against the plain columns, and
    level 1 against level 3 (index/indexfile.py)."""
    cols = _index_columns(1 << 20)
    planes = _byte_planes(cols).tobytes()
    plain = b"".join(c.tobytes() for c in cols)
    sizes = {}

    def comp(data: bytes, level: int, name: str) -> Callable[[], float]:
        def run() -> float:
            t = time.perf_counter()
            sizes[name] = len(zstd.compress(data, level=level))
            return time.perf_counter() - t
        return run

    res = alternate({
        "planes, level 1": comp(planes, 1, "planes, level 1"),
        "plain columns, level 1": comp(plain, 1, "plain columns, level 1"),
        "planes, level 3": comp(planes, 3, "planes, level 3"),
    }, repeat)
    report(f"D7 byte-planes: compressing {len(plain) / MiB:.0f} MiB of index columns", res,
           "ms", 1e3)
    for k, v in sizes.items():
        print(f"  {k:<44} {v / 1e3:10.1f} kB compressed")


def plane_cut(repeat: int, work: Path) -> None:
    """D8: the byte planes of 1 M packets' index columns, cut with shifts
    (indexfile._byte_planes) against a byte transposition of each column."""
    cols = _index_columns(1 << 20)
    out = np.empty(sum(c.nbytes for c in cols), np.uint8)

    def transpose() -> None:
        pos = 0
        for c in cols:
            out[pos : pos + c.nbytes].reshape(c.itemsize, len(c))[:] = \
                c.view(np.uint8).reshape(len(c), c.itemsize).T
            pos += c.nbytes

    assert (_byte_planes(cols) == (transpose(), out)[1]).all()
    res = alternate({"shifts (indexfile._byte_planes)": per_call(lambda: _byte_planes(cols), 5),
                     "byte transposition": per_call(transpose, 5)}, repeat)
    report("D8 plane-cut: byte planes of 1 M packets' columns (20 MiB)", res, "ms", 1e3)


def find_library(repeat: int, work: Path) -> None:
    """D9: loading libpcap by soname (index/libpcap.py) against ctypes.util.find_library."""
    res = alternate({
        "ctypes.CDLL('libpcap.so.0.8')": per_call(lambda: ctypes.CDLL("libpcap.so.0.8"), 20),
        "ctypes.util.find_library('pcap')": per_call(
            lambda: ctypes.util.find_library("pcap"), 5),
    }, repeat)
    report("D9 find-library: finding libpcap", res, "ms", 1e3)


def numpy_import(repeat: int, work: Path) -> None:
    """D10: import time in a fresh interpreter of the numpy-free postings reader
    (index/postings.py) against numpy, and numpy with the index code (extract/readahead.py)."""
    res = alternate({
        "pcapvault.index.postings": _import_time("import pcapvault.index.postings"),
        "numpy": _import_time("import numpy"),
        "pcapvault.index.indexfile (numpy included)": _import_time(
            "import pcapvault.index.indexfile"),
    }, repeat)
    report("D10 numpy-import: import time", res, "ms", 1e3)


def segment_size(repeat: int, work: Path) -> None:
    """D11: walking the records of a mixed-size pcap (index/pcapfile.py walk_offsets) with
    segments of 512 records against smaller and larger ones."""
    path = work / "mixed.pcap"
    if not path.exists():
        generate(path, 400_000, "mixed")
    arr = np.fromfile(path, np.uint8)
    saved = pcapfile._RECORDS_PER_SEGMENT

    def walk(records: int) -> Callable[[], float]:
        def run() -> float:
            pcapfile._RECORDS_PER_SEGMENT = records
            try:
                return per_call(lambda: pcapfile.walk_offsets(arr, 24, len(arr), False), 5)()
            finally:
                pcapfile._RECORDS_PER_SEGMENT = saved
        return run

    res = alternate({f"{r} records per segment": walk(r) for r in (512, 128, 2048, 8192)},
                    repeat)
    report(f"D11 segment-size: record walk of {len(arr) / MiB:.0f} MiB (400,000 records)",
           res, "ms", 1e3)


def map_populate(repeat: int, work: Path) -> None:
    """D18: mapping a cached 256 MiB file and touching every page (index/pcapfile.py's
    whole-file readers): MAP_POPULATE against a page fault per page."""
    path = work / "populate.bin"
    size = 256 * MiB
    with open(path, "wb") as f:
        f.write(bytes(size))
    fd = os.open(path, os.O_RDONLY)

    def run(flags: int) -> Callable[[], float]:
        def go() -> float:
            t = time.perf_counter()
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | flags, prot=mmap.PROT_READ)
            int(np.frombuffer(mm, np.uint8)[::4096].sum())
            dt = time.perf_counter() - t
            mm.close()
            return dt
        return go

    try:
        run(0)()  # the file in the page cache
        res = alternate({"MAP_POPULATE": run(mmap.MAP_POPULATE),
                         "a fault per page": run(0)}, repeat)
        report("D18 map-populate: map a cached 256 MiB file, touch every page", res, "ms",
               1e3)
    finally:
        os.close(fd)
        path.unlink()


# --- extract/ ---------------------------------------------------------------------------------

def _big_file(work: Path) -> Path:
    """A 1 GiB file of pseudo-random bytes on the disk under test, made once."""
    path = work / "big.bin"
    if not path.exists() or path.stat().st_size != BIG_FILE:
        block = np.random.default_rng(6).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            for _ in range(BIG_FILE // len(block)):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
    return path


def _evict(path: Path) -> None:
    """Make `path` cold: drop its pages (only its own) from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _sys_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def direct_read(repeat: int, work: Path) -> None:
    """D12: reading a cold 1 GiB file whole: O_DIRECT in 32 MiB pieces into one reused buffer
    (extract/direct.py) against the page cache in 128 KiB reads (as cat does). Prints wall
    and kernel CPU seconds."""
    path = _big_file(work)
    cpu: dict[str, list[float]] = {}

    def run(name: str, direct: bool) -> Callable[[], float]:
        def go() -> float:
            _evict(path)
            s0, t0 = _sys_cpu(), time.perf_counter()
            if direct:
                fd = open_direct(path)
                assert fd is not None, "O_DIRECT refused on this filesystem"
                buf = mmap.mmap(-1, 32 * MiB)
                off = 0
                while n := read_full(fd, buf, off):
                    off += n
            else:
                fd = os.open(path, os.O_RDONLY)
                buf = bytearray(128 << 10)
                while os.readv(fd, [buf]):
                    pass
            os.close(fd)
            dt = time.perf_counter() - t0
            cpu.setdefault(name, []).append(_sys_cpu() - s0)
            _evict(path)
            return dt
        return go

    res = alternate({"O_DIRECT, 32 MiB reads": run("O_DIRECT, 32 MiB reads", True),
                     "page cache, 128 KiB reads": run("page cache, 128 KiB reads", False)},
                    repeat)
    report("D12 direct-read: a cold 1 GiB file, wall", res, "s", 1)
    report("D12 direct-read: the same runs, kernel CPU", cpu, "s", 1)


def scattered_reads(repeat: int, work: Path) -> None:
    """D13: 12,000 scattered 4 KiB reads of a cold 1 GiB file: announced first with
    POSIX_FADV_WILLNEED (extract/readahead.py) against one after the other."""
    path = _big_file(work)
    offs = np.sort(np.random.default_rng(7).choice(BIG_FILE // 4096, 12_000, replace=False)
                   ) * 4096
    offs = offs.tolist()

    def run(announce: bool) -> Callable[[], float]:
        def go() -> float:
            _evict(path)
            fd = os.open(path, os.O_RDONLY)
            t = time.perf_counter()
            if announce:
                for o in offs:
                    os.posix_fadvise(fd, o, 4096, os.POSIX_FADV_WILLNEED)
            for o in offs:
                os.pread(fd, 4096, o)
            dt = time.perf_counter() - t
            os.close(fd)
            return dt
        return go

    res = alternate({"announced (WILLNEED), then read": run(True),
                     "read one after the other": run(False)}, repeat)
    report("D13 scattered-reads: 12,000 cold 4 KiB reads", res, "s", 1)
    one = statistics.median(res["read one after the other"]) / len(offs)
    print(f"  one cold 4 KiB read, one after the other: {one * 1e3:.3f} ms")
    _evict(path)


def fresh_memory(repeat: int, work: Path) -> None:
    """D14: filling 100 MB of numpy memory in a fresh process, allocated anew four times:
    the first allocation; the later ones with glibc's defaults (a block that large is handed
    back to the kernel when freed: fresh pages again) and with freed memory kept in the heap
    (extract/heap.py); and refilling memory already touched (no page faults)."""
    code = """if 1:
        import statistics, sys, time
        import numpy as np
        if sys.argv[1] == "keep":
            from pcapvault.extract.heap import keep_freed_memory
            keep_freed_memory()
        new, again = [], []
        for _ in range(4):
            t = time.perf_counter()
            a = np.empty(100_000_000, np.uint8)
            a.fill(1)
            new.append(time.perf_counter() - t)
            t = time.perf_counter()
            a.fill(2)
            again.append(time.perf_counter() - t)
            del a
        print(new[0], statistics.median(new[1:]), statistics.median(again))
    """
    first, keep, default, refill = ("first allocation (fresh process)",
                                     "later allocations, heap.keep_freed_memory()",
                                     "later allocations, glibc defaults",
                                     "refilling touched memory")
    figs: dict[str, list[float]] = {first: [], keep: [], default: [], refill: []}
    for _ in range(repeat):
        for mode, key in (("keep", keep), ("default", default)):
            p = subprocess.run([sys.executable, "-P", "-c", code, mode], capture_output=True,
                               text=True, check=True)
            a, b, c = map(float, p.stdout.split())
            figs[first].append(a)
            figs[key].append(b)
            figs[refill].append(c)
    report("D14 fresh-memory: allocating and filling 100 MB", figs, "ms", 1e3)


def sendfile_run(repeat: int, work: Path) -> None:
    """D15: 64 KiB of a cached file into a pipe (extract/output.py SEND_MIN_RUN): one sendfile
    call (pages referenced, not copied) against a write from the file's mapping (one copy),
    the pipe drained by splice into /dev/null either way; and the bare copy of 64 KiB."""
    path = work / "cached.bin"
    size = 64 * MiB
    with open(path, "wb") as f:
        f.write(np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8).tobytes())
    src = os.open(path, os.O_RDONLY)
    mm = mmap.mmap(src, size, prot=mmap.PROT_READ)
    view = memoryview(mm)
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    run = 64 << 10
    pos = [0]

    def drain() -> None:
        left = run
        while left:
            left -= os.splice(r, null, left)

    def next_off() -> int:
        pos[0] = (pos[0] + run) % size
        return pos[0]

    def by_sendfile() -> None:
        os.sendfile(w, src, next_off(), run)
        drain()

    def by_write() -> None:
        o = next_off()
        os.write(w, view[o : o + run])
        drain()

    dst = np.empty(run, np.uint8)
    arr = np.frombuffer(mm, np.uint8)

    def copy() -> None:
        o = next_off()
        np.copyto(dst, arr[o : o + run])

    try:
        for _ in range(size // run):  # cache and map every page first
            by_write()
        res = alternate({"sendfile of 64 KiB": per_call(by_sendfile, 2000),
                         "write of 64 KiB from the mapping": per_call(by_write, 2000),
                         "the copy alone (64 KiB memcpy)": per_call(copy, 2000)}, repeat)
        report("D15 sendfile-run: 64 KiB of a cached file into a pipe", res, "us", 1e6)
    finally:
        for fd in (src, r, w, null):
            os.close(fd)
        path.unlink()


def socket_relay(repeat: int, work: Path) -> None:
    """D16: CPU seconds of relaying 1 GiB through a Unix stream socket (the kernel copies it
    into socket buffers it allocates, as the service's relay did) against copying the same
    bytes into one reused buffer (extract/service/shared.py)."""
    chunk = np.random.default_rng(9).integers(0, 256, MiB, dtype=np.uint8)
    dst = np.empty(MiB, np.uint8)

    def relay() -> float:
        a, b = socket.socketpair()
        got = bytearray(MiB)

        def reader() -> None:
            view = memoryview(got)
            while b.recv_into(view):
                pass

        t = threading.Thread(target=reader)
        c0 = time.process_time()
        t.start()
        for _ in range(BIG_FILE // MiB):
            a.sendall(chunk)
        a.shutdown(socket.SHUT_WR)
        t.join()
        a.close()
        b.close()
        return time.process_time() - c0

    def copy() -> float:
        c0 = time.process_time()
        for _ in range(BIG_FILE // MiB):
            np.copyto(dst, chunk)
        return time.process_time() - c0

    res = alternate({"the copy alone, into a reused buffer": copy,
                     "through a Unix socket": relay}, repeat)
    report("D16 socket-relay: 1 GiB, CPU (both sides)", res, "s", 1)


def column_rows(repeat: int, work: Path) -> None:
    """D17: looking up 1 M cached rows of six 64-bit words and checking them (extract/
    flowmatch.py _Cache): rows kept as columns against rows kept as rows."""
    n, k = 1 << 20, 6
    rng = np.random.default_rng(10)
    cols = rng.integers(0, 1 << 62, (k, n), dtype=np.uint64)
    rows = np.ascontiguousarray(cols.T)
    pos = rng.integers(0, n, n)
    want_c = np.take(cols, pos, axis=1)
    want_r = rows[pos]

    def by_columns() -> None:
        got = np.take(cols, pos, axis=1)
        diff = np.zeros(n, np.uint64)
        for x, y in zip(got, want_c, strict=True):
            diff |= x ^ y

    res = alternate({
        "columns (take, xor per column)": per_call(by_columns, 3),
        "rows (fancy index, == and all)": per_call(
            lambda: (rows[pos] == want_r).all(axis=1), 3),
    }, repeat)
    report("D17 column-rows: 1 M rows of 6 words, gathered and compared", res, "ms", 1e3)


def compressed_read(repeat: int, work: Path) -> None:
    """D19: reading a `.pcap.zst` (index/compressed.py CompressedReader, which checks every
    frame whole against the seek table it parses itself) against pyzstd's SeekableZstdFile
    (which trusts the table and checks a frame at its end only): 20,000 sorted 1,500-byte
    reads, and the whole file, of D11's mixed-size pcap compressed as the recorder does."""
    import pyzstd

    from pcapvault.index.compressed import CompressedReader, compress_file

    src = work / "mixed.pcap"
    if not src.exists():
        generate(src, 400_000, "mixed")  # D11's file
    dst = work / "mixed.pcap.zst"
    compress_file(src, dst)
    size = CompressedReader(dst).size
    rng = np.random.default_rng(19)
    offs = np.sort(rng.integers(0, size - 1500, 20_000)).tolist()

    def ours_reads() -> float:
        t = time.process_time()
        with CompressedReader(dst) as r:
            for o in offs:
                r.pread(o, 1500)
        return time.process_time() - t

    def lib_reads() -> float:
        t = time.process_time()
        with pyzstd.SeekableZstdFile(dst, "r") as f:
            for o in offs:
                f.seek(o)
                f.read(1500)
        return time.process_time() - t

    def ours_all() -> float:
        t = time.process_time()
        with CompressedReader(dst) as r:
            r.read_all()
        return time.process_time() - t

    def lib_all() -> float:
        t = time.process_time()
        with pyzstd.SeekableZstdFile(dst, "r") as f:
            f.read()
        return time.process_time() - t

    try:
        report("D19 20,000 sorted reads of a .pcap.zst, CPU",
               alternate({"CompressedReader": ours_reads, "pyzstd SeekableZstdFile": lib_reads},
                         repeat), "s", 1)
        report("D19 the whole .pcap.zst, CPU",
               alternate({"CompressedReader": ours_all, "pyzstd SeekableZstdFile": lib_all},
                         repeat), "s", 1)
    finally:
        dst.unlink(missing_ok=True)


BENCHMARKS: dict[str, Callable[[int, Path], None]] = {
    "ring-cast": ring_cast,
    "blas-threads": blas_threads,
    "sort-keys": sort_keys,
    "cumsum-int32": cumsum_int32,
    "teardown": teardown,
    "zstd-import": zstd_import,
    "byte-planes": byte_planes,
    "plane-cut": plane_cut,
    "find-library": find_library,
    "numpy-import": numpy_import,
    "segment-size": segment_size,
    "direct-read": direct_read,
    "scattered-reads": scattered_reads,
    "fresh-memory": fresh_memory,
    "sendfile-run": sendfile_run,
    "socket-relay": socket_relay,
    "column-rows": column_rows,
    "map-populate": map_populate,
    "compressed-read": compressed_read,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="+", choices=[*BENCHMARKS, "all"], metavar="NAME",
                    help="all, or any of: " + ", ".join(BENCHMARKS))
    ap.add_argument("--repeat", type=int, default=7, help="runs of each variant (default 7)")
    ap.add_argument("--dir", default="/work/bench-micro",
                    help="where the data files go (the disk ones: on the disk under test)")
    ap.add_argument("--keep", action="store_true", help="keep the data files for another run")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    names = list(BENCHMARKS) if "all" in args.names else args.names
    work = Path(args.dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"bench/micro.py: cannot use --dir {work}: {e.strerror}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {time.strftime('%F %T')}")
    try:
        for name in names:
            t = time.perf_counter()
            BENCHMARKS[name](args.repeat, work)
            print(f"  ({time.perf_counter() - t:.1f} s)")
    finally:
        if not args.keep:
            for f in ("big.bin", "mixed.pcap"):
                (work / f).unlink(missing_ok=True)
            try:
                work.rmdir()
            except OSError:
                pass
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
