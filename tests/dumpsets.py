"""Small dump sets written the recorder's way, without a capture, and npcaprepair's checks of
them."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from recorderproc import read_pcap, tool

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.pcapfile import global_header
from pcapvault.recorder.indexer import index_and_link

BASE_NS = 1_763_737_000 * 10**9


def make_dumpset(root: Path, nfiles: int = 3, per_file: int = 50) -> DumpSet:
    """A small dump set written the recorder's way, without a capture."""
    ds = DumpSet.create(root, interface="test0", linktype=1, snaplen=1536, nanosecond=True)
    for f in range(nfiles):
        recs = []
        for i in range(per_file):
            ts = BASE_NS + (f * per_file + i) * 10_000_000
            frame = bytes(12) + b"\x08\x00" + struct.pack("!I", f * 1000 + i) * 10
            recs.append(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(frame), len(frame))
                        + frame)
        temp = ds.temp_path(f)
        temp.write_bytes(global_header(1, 1536, True) + b"".join(recs))
        sf = ds.place(temp, BASE_NS + f * per_file * 10_000_000)
        index_and_link(ds, sf)
    return ds


def repair(ds_root: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([tool("npcaprepair"), str(ds_root), *args], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def assert_clean(ds_root: Path) -> None:
    """The dump set checks clean: a dry run finds nothing, every index checks against its pcap."""
    r = repair(ds_root, "--dry-run")
    assert "nothing to repair" in r.stdout, r.stdout
    for sf in DumpSet.open(ds_root).files():
        c = subprocess.run([tool("npcapprintindex"), "-c", "-i", str(sf.index)],
                           capture_output=True, text=True)
        assert c.returncode == 0, c.stdout + c.stderr


def all_packets(ds_root: Path) -> list[tuple[int, bytes, int]]:
    out = []
    for sf in DumpSet.open(ds_root).files():
        out += read_pcap(sf.pcap)
    return out
