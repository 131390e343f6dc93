"""Compressed recording: every packet comes back, byte for byte, through one reader."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from dumpsets import all_packets, assert_clean, make_dumpset, repair
from recorderproc import RecorderProc, read_pcap, synthetic_pcap, tool

from pcapvault.index import compressed
from pcapvault.index.dumpset import DumpSet

FILTERS = ["", "udp src port 4003", "ip and not udp port 4001", "len > 600", "vlan", "tcp"]


def extract(ds: Path, flt: str, out: Path) -> list[bytes]:
    r = subprocess.run([tool("npcapextract"), "-t", str(ds), "-b", "-1d", "-e", "now",
                        "-f", flt, "-0", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return [f for _, f, _ in read_pcap(out)]


def test_compressed_recording_matches_plain_recording(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 4000, 700)
    plain = RecorderProc(veth, tmp_path / "plain", "-p", "0.5M", "--disk-limit", "1GB")
    packed = RecorderProc(veth, tmp_path / "packed", "-p", "0.5M", "--compress",
                          "--disk-limit", "1GB")
    sent = veth.send([src])
    time.sleep(0.5)
    assert plain.stop() == 0 and packed.stop() == 0, packed.stderr
    files = DumpSet.open(tmp_path / "packed").files()
    assert len(files) > 3 and all(sf.pcap.name.endswith(".pcap.zst") for sf in files)
    assert not list((tmp_path / "packed").rglob("*.pcap")), "plain copies are deleted"
    # Every packet comes back from the compressed files, in order.
    for flt in FILTERS:
        a = extract(tmp_path / "plain", flt, tmp_path / "a.pcap")
        b = extract(tmp_path / "packed", flt, tmp_path / "b.pcap")
        assert a == b, flt
    assert extract(tmp_path / "packed", "", tmp_path / "all.pcap") == sent
    assert_clean(tmp_path / "packed")
    # npcapdecompress gives back a pcap that tcpdump reads, with the same records.
    out = tmp_path / "d.pcap"
    r = subprocess.run([tool("npcapdecompress"), "-i", str(files[0].pcap), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_pcap(out)[0][1] == sent[0]
    t = subprocess.run(["tcpdump", "-r", str(out), "-w", str(tmp_path / "t.pcap")],
                       capture_output=True)
    assert t.returncode == 0
    # The same traffic compresses well (the frames are mostly padding).
    psize = sum(sf.pcap.stat().st_size for sf in DumpSet.open(tmp_path / "plain").files())
    zsize = sum(sf.pcap.stat().st_size for sf in files)
    assert zsize < psize / 4


def test_decompress_is_byte_identical(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=1, per_file=3000)
    sf = ds.files()[0]
    z = tmp_path / "x.pcap.zst"
    compressed.compress_file(sf.pcap, z, 3)
    for out in (tmp_path / "y.pcap", "-"):
        r = subprocess.run([tool("npcapdecompress"), "-i", str(z), "-o", str(out)],
                           capture_output=True)
        assert r.returncode == 0, r.stderr
        data = r.stdout if out == "-" else Path(out).read_bytes()
        assert data == sf.pcap.read_bytes()


@pytest.mark.parametrize("bad, message", [
    (b"not a zstd file at all" * 10, "not a pcapvault compressed pcap"),
    ("truncated", "truncated"),
    ("plain-zstd", "not a pcapvault compressed pcap"),
])
def test_decompress_refuses_foreign_and_truncated(tmp_path, bad, message):
    import pyzstd

    ds = make_dumpset(tmp_path / "ds", nfiles=1, per_file=3000)
    z = tmp_path / "x.pcap.zst"
    compressed.compress_file(ds.files()[0].pcap, z, 3)
    if bad == "truncated":
        os.truncate(z, z.stat().st_size // 2)
    elif bad == "plain-zstd":
        z.write_bytes(pyzstd.compress(ds.files()[0].pcap.read_bytes()))
    else:
        z.write_bytes(bad)
    r = subprocess.run([tool("npcapdecompress"), "-i", str(z), "-o", str(tmp_path / "o.pcap")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "o.pcap").exists()


def compress_dumpset(ds: DumpSet) -> None:
    """Turn a plain dump set into a compressed one the recorder's way."""
    from pcapvault.recorder.indexer import index_and_link

    for sf in ds.files():
        for p in (sf.index,):
            p.unlink()
        index_and_link(ds, sf, compress=3)
    repair(ds.root)  # drops the plain files' stale links


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_repair_keeps_complete_packets_of_damaged_zstd(tmp_path, damage):
    ds = make_dumpset(tmp_path / "ds", nfiles=2, per_file=4000)
    before = all_packets(tmp_path / "ds")
    compress_dumpset(ds)
    assert_clean(tmp_path / "ds")
    victim = ds.files()[1].pcap
    assert victim.name.endswith(".zst")
    size = victim.stat().st_size
    if damage == "truncate":
        os.truncate(victim, size * 2 // 3)
    else:
        data = bytearray(victim.read_bytes())
        data[size * 2 // 3] ^= 0x55
        victim.write_bytes(bytes(data))
    r = repair(tmp_path / "ds")
    assert "recompress" in r.stdout and "rebuild index" in r.stdout, r.stdout
    assert_clean(tmp_path / "ds")
    after = []
    for sf in DumpSet.open(tmp_path / "ds").files():
        out = tmp_path / "o.pcap"
        subprocess.run([tool("npcapdecompress"), "-i", str(sf.pcap), "-o", str(out)],
                       check=True)
        after += read_pcap(out)
    # The first file is whole; of the damaged one, a complete prefix of its packets survives.
    assert after == before[: len(after)]
    assert 4000 < len(after) < len(before)


def test_a_restarted_indexer_links_what_the_dead_one_compressed(tmp_path):
    """The indexer died after compressing, indexing and removing the plain file but before
    linking: the restarted one gets the plain file's name again and must link the copy."""
    from pcapvault.index import timeline
    from pcapvault.recorder.indexer import index_and_link

    ds = make_dumpset(tmp_path / "ds", nfiles=2)
    sf = ds.files()[0]
    sf.index.unlink()
    stored = index_and_link(ds, sf, compress=3)
    assert stored is not None and stored.name.endswith(".pcap.zst") and not sf.pcap.exists()
    # Only the links go: what the dead indexer had not done yet.
    timeline.unlink(ds.timeline, sf.slot, sf.name)
    timeline.unlink(ds.timeline, stored.slot, stored.name)
    assert stored.name not in timeline.slot_entries(ds.timeline, stored.slot)
    again = index_and_link(ds, sf, compress=3)
    assert again == stored
    assert stored.name in timeline.slot_entries(ds.timeline, stored.slot)
