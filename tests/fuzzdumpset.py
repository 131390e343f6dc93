"""A seeded mutation fuzzer of dump sets, for tests/extract/test_fuzz_dumpset.py and for
longer runs by hand (`python tests/extract/fuzzdumpset.py SEED COUNT`).

Every mutation damages or crafts one file of a copy of a small dump set (a pcap, its index,
a compressed pcap, a marker, the timeline); then the readers run as the user runs them, in
subprocesses with a timeout and an address-space limit, and each result is held to the rule:
exit 0 with the packets tcpdump selects from the same pcaps (compared by bytes), or a
non-zero exit with one-line messages and no traceback; never a hang, never a gigabyte
allocated because a length field says so. A mutation is named by the seed and its number, so
any failure is reproduced by running that one again.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from extract_helpers import (
    NS,
    SYNTH_START,
    build_dumpset,
    epoch,
    records,
    synthetic_traffic,
)

from pcapvault.index.compressed import compress_file
from pcapvault.index.indexfile import read_index, write_index

BIN = Path(sys.executable).parent
# What the tools may map: numpy and libpcap need a few hundred MB of address space; a reader
# that allocates what a damaged length field claims (gigabytes) fails with MemoryError.
MEMORY_LIMIT = 1536 << 20
TIMEOUT = 60
BEGIN, END = SYNTH_START, SYNTH_START + 3600 * NS
# Inside the second file, so that the window cuts files and blocks.
NARROW = (SYNTH_START + 200 * NS, SYNTH_START + 520 * NS)
FILTERS = ("", "host 10.0.1.3", "udp or arp")
INTERESTING = (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 32,
               (1 << 63) - 1, (1 << 64) - 1)

# Index header fields: name -> (offset, width).
INDEX_FIELDS = {
    "version": (8, 2), "flags": (10, 2), "linktype": (12, 4), "count": (16, 8),
    "first_ns": (24, 8), "last_ns": (32, 8), "pcap_size": (40, 8), "nflows": (48, 4),
    "summary_len": (52, 4), "packets_len": (56, 4), "directory_len": (64, 4),
    "keys": (68, 4), "frames_len": (72, 4),
}
PCAP_FIELDS = {"magic": (0, 4), "major": (4, 2), "minor": (6, 2), "snaplen": (16, 4),
               "linktype": (20, 4)}
RECORD_FIELDS = {"sec": (0, 4), "frac": (4, 4), "caplen": (8, 4), "wirelen": (12, 4)}


# --- the dump sets ---------------------------------------------------------------------------


def make_pristine(base: Path) -> dict[str, Path]:
    """Two small dump sets of the same synthetic traffic (Ethernet, IPv4/6, ARP, VLANs,
    fragments, cut frames), one plain and one compressed: five files each, some of them
    spanning a slot boundary."""
    packets = synthetic_traffic(900, SYNTH_START, seed=5, span_s=1500)
    plain = build_dumpset(base / "plain", packets, per_file=180).root
    z = base / "zst"
    shutil.copytree(plain, z, symlinks=True)
    for pcap in sorted(z.rglob("*.pcap")):
        if pcap.is_symlink():
            link = pcap.with_name(pcap.name + ".zst")
            os.symlink(os.readlink(pcap) + ".zst", link)
            os.symlink(os.readlink(pcap) + ".zst.idx", link.with_name(link.name + ".idx"))
            pcap.unlink()
            Path(str(pcap) + ".idx").unlink()
            continue
        zst = pcap.with_name(pcap.name + ".zst")
        compress_file(pcap, zst)
        Path(str(pcap) + ".idx").rename(str(zst) + ".idx")
        pcap.unlink()
    return {"plain": plain, "zst": z}


def stored(root: Path, suffix: str = ".pcap") -> list[Path]:
    """The dump set's stored pcaps (not the timeline's links), in time order."""
    return sorted((p for p in root.rglob("*" + suffix) if not p.is_symlink()
                   and "timeline" not in p.parts), key=lambda p: p.name)


# --- mutations ------------------------------------------------------------------------------


@dataclass
class Mutation:
    """What was done, to which dump set (`plain` or `zst`), and what the oracle may assume."""

    name: str
    dumpset: str = "plain"
    victim: Path | None = None  # the stored pcap the mutation is about (or its index's)
    crafted: bool = False  # checksums recomputed: only the pcaps can tell it is wrong
    # A consistent index that lies about a record (its time, offset or length): a reader
    # sees it only when it reads that record, which a query outside the lie need not do.
    lie: bool = False
    # Record headers of the pcap changed: a reader that never reads those records gets the
    # packets the pcap really holds, where tcpdump's walk may lose its way after them.
    records_damaged: bool = False
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.name + (" (checksums recomputed)" if self.crafted else "")


def put(data: bytearray, at: int, width: int, value: int) -> None:
    if at + width <= len(data):
        data[at : at + width] = (value % (1 << 8 * width)).to_bytes(width, "little")


def value_for(rng: random.Random, old: int, width: int) -> int:
    choices = [v for v in INTERESTING if v < 1 << 8 * width]
    choices += [old + 1, old - 1, old * 2, old ^ (1 << rng.randrange(8 * width))]
    return rng.choice(choices) % (1 << 8 * width)


def fix_checksums(data: bytearray) -> None:
    """Recompute an index's directory and header checksums from its own length fields, so
    that the damage reaches the checks behind them (a crafted file)."""
    if len(data) < 80 or struct.unpack_from("<H", data, 8)[0] < 3:
        if len(data) >= 64:
            struct.pack_into("<I", data, 60, zlib.crc32(data[64:], zlib.crc32(data[:60])))
        return
    slen, plen = struct.unpack_from("<II", data, 52)
    dlen = struct.unpack_from("<I", data, 64)[0]
    struct.pack_into("<I", data, 76, zlib.crc32(data[80 : 80 + dlen]))
    end = 80 + dlen + slen + plen
    struct.pack_into("<I", data, 60, zlib.crc32(data[64:end], zlib.crc32(data[:60])))


def zstd_bomb(size: int) -> bytes:
    """A zstd frame of RLE blocks that decompresses to `size` zero bytes (no content size
    in its header): 4 bytes per 128 KiB, what a hostile section could hold."""
    out = bytearray(struct.pack("<IBB", 0xFD2FB528, 0x00, 0x38))  # window 128 KiB
    block = 128 << 10
    while size > 0:
        n = min(size, block)
        size -= n
        out += (1 | 1 << 1 | n << 3).to_bytes(3, "little") if size == 0 else \
            (1 << 1 | n << 3).to_bytes(3, "little")
        out += b"\0"
    return bytes(out)


def sections(data: bytes) -> dict[str, tuple[int, int]]:
    """(offset, length) of each part of a version 3 to 5 index, from its own header."""
    slen, plen = struct.unpack_from("<II", data, 52)
    dlen = struct.unpack_from("<I", data, 64)[0]
    return {"header": (0, 80), "directory": (80, dlen), "summary": (80 + dlen, slen),
            "packets": (80 + dlen + slen, plen), "frames": (80 + dlen + slen + plen,
                                                             len(data) - (80 + dlen + slen + plen))}


def replace_section(data: bytes, which: str, blob: bytes) -> bytearray:
    """`data` with one section's bytes replaced by `blob`, its length field set to match."""
    s = sections(data)
    at, n = s[which]
    out = bytearray(data[:at] + blob + data[at + n :])
    field_at = {"summary": 52, "packets": 56, "directory": 64}.get(which)
    if field_at is not None:
        struct.pack_into("<I", out, field_at, len(blob))
    else:
        struct.pack_into("<I", out, 72, len(out) - s["frames"][0])
    return out


def mutate_index(rng: random.Random, root: Path, others: list[Path], idx: Path) -> Mutation:
    data = bytearray(idx.read_bytes())
    kind = rng.choice(["field", "field", "field", "flip", "flip", "truncate", "bomb",
                       "swap", "another", "future", "column", "column", "empty"])
    m = Mutation(f"{idx.name}: {kind}")
    m.crafted = kind not in ("flip", "truncate", "empty") or rng.random() < 0.5
    if kind == "field":
        name = rng.choice(list(INDEX_FIELDS))
        at, width = INDEX_FIELDS[name]
        old = int.from_bytes(data[at : at + width], "little")
        new = value_for(rng, old, width)
        put(data, at, width, new)
        m.name += f" {name} {old} -> {new}"
    elif kind == "flip":
        part, (at, n) = rng.choice(list(sections(data).items()))
        if n:
            pos = at + rng.randrange(n)
            bit = rng.randrange(8)
            data[pos] ^= 1 << bit
            m.name += f" {part} byte {pos} bit {bit}"
    elif kind == "truncate":
        points = sorted({p for at, n in sections(data).values() for p in (at, at + n - 1)})
        cut = rng.choice(points + [0, 7, 10, 63, 64, 79])
        del data[cut:]
        m.name += f" at {cut}"
    elif kind == "bomb":
        which = rng.choice(["summary", "packets"])
        size = rng.choice([1 << 30, 3 << 30])
        data = replace_section(data, which, zstd_bomb(size))
        if rng.random() < 0.5:
            put(data, 16, 8, size // 28 + 1)  # a count (and flows) that would admit it
            put(data, 48, 4, (1 << 32) - 1)
        m.name += f" {which} -> {size >> 20} MiB of zeros"
    elif kind == "swap":
        s = sections(data)
        summary = bytes(data[slice(s["summary"][0], sum(s["summary"]))])
        pk = bytes(data[slice(s["packets"][0], sum(s["packets"]))])
        data = replace_section(bytes(data), "packets", summary)
        data = replace_section(bytes(data), "summary", pk)
    elif kind == "another":
        src = rng.choice([o for o in others if o != idx])
        data = bytearray(src.read_bytes())
        m.name += f" copied from {src.name}"
        m.crafted = False
    elif kind == "future":
        version = rng.choice([0, 6, 7, 0xFFFF])
        put(data, 8, 2, version)
        m.name += f" version {version}"
    elif kind == "column":
        return _mutate_column(rng, idx, m)
    elif kind == "empty":
        data = bytearray()
    if m.crafted:
        fix_checksums(data)
    idx.write_bytes(bytes(data))
    return m


def _mutate_column(rng: random.Random, idx: Path, m: Mutation) -> Mutation:
    """A consistent index (checksums, postings and all) that lies about one record."""
    ix = read_index(idx)
    i = rng.randrange(ix.count)
    col = rng.choice(["offset", "caplen", "wirelen", "ts_ns"])
    arr = getattr(ix, col).copy()
    old = int(arr[i])
    width = 8 if col in ("offset", "ts_ns") else 4
    new = value_for(rng, old, width)
    if col == "ts_ns":
        new = min(new, (1 << 62))
    if col == "offset" and rng.random() < 0.5:
        new = int(ix.offset[rng.randrange(ix.count)])
    arr[i] = new
    setattr(ix, col, arr)
    if col == "ts_ns":
        ix.first_ns, ix.last_ns = int(arr.min()), int(arr.max())
    if rng.random() < 0.7:  # a pcap size that admits the lie
        ends = ix.offset.astype(object) + 16 + ix.caplen.astype(object)
        ix.pcap_size = max(ix.pcap_size, int(max(ends)))
        if ix.pcap_size >= 1 << 64:
            ix.pcap_size = (1 << 64) - 1
    try:
        write_index(idx, ix)
    except (ValueError, OverflowError, TypeError) as e:
        m.name += f" (not written: {e})"
        return m
    m.name += f" entry {i} {col} {old} -> {new}"
    m.crafted = m.lie = True
    return m


def mutate_pcap(rng: random.Random, root: Path, pcap: Path) -> Mutation:
    data = bytearray(pcap.read_bytes())
    offs = records(pcap)
    kind = rng.choice(["global", "record", "record", "record", "truncate", "flip", "append"])
    m = Mutation(f"{pcap.name}: {kind}")
    if kind == "global":
        name = rng.choice(list(PCAP_FIELDS))
        at, width = PCAP_FIELDS[name]
        old = int.from_bytes(data[at : at + width], "little")
        new = rng.choice([0xA1B2C3D4, 0xD4C3B2A1, 0x4D3CB2A1, 0x0A0D0D0A]) if name == "magic" \
            else value_for(rng, old, width)
        put(data, at, width, new)
        m.name += f" {name} {old:#x} -> {new:#x}"
    elif kind == "record":
        k = rng.choice([0, len(offs) - 1, rng.randrange(len(offs))])
        name = rng.choice(list(RECORD_FIELDS))
        at, width = RECORD_FIELDS[name]
        at += offs[k]
        old = int.from_bytes(data[at : at + width], "little")
        new = value_for(rng, old, width)
        put(data, at, width, new)
        m.name += f" record {k} (byte {offs[k]}) {name} {old} -> {new}"
        m.records_damaged = True
    elif kind == "truncate":
        k = rng.randrange(len(offs))
        cut = rng.choice([0, 1, 23, 24, 25, offs[k], offs[k] + 1, offs[k] + 15, offs[k] + 16,
                          len(data) - 1])
        del data[cut:]
        m.name += f" at {cut}"
    elif kind == "flip":
        k = rng.randrange(len(offs))
        pos = rng.choice([rng.randrange(24), offs[k] + rng.randrange(16)])
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        m.name += f" byte {pos} bit {bit}"
        m.records_damaged = pos >= 24
    elif kind == "append":
        tail = rng.choice([b"\0", bytes(15), bytes(16), struct.pack("<IIII", 1, 0, 1 << 31, 5),
                           struct.pack("<IIII", 1763737300, 0, 100, 100) + bytes(50)])
        data += tail
        m.name += f" {len(tail)} bytes"
    pcap.write_bytes(bytes(data))
    return m


def mutate_zst(rng: random.Random, root: Path, zst: Path) -> Mutation:
    data = bytearray(zst.read_bytes())
    kind = rng.choice(["truncate", "flip", "seektable", "seektable", "plain"])
    m = Mutation(f"{zst.name}: {kind}", dumpset="zst")
    # The seek table: a skippable frame ending in (frames u32, descriptor u8, magic u32);
    # entries of (compressed u32, decompressed u32[, checksum u32]).
    frames, desc = struct.unpack_from("<IB", data, len(data) - 9)
    entry = 12 if desc & 0x80 else 8
    table = len(data) - 9 - frames * entry
    if kind == "truncate":
        cut = rng.choice([0, 4, len(data) - 1, len(data) - 9, table - 8, table,
                          rng.randrange(len(data))])
        del data[cut:]
        m.name += f" at {cut}"
    elif kind == "flip":
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        m.name += f" byte {pos}"
    elif kind == "seektable":
        f = rng.randrange(frames)
        which = rng.choice([0, 4])
        at = table + f * entry + which
        old = struct.unpack_from("<I", data, at)[0]
        new = value_for(rng, old, 4)
        put(data, at, 4, new)
        m.name += f" frame {f} {'compressed' if which == 0 else 'decompressed'} size " \
                  f"{old} -> {new}"
    elif kind == "plain":
        import pyzstd

        raw = pyzstd.SeekableZstdFile(str(zst)).read()
        data = bytearray(pyzstd.compress(raw))
        m.name += " (a zstd stream without a seek table)"
    zst.write_bytes(bytes(data))
    return m


def mutate_layout(rng: random.Random, root: Path) -> Mutation:
    """The markers and the timeline."""
    kind = rng.choice(["marker", "marker", "tlmarker", "slotname", "link", "stray"])
    m = Mutation(f"layout: {kind}")
    tl = root / "timeline"
    if kind in ("marker", "tlmarker"):
        path = root / ".pcapvault" if kind == "marker" else tl / ".pcapvault-timeline"
        meta = json.loads(path.read_text())
        key = rng.choice(list(meta) + ["format"])
        value = rng.choice([None, 2, -1, 1 << 70, "x", "", [], {}, "/nonexistent", "..",
                            True, 1.5])
        how = rng.choice(["set", "set", "set", "delete", "garbage"])
        if how == "set":
            meta[key] = value
            path.write_text(json.dumps(meta))
        elif how == "delete":
            meta.pop(key, None)
            path.write_text(json.dumps(meta))
        else:
            path.write_bytes(rng.choice([b"", b"{", b"\xff\xfe", b"[]", b"null", b"1" * 5000]))
        m.name += f" {path.name} {how} {key} = {value!r}"
    elif kind == "slotname":
        slot = next(p for p in tl.rglob("*") if p.is_dir() and len(p.relative_to(tl).parts) == 5)
        level = rng.randrange(5)  # 0: a year's name, 4: a slot's
        name = rng.choice(["\u00b2", "\u0663", "99999999999999999999", "13", "-1", "0",
                           "2025.5"])
        target = slot.parents[4 - level] / name
        if level == 4:
            shutil.copytree(slot, target, symlinks=True)
        else:
            target.mkdir(exist_ok=True)
        m.name += f" {target.relative_to(tl)}"
    elif kind == "link":
        links = sorted(p for p in tl.rglob("*.pcap*") if p.is_symlink())
        link = rng.choice(links)
        how = rng.choice(["self", "dangling", "dir", "absolute", "superscript"])
        if how == "superscript":
            os.symlink(os.readlink(link), link.with_name("\u00b9" + link.name[1:]))
        else:
            link.unlink()
            target = {"self": link.name, "dangling": "nonexistent.pcap", "dir": ".",
                      "absolute": "/dev/zero"}[how]
            os.symlink(target, link)
        m.name += f" {link.name} {how}"
    elif kind == "stray":
        slot = next(p for p in tl.rglob("*") if p.is_dir() and len(p.relative_to(tl).parts) == 5)
        name = rng.choice(["1763737200.000000.pcap", "x.pcap", "1.1.pcap", "1763737200.0.pcap",
                           "1763737201.000001.pcap.zst"])
        path = slot / name
        if not path.exists():
            if rng.random() < 0.5:
                path.write_bytes(b"")
            else:
                path.mkdir()
        m.name += f" {path.relative_to(tl)}"
    return m


def mutate(seed: int, number: int, pristine: dict[str, Path], work: Path) -> tuple[Mutation,
                                                                                  Path]:
    """Mutation `number` of `seed`, applied to a fresh copy of a pristine dump set under
    `work`: (what was done, the copy's root)."""
    rng = random.Random(f"{seed}-{number}")
    target = rng.choice(["index"] * 5 + ["pcap"] * 4 + ["zst"] * 2 + ["zidx"] + ["layout"] * 2)
    which = "zst" if target in ("zst", "zidx") else "plain"
    root = work / f"m{number}"
    shutil.copytree(pristine[which], root, symlinks=True)
    suffix = ".pcap.zst" if which == "zst" else ".pcap"
    files = stored(root, suffix)
    victim = rng.choice(files)
    if target == "index" or target == "zidx":
        m = mutate_index(rng, root, [Path(str(f) + ".idx") for f in files],
                         Path(str(victim) + ".idx"))
    elif target == "pcap":
        m = mutate_pcap(rng, root, victim)
    elif target == "zst":
        m = mutate_zst(rng, root, victim)
    else:
        m = mutate_layout(rng, root)
    m.dumpset = which
    m.victim = victim
    m.name = f"seed {seed} mutation {number}: {m.name}"
    return m, root


# --- running the readers ----------------------------------------------------------------------


@dataclass
class Run:
    argv: list[str]
    rc: int | None  # None: killed after TIMEOUT
    stdout: bytes
    stderr: str

    def __str__(self) -> str:
        return f"{' '.join(self.argv)} -> {self.rc}\n{self.stderr[-3000:]}"


def limit_memory() -> None:
    """In the child: the address-space limit (MEMORY_LIMIT)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run(tool: str, *args: str, timeout: float = TIMEOUT) -> Run:
    """A reader's console script, with the address-space limit, as the user runs it."""
    argv = [str(BIN / tool), *args]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "TZ": "UTC"}
    try:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, preexec_fn=limit_memory,
                           env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return Run(argv, None, e.stdout or b"", (e.stderr or b"").decode(errors="replace"))
    return Run(argv, r.returncode, r.stdout, r.stderr.decode(errors="replace"))


def pcap_records(data: bytes) -> tuple[list[tuple[int, int, bytes]], bool]:
    """(ts_ns, wire length, bytes) of a little-endian pcap's records, and whether it reads
    to its end (an output must)."""
    if len(data) < 24:
        return [], not data
    magic = struct.unpack_from("<I", data)[0]
    mult = {0xA1B23C4D: 1, 0xA1B2C3D4: 1000}.get(magic)
    if mult is None:
        return [], False
    out, o = [], 24
    while o + 16 <= len(data):
        sec, frac, cap, wire = struct.unpack_from("<IIII", data, o)
        if o + 16 + cap > len(data):
            return out, False
        out.append((sec * NS + frac * mult, wire, data[o + 16 : o + 16 + cap]))
        o += 16 + cap
    return out, o == len(data)


def oracle(pcaps: list[Path], expr: str, begin: int, end: int) -> tuple[list, bool]:
    """tcpdump's selection from the pcaps, in the window: (packets, whether tcpdump read
    every file to its end without complaint)."""
    out, clean = [], True
    for f in pcaps:
        r = subprocess.run(["tcpdump", "--time-stamp-precision=nano", "-r", str(f), "-w", "-",
                            expr], capture_output=True, timeout=TIMEOUT)
        got, whole = pcap_records(r.stdout)
        clean &= r.returncode == 0 and whole and b"truncated" not in r.stderr
        out += [p for p in got if begin <= p[0] < end]
    return out, clean


def plain_pcaps(root: Path, pristine: dict[str, Path]) -> list[Path]:
    """The pcaps tcpdump reads for the dump set at `root`: its own, or for the compressed
    one the plain pcaps it was made from (the mutations of compressed pcaps damage only how
    they are stored: a reader must give back these packets or say it cannot)."""
    return stored(root) or stored(pristine["plain"])


def decompressed(root: Path, work: Path) -> list[Path]:
    """The dump set's pcaps, compressed ones decompressed into `work` (after a repair, which
    keeps of a damaged .pcap.zst the packets before the damage)."""
    import pyzstd

    out = stored(root)
    for z in stored(root, ".pcap.zst"):
        p = work / z.name.removesuffix(".zst")
        with pyzstd.SeekableZstdFile(str(z)) as f:
            p.write_bytes(f.read())
        out.append(p)
    return sorted(out, key=lambda p: p.name)


def problems_of(r: Run) -> list[str]:
    """What breaks the rule whatever the output: a hang, a traceback, a many-line error."""
    prog = Path(r.argv[0]).name
    if r.rc is None:
        return [f"timeout: {r}"]
    if "Traceback" in r.stderr or "MemoryError" in r.stderr or r.rc < 0:
        return [f"crash: {r}"]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.rc not in (0, 1, 3) and len(lines) != 1:
        return [f"not one line: {r}"]
    if any(not ln.startswith(prog) for ln in lines if r.rc != 0):
        return [f"unprefixed message: {r}"]
    return []


def check_extract(root: Path, pcaps: list[Path], m: Mutation, before: list[Path]
                  ) -> list[str]:
    """npcapextract over the window (whole, and cut) with a few filters: exit 0 or 1 with
    exactly tcpdump's packets, or exit 3 (incomplete, said so) with a readable capture, or
    another non-zero exit in one line. `before`: the pcaps before the mutation, whose
    packets are also right where the mutation damaged record headers."""
    problems = []
    for expr, (b, e) in [(f, (BEGIN, END)) for f in FILTERS] + [("tcp", NARROW)]:
        r = run("npcapextract", "-t", str(root), "-b", epoch(b), "-e", epoch(e), "-f", expr,
                "-O")
        problems += problems_of(r)
        if r.rc not in (0, 1, 3):
            continue
        got, whole = pcap_records(r.stdout)
        if not whole:
            problems.append(f"unreadable output: {r}")
        if r.rc in (0, 1):
            want, _ = oracle(pcaps, expr, b, e)
            if got != want and m.records_damaged and got == oracle(before, expr, b, e)[0]:
                continue
            if got != want and not m.lie:
                problems.append(f"exit {r.rc} with {len(got)} packets, tcpdump selects "
                                f"{len(want)} (filter {expr!r}): {r}")
    return problems


def check_flows(root: Path, m: Mutation, pristine_flows: bytes | None) -> list[str]:
    """npcapflows: the rule; and when an index was damaged without recomputing its checksums,
    the same table as before or a warning."""
    r = run("npcapflows", "-t", str(root), "-b", epoch(BEGIN), "-e", epoch(END), "-n", "0",
            "--json")
    problems = problems_of(r)
    if (r.rc == 0 and not r.stderr.strip() and pristine_flows is not None and not m.crafted
            and m.dumpset == "plain" and ".idx:" in m.name and r.stdout != pristine_flows):
        problems.append(f"a damaged index changed the conversations silently: {r}")
    return problems


def check_files(work: Path, m: Mutation) -> list[str]:
    """npcapprintindex (plain, JSON and -c) on the mutated file's index, npcapindex on its
    pcap and npcapdecompress on a compressed one: the rule, and a fresh index checks clean."""
    problems = []
    for pcap in [m.victim] if m.victim and m.victim.exists() else []:
        idx = Path(str(pcap) + ".idx")
        if idx.exists():
            problems += problems_of(run("npcapprintindex", "-i", str(idx), "-j", "-n", "3"))
            problems += problems_of(run("npcapprintindex", "-c", "-i", str(idx)))
        fresh = work / (pcap.name + ".fresh.idx")
        r = run("npcapindex", "-i", str(pcap), "-o", str(fresh))
        problems += problems_of(r)
        if r.rc == 0:
            c = run("npcapprintindex", "-c", "-i", str(fresh), "--pcap", str(pcap))
            if c.rc != 0:
                problems.append(f"a fresh index does not check against its pcap: {c}")
        if pcap.name.endswith(".zst"):
            problems += problems_of(run("npcapdecompress", "-i", str(pcap), "-o",
                                        str(work / "out.pcap")))
    return problems


def check_repair(root: Path, pcaps: Callable[[], list[Path]], m: Mutation) -> list[str]:
    """npcaprepair, then a second dry run finds nothing, and an extraction answers exit 0
    (or 1) with tcpdump's packets of the repaired pcaps."""
    r = run("npcaprepair", str(root), "-q")
    problems = problems_of(r)
    if r.rc != 0:
        return problems
    again = run("npcaprepair", str(root), "-n")
    problems += problems_of(again)
    if again.rc != 0 or "nothing to repair" not in again.stdout.decode():
        problems.append(f"a second repair is not clean: {again}\n{again.stdout.decode()}")
    x = run("npcapextract", "-t", str(root), "-b", epoch(BEGIN), "-e", epoch(END), "-O")
    got, _ = pcap_records(x.stdout)
    want, _ = oracle(pcaps(), "", BEGIN, END)
    if x.rc not in (0, 1) or got != want:
        problems.append(f"after repair: exit {x.rc}, {len(got)} packets, tcpdump reads "
                        f"{len(want)}: {x}")
    return problems


def fuzz_one(seed: int, number: int, pristine: dict[str, Path], work: Path,
             pristine_flows: bytes | None = None, repair: bool = True) -> list[str]:
    """Every check of one mutation; the problems found, each naming the mutation."""
    m, root = mutate(seed, number, pristine, work)
    scratch = work / f"s{number}"
    scratch.mkdir()
    problems = check_extract(root, plain_pcaps(root, pristine), m, stored(pristine["plain"]))
    problems += check_flows(root, m, pristine_flows)
    problems += check_files(scratch, m)
    if repair:
        problems += check_repair(root, lambda: decompressed(root, scratch), m)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return [f"{m}\n  {p}" for p in problems]


def fuzz(seed: int, numbers: range, base: Path, workers: int = 2,
         report: Callable[[str], None] | None = None, repair: bool = True) -> list[str]:
    """Run the mutations `numbers` of `seed` over dump sets made under `base`, `workers` at a
    time; every problem found."""
    from concurrent.futures import ThreadPoolExecutor

    pristine = make_pristine(base / "pristine")
    flows = run("npcapflows", "-t", str(pristine["plain"]), "-b", epoch(BEGIN), "-e",
                epoch(END), "-n", "0", "--json").stdout
    work = base / "work"
    work.mkdir()
    out: list[str] = []
    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(lambda n: fuzz_one(seed, n, pristine, work, flows, repair),
                              numbers):
            for p in found:
                out.append(p)
                if report:
                    report(p)
    return out


if __name__ == "__main__":
    import tempfile

    seed, count = int(sys.argv[1]), int(sys.argv[2])
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    with tempfile.TemporaryDirectory(prefix="pv-fuzz-") as tmp:
        found = fuzz(seed, range(first, first + count), Path(tmp),
                     report=lambda p: print(p + "\n", flush=True))
    print(f"{len(found)} problems in {count} mutations")
