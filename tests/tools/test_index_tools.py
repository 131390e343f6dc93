"""npcapindex and npcapprintindex, run as a user would (exit codes, one-line errors)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from frames import CORPUS
from indexes import (
    as_version,
    with_postings,
)

from pcapvault.index import builder
from pcapvault.index.builder import build_index
from pcapvault.index.indexfile import (
    FLAG_ADDRS,
    VERSION,
    build_postings,
    encode_postings,
    read_index,
    write_index,
)
from pcapvault.index.pcapfile import MAGIC_US, pcap_bytes
from pcapvault.tools import npcapindex, printindex

T0 = 1_763_737_200_123_456_789


def frame(i: int) -> bytes:
    """Ethernet/IPv4/UDP from 10.0.0.<i> port 1000+i to 10.9.9.9 port 53."""
    ip = (struct.pack(">BBHHHBBH", 0x45, 0, 28, 0, 0, 64, 17, 0) + bytes([10, 0, 0, i % 256])
          + bytes([10, 9, 9, 9]))
    return bytes(12) + b"\x08\x00" + ip + struct.pack(">HHHH", 1000 + i, 53, 8, 0)


def run(main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def pcap(tmp_path: Path) -> Path:
    p = tmp_path / "t.pcap"
    p.write_bytes(pcap_bytes([(T0 + i * 1000, frame(i)) for i in range(20)]))
    return p


def index(pcap: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> Path:
    code, _, err = run(npcapindex.main, ["-i", str(pcap), *extra], capsys)
    assert code == 0, err
    return Path(str(pcap) + ".idx")


def test_index_and_print(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = index(pcap, capsys)
    code, out, err = run(printindex.main, ["-i", str(idx)], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert f"version: {VERSION}" in lines and "precision: nanosecond" in lines
    assert "packets: 20" in lines
    assert "first: 2025-11-21T15:00:00.123456789Z (1763737200.123456789)" in lines
    assert "last: 2025-11-21T15:00:00.123475789Z (1763737200.123475789)" in lines
    assert "flows: 20" in lines
    assert any("ip udp 10.0.0.3.1003 > 10.9.9.9.53" in line for line in lines)
    assert sum(1 for line in lines if " offset " in line) == 20
    (postings,) = [line for line in lines if line.startswith("postings: ")]
    assert postings.startswith("postings: 21 keys, ")
    assert postings.endswith(" bytes in 1 frames, 1 time blocks")
    assert "time bins: 1 of 1 s from 1763737200 (epoch seconds)" in lines
    assert "  key 3: ip 10.0.0.3: 1 packets (1 as source, 0 as destination)" in lines
    assert "  key 20: ip 10.9.9.9: 20 packets (0 as source, 20 as destination)" in lines


def test_print_older_version_without_postings(
    pcap: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    idx = index(pcap, capsys)
    idx.write_bytes(as_version(idx.read_bytes(), 2))
    code, out, _ = run(printindex.main, ["-i", str(idx)], capsys)
    assert code == 0 and "postings: none (index version 2)" in out.splitlines()
    _, out, _ = run(printindex.main, ["-i", str(idx), "-j"], capsys)
    assert json.loads(out.splitlines()[0])["postings"] is None
    assert "key" not in {json.loads(line)["type"] for line in out.splitlines()}
    code, out = check(idx, capsys)
    assert code == 0 and "OK (20 packets, 20 flows)" in out


def test_print_limit_json_and_times(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = str(index(pcap, capsys))
    _, out, _ = run(printindex.main, ["-i", idx, "-n", "3"], capsys)
    assert sum(1 for line in out.splitlines() if " offset " in line) == 3
    assert "... 17 more entries" in out and "... 17 more flows" in out
    _, out, _ = run(printindex.main, ["-i", idx, "-j", "-n", "2"], capsys)
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in recs] == ["header", "flow", "flow", "key", "key", "packet",
                                         "packet"]
    assert recs[0]["packets"] == 20 and recs[0]["precision"] == "ns"
    assert recs[0]["postings"]["keys"] == 21 and recs[0]["postings"]["frames"] == 1
    assert recs[0]["postings"]["time_blocks"] == 1
    assert recs[3] == {"type": "key", "key": 0, "address": "10.0.0.0", "ethertype": 0x0800,
                       "entries": 1, "sources": 1, "destinations": 0}
    assert recs[1]["dport"] == 53 and recs[1]["src"].startswith("10.0.0.")
    assert recs[5] == {"type": "packet", "index": 0, "ts_ns": T0, "offset": 24, "caplen": 42,
                       "wirelen": 42, "flow": recs[5]["flow"]}
    _, out, _ = run(printindex.main, ["-i", idx, "-T"], capsys)
    assert out.splitlines() == ["first: 2025-11-21T15:00:00.123456789Z (1763737200.123456789)",
                                "last: 2025-11-21T15:00:00.123475789Z (1763737200.123475789)"]
    _, out, _ = run(printindex.main, ["-i", idx, "-T", "-j"], capsys)
    assert json.loads(out)["last_epoch"] == "1763737200.123475789"


def test_output_option_and_usec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "u.pcap"
    p.write_bytes(pcap_bytes([(T0, frame(1))], nanosecond=False))
    out = tmp_path / "other.idx"
    code, stdout, _ = run(npcapindex.main, ["-i", str(p), "-o", str(out), "-v"], capsys)
    assert code == 0 and "1 packets" in stdout
    idx = read_index(out)
    assert not idx.nanosecond and idx.first_ns == T0 // 1000 * 1000
    _, text, _ = run(printindex.main, ["-i", str(out), "-T"], capsys)
    assert "2025-11-21T15:00:00.123456Z (1763737200.123456)" in text


def test_big_endian_foreign_pcap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "be.pcap"
    body = b"".join(struct.pack(">IIII", 1_600_000_000, i, 42, 60) + frame(i) for i in range(5))
    p.write_bytes(struct.pack(">IHHiIII", MAGIC_US, 2, 4, 0, 0, 65535, 1) + body)
    idx = read_index(index(p, capsys))
    assert idx.count == 5 and idx.wirelen.tolist() == [60] * 5
    assert sorted(idx.flows["sport"].tolist()) == [1000, 1001, 1002, 1003, 1004]
    code, _, err = run(printindex.main, ["-c", "-i", str(p) + ".idx"], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty"),
        (b"hello world, this is not a capture file", "not a pcap"),
        (b"\n\r\r\n" + bytes(40), "pcapng"),
        (None, "No such file"),
    ],
)
def test_index_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         content: bytes | None, words: str) -> None:
    p = tmp_path / "in.pcap"
    if content is not None:
        p.write_bytes(content)
    code, out, err = run(npcapindex.main, ["-i", str(p)], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("npcapindex: error: ") and words in err
    assert not (tmp_path / "in.pcap.idx").exists()


def test_index_unwritable_output(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(npcapindex.main, ["-i", str(pcap), "-o", "/nonexistent/x.idx"], capsys)
    assert code == 1 and err.count("\n") == 1 and "cannot write" in err


def test_torn_pcap_warns_and_indexes(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = pcap.read_bytes()
    pcap.write_bytes(data[:-10])
    code, _, err = run(npcapindex.main, ["-i", str(pcap)], capsys)
    assert code == 0 and err.count("\n") == 1 and "warning" in err and "torn" in err
    assert read_index(str(pcap) + ".idx").count == 19
    code, out, _ = run(printindex.main, ["-c", "-i", str(pcap) + ".idx"], capsys)
    assert code == 0 and "OK (19 packets" in out


def test_print_bad_index(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(printindex.main, ["-i", str(pcap)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "not a pcapvault index" in err
    code, _, err = run(printindex.main, ["-i", str(pcap), "--pcap", "x"], capsys)
    assert code == 2 and "--pcap only goes with -c" in err


def check(idx: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code, out, err = run(printindex.main, ["-c", "-i", str(idx), *extra], capsys)
    if code:
        assert out == "" and err.count("\n") == 1 and err.startswith("npcapprintindex: ")
        return code, err
    return code, out


def test_check_valid(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = check(index(pcap, capsys), capsys)
    assert code == 0 and "OK (20 packets, 20 flows)" in out
    other = pcap.with_name("index-without-suffix")
    index(pcap, capsys, "-o", str(other))
    code, _, err = run(printindex.main, ["-c", "-i", str(other)], capsys)
    assert code == 2 and "use --pcap" in err
    code, out = check(other, capsys, "--pcap", str(pcap))
    assert code == 0


def test_check_damaged_index(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = index(pcap, capsys)
    data = bytearray(idx.read_bytes())
    data[70] ^= 1
    idx.write_bytes(bytes(data))
    code, err = check(idx, capsys)
    assert code == 1 and "checksum" in err


def test_check_newer_version(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = index(pcap, capsys)
    data = bytearray(idx.read_bytes())
    data[8] = VERSION + 1
    idx.write_bytes(bytes(data))
    code, err = check(idx, capsys)
    assert code == 1 and f"version {VERSION + 1}" in err


def test_check_inconsistent_pcap(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = index(pcap, capsys)
    original = pcap.read_bytes()
    # a packet's port changed after indexing: lengths still agree, the flow does not
    changed = bytearray(original)
    changed[24 + 3 * (16 + 42) + 16 + 34] ^= 0xFF
    pcap.write_bytes(bytes(changed))
    code, err = check(idx, capsys)
    assert code == 1 and "entry 3" in err and "does not match the packet" in err
    # a record's wire length differs
    changed = bytearray(original)
    struct.pack_into("<I", changed, 24 + 5 * (16 + 42) + 12, 1500)
    pcap.write_bytes(bytes(changed))
    code, err = check(idx, capsys)
    assert code == 1 and "entry 5: wire length 42" in err
    # records missing
    pcap.write_bytes(original[: -(16 + 42)])
    code, err = check(idx, capsys)
    assert code == 1 and "19 complete records" in err
    # a different pcap given explicitly, and a missing one
    other = pcap.with_name("other.pcap")
    other.write_bytes(pcap_bytes([(T0, frame(1))]))
    code, err = check(idx, capsys, "--pcap", str(other))
    assert code == 1 and "1 complete records" in err
    code, err = check(idx, capsys, "--pcap", str(pcap) + ".missing")
    assert code == 1 and "unusable" in err


def test_check_postings_that_do_not_match_the_pcap(
    pcap: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Postings rewritten with valid checksums but other content: -c compares them with the
    postings the pcap gives."""
    path = index(pcap, capsys)
    good = path.read_bytes()
    idx = read_index(path)

    def respliced(change) -> None:
        section = build_postings(idx)
        change(section)
        directory, frames = encode_postings(section)
        path.write_bytes(with_postings(good, directory, len(section.keys), frames))

    def role(section) -> None:  # 10.9.9.9 said to be the source of one of its packets
        section.keys["sources"][-1] = 1

    def address(section) -> None:  # 10.9.9.9 said to be 10.9.9.10
        section.keys["address"][-1][-1] = 10

    def dropped(section) -> None:  # the last packet to 10.9.9.9 left out
        section.keys["count"][-1] -= 1

    def offset(section) -> None:  # 10.0.0.5's packet said to be 1 byte further
        frame = bytearray(section.frames[0])
        frame[int(section.keys["first"][5])] += 1  # the low byte of its (only) offset
        section.frames[0] = bytes(frame)

    def block(section) -> None:  # the time block said to start 1 ns later
        section.blocks["min_ns"][0] += 1

    def second(section) -> None:  # the first time bin said to hold one byte more
        words = np.frombuffer(section.bins, "<u8").copy()
        words[3] += 1  # after the head entry (2 words): the first bin's packets, bytes
        section.bins = words.tobytes()

    respliced(role)
    code, err = check(path, capsys)
    assert code == 1 and ("postings key 20 (10.9.9.9, ethertype 0x0800: 20 entries, 1 as "
                          "source) but the pcap gives (10.9.9.9, ethertype 0x0800: 20 entries, "
                          "0 as source)") in err, err
    respliced(address)
    code, err = check(path, capsys)
    assert code == 1 and "postings key 20 (10.9.9.10, ethertype 0x0800: 20 entries" in err
    assert "but the pcap gives (10.9.9.9, ethertype 0x0800: 20 entries" in err
    respliced(dropped)
    code, err = check(path, capsys)
    assert code == 1 and "postings key 20 (10.9.9.9, ethertype 0x0800: 19 entries" in err
    respliced(offset)
    code, err = check(path, capsys)
    assert code == 1 and "postings of key 5 (10.0.0.5, ethertype 0x0800) differ" in err, err
    respliced(block)
    code, err = check(path, capsys)
    assert code == 1 and "postings time block 0 (offset, min, max ns" in err, err
    respliced(second)
    code, err = check(path, capsys)
    assert code == 1 and "time bins (packets and bytes per second) differ" in err, err
    path.write_bytes(good)
    code, out = check(path, capsys)
    assert code == 0 and "OK" in out


def test_check_damaged_postings_frame(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A frame byte is outside the header's checksum: -c still decompresses every frame."""
    path = index(pcap, capsys)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # in the frame's content checksum
    path.write_bytes(bytes(data))
    assert read_index(path).count == 20
    code, err = check(path, capsys)
    assert code == 1 and "damaged index (postings frame 0" in err, err


def test_check_unsorted_entries(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pcapvault.index.indexfile import write_index

    idx_path = index(pcap, capsys)
    idx = read_index(idx_path)
    for name in ("offset", "caplen", "wirelen", "ts_ns", "flow"):
        col = getattr(idx, name).copy()
        col[[4, 5]] = col[[5, 4]]
        setattr(idx, name, col)
    write_index(idx_path, idx)
    code, err = check(idx_path, capsys)
    assert code == 1 and "not sorted by offset" in err


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"tcpdump test corpus not found at {CORPUS}")
@pytest.mark.skipif(shutil.which("npcapindex") is None, reason="console scripts not installed")
def test_console_scripts_on_corpus_file(tmp_path: Path) -> None:
    src = tmp_path / "qinq.pcap"
    shutil.copy(CORPUS / "802.1ad_QinQ.pcap", src)
    r = subprocess.run(["npcapindex", "-i", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["npcapprintindex", "-i", str(src) + ".idx"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    # the ARP request's sender and target, as tcpdump prints them (who-has .100 tell .97)
    assert "vlan 200 vlan 2001 arp 172.21.79.97 > 172.21.79.100" in r.stdout
    assert f"version: {VERSION}" in r.stdout
    r = subprocess.run(["npcapprintindex", "-c", "-i", str(src) + ".idx"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "OK" in r.stdout


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"tcpdump test corpus not found at {CORPUS}")
def test_check_accepts_a_version_1_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version 1 index (no ARP addresses) of a capture with ARP frames checks OK: it is
    compared with what a version 1 writer records, not with today's rows."""
    src = tmp_path / "qinq.pcap"
    shutil.copy(CORPUS / "802.1ad_QinQ.pcap", src)  # two ARP frames
    with monkeypatch.context() as m:
        m.setattr(builder, "_parse_arp", lambda *args: None)  # what version 1 wrote
        idx = build_index(src)
    assert not (idx.flows["flags"] & FLAG_ADDRS).any()
    path = Path(str(src) + ".idx")
    write_index(path, idx)
    path.write_bytes(as_version(path.read_bytes(), 1))
    code, out = check(path, capsys)
    assert code == 0 and "OK" in out, out
    # today's index of the same file records the addresses, and checks OK too
    write_index(path, build_index(src))
    assert read_index(path).version == VERSION
    code, out = check(path, capsys)
    assert code == 0 and "OK" in out, out


def test_print_flow_totals(pcap: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Version 4 flow rows show their wire bytes and first and last time; older ones the
    packets only (JSON: null)."""
    idx = index(pcap, capsys)
    _, out, _ = run(printindex.main, ["-i", str(idx), "-j"], capsys)
    flows = [r for r in map(json.loads, out.splitlines()) if r["type"] == "flow"]
    packets = [r for r in map(json.loads, out.splitlines()) if r["type"] == "packet"]
    assert len(flows) == 20 and sum(r["bytes"] for r in flows) == sum(
        p["wirelen"] for p in packets)
    for f in flows:
        mine = [p for p in packets if p["flow"] == f["flow"]]
        assert (f["packets"], f["bytes"], f["first_ns"], f["last_ns"]) == (
            len(mine), sum(p["wirelen"] for p in mine), min(p["ts_ns"] for p in mine),
            max(p["ts_ns"] for p in mine))
    _, out, _ = run(printindex.main, ["-i", str(idx)], capsys)
    first = flows[0]["first_ns"] - T0
    assert (f"  flow 0: 1 packets, {flows[0]['bytes']} bytes, "
            f"2025-11-21T15:00:00.{123456789 + first:09d}Z to "
            f"2025-11-21T15:00:00.{123456789 + first:09d}Z: ") in out
    idx.write_bytes(as_version(idx.read_bytes(), 3))
    _, out, _ = run(printindex.main, ["-i", str(idx), "-j"], capsys)
    flow = next(r for r in map(json.loads, out.splitlines()) if r["type"] == "flow")
    assert (flow["bytes"], flow["first_ns"], flow["last_ns"]) == (None, None, None)
    _, out, _ = run(printindex.main, ["-i", str(idx)], capsys)
    assert "  flow 0: 1 packets: " in out
