"""End to end: frames sent on a veth pair come back from the recorder's files, byte for byte."""

from __future__ import annotations

import signal
import struct
import subprocess
import time

import pytest
from recorderproc import (
    CORPUS,
    RecorderProc,
    read_pcap,
    read_stats,
    record,
    recorded_frames,
    synthetic_pcap,
    tool,
)

from pcapvault.index.dumpset import DumpSet


def test_frames_come_back_byte_for_byte(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 3000, 200)
    tagged = tmp_path / "vlan.pcap"
    synthetic_pcap(tagged, 200, 100, vlan=42)
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB")
    sent = veth.send([src, tagged])
    time.sleep(0.5)
    assert rec.stop() == 0, rec.stderr
    got = recorded_frames(tmp_path / "ds")
    assert [f for _, f, _ in got] == sent
    assert all(wire == len(f) for _, f, wire in got)
    ts = [t for t, _, _ in got]
    assert ts == sorted(ts), "timestamps must be monotonic"
    assert ts[0] % 1000 != 0 or ts[1] % 1000 != 0, "nanosecond timestamps expected"
    assert "final: received 3200 dropped 0" in rec.stderr


def test_corpus_replayed_raw_comes_back(veth, tmp_path):
    files = sorted(CORPUS.glob("*.pcap"))
    if not files:
        pytest.skip(f"corpus not found at {CORPUS}")
    rec = RecorderProc(veth, tmp_path / "ds", "--disk-limit", "1GB", "-s", "65535")
    sent = veth.send(files)
    time.sleep(0.5)
    assert rec.stop() == 0, rec.stderr
    assert len(sent) > 2500
    got = recorded_frames(tmp_path / "ds")
    assert [f for _, f, _ in got] == sent
    # tcpdump reads the files and sees every packet as we wrote it.
    for sf in DumpSet.open(tmp_path / "ds").files():
        copy = tmp_path / "copy.pcap"
        r = subprocess.run(["tcpdump", "--time-stamp-precision", "nano", "-r", str(sf.pcap),
                            "-w", str(copy)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert read_pcap(copy) == read_pcap(sf.pcap)


def test_usec_and_snaplen(veth, tmp_path):
    sent = record(veth, tmp_path, 50, 1000, "--usec", "-s", "128")
    sf = DumpSet.open(tmp_path / "ds").files()[0]
    assert struct.unpack_from("<I", sf.pcap.read_bytes())[0] == 0xA1B2C3D4
    got = read_pcap(sf.pcap)
    assert [f for _, f, _ in got] == [f[:128] for f in sent]
    assert [w for _, _, w in got] == [len(f) for f in sent]
    out = subprocess.run(["tcpdump", "-nr", str(sf.pcap)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count("UDP") == 50


def test_kernel_filter(veth, tmp_path):
    sent = record(veth, tmp_path, 70, 100, "-f", "udp src port 4003")
    got = [f for _, f, _ in recorded_frames(tmp_path / "ds")]
    want = [f for f in sent if struct.unpack_from("!H", f, 34)[0] == 4003]
    assert got == want and len(want) == 10
    stats = read_stats(tmp_path / "ds")
    assert int(stats["packets_filtered"]) == 60


def test_files_readable_by_tcpdump_and_tshark(veth, tmp_path):
    record(veth, tmp_path, 500, 300, "-p", "0.05M")
    files = DumpSet.open(tmp_path / "ds").files()
    assert len(files) > 2
    total = 0
    for sf in files:
        for cmd in (["tcpdump", "-nr", str(sf.pcap)], ["tshark", "-r", str(sf.pcap)]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        total += len(read_pcap(sf.pcap))
    assert total == 500
    assert tool("recorder")


def test_kernel_drops_and_stats_are_reported(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 20000, 1000)
    rec = RecorderProc(veth, tmp_path / "ds", "-b", "2", "--stats-interval", "0.2",
                       "--disk-limit", "1GB", "-A", str(tmp_path / "tl"))
    rec.signal(signal.SIGSTOP)  # a stalled consumer: the 2 MB ring overflows
    sent = veth.send([src])
    rec.signal(signal.SIGCONT)
    time.sleep(0.6)
    assert rec.stop() == 0
    stats = read_stats(tmp_path / "ds")
    written = len(recorded_frames(tmp_path / "ds"))
    assert int(stats["packets_dropped"]) > 0
    assert int(stats["packets_received"]) == written == int(stats["packets_written"])
    assert int(stats["packets_received"]) + int(stats["packets_dropped"]) == len(sent)
    assert stats["timeline_path"] == str(tmp_path / "tl")
    for key in ("bytes_captured", "bytes_written", "files_written", "bytes_on_disk",
                "first_dumped_epoch", "last_dumped_epoch", "packets_filtered"):
        assert key in stats
    assert float(stats["first_dumped_epoch"]) <= float(stats["last_dumped_epoch"])
    periodic = [line for line in rec.lines if line.startswith("recorder: received ")]
    assert periodic, "a stats line every --stats-interval seconds"
    assert f"dropped {stats['packets_dropped']}" in rec.lines[-1]  # the summary at exit
    assert any((tmp_path / "tl").rglob("*.pcap")), "-A puts the timeline elsewhere"


def promiscuity(veth) -> int:
    out = subprocess.run(["ip", "-n", veth.rx_ns, "-d", "link", "show", veth.rx],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split("promiscuity ")[1].split()[0])


def test_promiscuous_by_default_and_buffered_mode(veth, tmp_path):
    src = tmp_path / "in.pcap"
    synthetic_pcap(src, 300, 500)
    assert promiscuity(veth) == 0
    rec = RecorderProc(veth, tmp_path / "ds", "-r", "--disk-limit", "1GB")
    assert promiscuity(veth) == 1
    sent = veth.send([src])
    time.sleep(0.3)
    assert rec.stop() == 0
    assert promiscuity(veth) == 0, "the socket's membership goes with it"
    assert [f for _, f, _ in recorded_frames(tmp_path / "ds")] == sent  # -r: buffered writes
    rec = RecorderProc(veth, tmp_path / "ds2", "--no-promisc", "--disk-limit", "1GB")
    assert promiscuity(veth) == 0
    assert rec.stop() == 0
