"""Classic pcap primitives: headers, the record walk (serial and parallel), PcapReader."""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt
import numpy as np
import pytest
from frames import CORPUS

from pcapvault.index.errors import FormatError
from pcapvault.index.pcapfile import (
    MAGIC_NS,
    MAGIC_US,
    MAX_CAPLEN,
    PcapHeader,
    PcapReader,
    gather_bytes,
    global_header,
    headers_disagree,
    locate_records,
    parse_global_header,
    pcap_bytes,
    record_header,
    scan_records,
    walk_offsets,
)

T0 = 1_763_737_200_123_456_789


def reference_scan(data: bytes, order: str = "<", nanosecond: bool = True) -> tuple:
    """The obvious record-by-record walk, to check the fast one against."""
    offsets, ts, caplens, wirelens = [], [], [], []
    o = 24
    while o + 16 <= len(data):
        sec, frac, caplen, wirelen = struct.unpack_from(order + "IIII", data, o)
        if caplen > MAX_CAPLEN or o + 16 + caplen > len(data):
            break
        offsets.append(o)
        ts.append(sec * 1_000_000_000 + (frac if nanosecond else frac * 1000))
        caplens.append(caplen)
        wirelens.append(wirelen)
        o += 16 + caplen
    return offsets, ts, caplens, wirelens, o


def assert_matches_reference(data: bytes, order: str = "<", nanosecond: bool = True) -> None:
    header = PcapHeader(nanosecond=nanosecond, linktype=1, snaplen=65535,
                        big_endian=order == ">")
    table = scan_records(data, header)
    offsets, ts, caplens, wirelens, end = reference_scan(data, order, nanosecond)
    assert table.offset.tolist() == offsets
    assert table.ts_ns.tolist() == ts
    assert table.caplen.tolist() == caplens
    assert table.wirelen.tolist() == wirelens
    assert table.complete_end == end
    assert table.torn == (end < len(data))
    assert table.offset.dtype == np.uint64 and table.ts_ns.dtype == np.int64
    assert table.caplen.dtype == np.uint32 and table.wirelen.dtype == np.uint32
    loc = locate_records(data, header)
    assert loc.offset.tolist() == offsets and loc.caplen.tolist() == caplens
    assert (loc.complete_end, loc.torn) == (table.complete_end, table.torn)


def random_pcap(n: int, seed: int, sizes: tuple[int, ...] = (60, 64, 100, 576, 1514),
                payload: str = "random") -> bytes:
    """n records of random sizes, timestamps a few microseconds apart."""
    rng = np.random.default_rng(seed)
    caplen = rng.choice(sizes, n)
    ts = T0 + np.cumsum(rng.integers(0, 5000, n))
    frames = []
    for i in range(n):
        if payload == "random":
            frames.append(rng.integers(0, 256, int(caplen[i]), dtype=np.uint8).tobytes())
        else:
            frames.append(bytes(int(caplen[i])))
    return pcap_bytes(zip(ts.tolist(), frames, strict=True))


# --------------------------------------------------------------------------------------------
# Global header


def test_global_header_layout() -> None:
    h = global_header(1, 1536, True)
    assert len(h) == 24
    assert struct.unpack("<IHHiIII", h) == (MAGIC_NS, 2, 4, 0, 0, 1536, 1)
    assert struct.unpack("<I", global_header(105, 65535, False)[:4])[0] == MAGIC_US


@pytest.mark.parametrize("nanosecond", [True, False])
@pytest.mark.parametrize("order", ["<", ">"])
def test_parse_header_both_orders_and_precisions(nanosecond: bool, order: str) -> None:
    magic = MAGIC_NS if nanosecond else MAGIC_US
    data = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, 113)
    h = parse_global_header(data, "x.pcap")
    assert h == PcapHeader(nanosecond, 113, 262144, order == ">", (2, 4))
    assert h.byteorder == order


def test_parse_header_masks_fcs_bits_of_linktype() -> None:
    data = struct.pack("<IHHiIII", MAGIC_US, 2, 4, 0, 0, 100, 1 | (1 << 28) | (4 << 26))
    assert parse_global_header(data, "x").linktype == 1


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"\xd4\xc3", "not a pcap"),
        (b"\n\r\r\n" + bytes(28), "pcapng"),
        (b"\x34\xcd\xb2\xa1" + bytes(20), "modified"),
        (b"GET / HTTP/1.1\r\n" + bytes(8), "not a pcap"),
        (struct.pack("<I", MAGIC_NS) + bytes(6), "truncated"),
        (struct.pack("<IHHiIII", MAGIC_NS, 3, 0, 0, 0, 100, 1), "version 3.0"),
    ],
)
def test_parse_header_errors_are_one_line(data: bytes, words: str) -> None:
    with pytest.raises(FormatError) as e:
        parse_global_header(data, "some/file.pcap")
    msg = str(e.value)
    assert msg.startswith("some/file.pcap: ")
    assert words in msg
    assert "\n" not in msg


# --------------------------------------------------------------------------------------------
# Record walk


def test_scan_small_file_fields() -> None:
    data = pcap_bytes([(T0, b"a" * 60), (T0 + 1000, b"b" * 10, 1514), (T0 + 5, b"")])
    table = scan_records(data, parse_global_header(data, "x"))
    assert table.offset.tolist() == [24, 100, 126]
    assert table.ts_ns.tolist() == [T0, T0 + 1000, T0 + 5]
    assert table.caplen.tolist() == [60, 10, 0]
    assert table.wirelen.tolist() == [60, 1514, 0]
    assert table.complete_end == len(data) and not table.torn
    assert len(table) == 3


def test_scan_usec_file_converts_to_ns() -> None:
    data = pcap_bytes([(T0, b"x" * 20)], nanosecond=False)
    table = scan_records(data, parse_global_header(data, "x"))
    assert table.ts_ns.tolist() == [T0 // 1000 * 1000]


def test_scan_empty_file_and_header_only() -> None:
    data = global_header(1, 1536, True)
    table = scan_records(data, parse_global_header(data, "x"))
    assert len(table) == 0 and table.complete_end == 24 and not table.torn
    assert table.ts_ns.dtype == np.int64


def test_torn_tail_at_every_length() -> None:
    data = pcap_bytes([(T0 + i, bytes([i]) * (40 + i)) for i in range(4)])
    bounds = [24, 24 + 56, 24 + 56 + 57, 24 + 56 + 57 + 58, len(data)]
    for cut in range(24, len(data) + 1):
        table = scan_records(data[:cut], parse_global_header(data, "x"))
        complete = max(i for i, b in enumerate(bounds) if b <= cut)
        assert len(table) == complete, cut
        assert table.complete_end == bounds[complete]
        assert table.torn == (cut != bounds[complete])


def test_absurd_caplen_ends_the_walk() -> None:
    good = pcap_bytes([(T0, b"x" * 30), (T0, b"y" * 30)])
    bad = good + record_header(T0, MAX_CAPLEN + 1, 100, True) + b"z" * 100
    table = scan_records(bad + good[24:], parse_global_header(bad, "x"))
    assert len(table) == 2 and table.torn and table.complete_end == len(good)


@pytest.mark.parametrize("order", ["<", ">"])
def test_big_endian_matches_reference(order: str) -> None:
    rng = np.random.default_rng(5)
    parts = [struct.pack(order + "IHHiIII", MAGIC_US, 2, 4, 0, 0, 65535, 1)]
    for i in range(200):
        n = int(rng.integers(0, 300))
        parts.append(struct.pack(order + "IIII", 1_600_000_000 + i, i * 7, n, n + 4))
        parts.append(bytes(n))
    data = b"".join(parts)
    assert parse_global_header(data, "x").big_endian == (order == ">")
    assert_matches_reference(data, order, nanosecond=False)


@pytest.mark.parametrize("seed", [1, 2])
def test_parallel_walk_equals_serial_walk(seed: int) -> None:
    data = random_pcap(20000, seed)
    assert_matches_reference(data)
    assert_matches_reference(data[: len(data) - 7])  # torn within the last record


def test_parallel_walk_uniform_small_records() -> None:
    data = random_pcap(30000, 3, sizes=(64,), payload="zeros")
    assert_matches_reference(data)


def test_parallel_walk_survives_fake_headers_in_payload() -> None:
    """Payloads full of plausible record headers make segment starts land on false records;
    the result must still be the true chain."""
    rng = np.random.default_rng(9)
    frames = []
    for _ in range(12000):
        n = int(rng.integers(3, 40))
        # each payload is a run of fake records: right timestamps, consistent lengths
        fake = b"".join(
            record_header(T0, 0, 0, True) if rng.random() < 0.5 else
            record_header(T0, 16, 16, True) + bytes(16)
            for _ in range(n)
        )
        frames.append(fake[: int(rng.integers(len(fake) // 2, len(fake) + 1))])
    data = pcap_bytes((T0 + i, f) for i, f in enumerate(frames))
    assert_matches_reference(data)


def test_parallel_walk_stops_at_corruption_in_the_middle() -> None:
    data = bytearray(random_pcap(20000, 4))
    offsets = reference_scan(bytes(data))[0]
    victim = offsets[12345]
    struct.pack_into("<I", data, victim + 8, 0xFFFFFF00)
    assert_matches_reference(bytes(data))
    table = scan_records(bytes(data), parse_global_header(bytes(data), "x"))
    assert len(table) == 12345 and table.torn and table.complete_end == victim


def test_parallel_walk_sample_with_garbage_timestamps() -> None:
    """Zero timestamps in the first records must not make every zero byte look like a
    record start."""
    frames = [(0 if i < 100 else T0 + i, bytes(int(s)))
              for i, s in enumerate(np.random.default_rng(2).choice([60, 1514, 300], 20000))]
    assert_matches_reference(pcap_bytes(frames))


def test_gather_bytes_pads_past_the_end() -> None:
    arr = np.arange(10, dtype=np.uint8)
    rows = gather_bytes(arr, np.array([0, 6, 9, 10]), 4)
    assert rows.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [9, 0, 0, 0], [0, 0, 0, 0]]


def test_walk_offsets_stops_where_no_header_fits() -> None:
    data = pcap_bytes([(T0, b"x" * 10)] * 3)
    arr = np.frombuffer(data + b"\x01" * 15, np.uint8)
    assert walk_offsets(arr, 24, len(arr), False).tolist() == [24, 50, 76]


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"tcpdump test corpus not found at {CORPUS}")
def test_corpus_agrees_with_dpkt() -> None:
    files = sorted(CORPUS.glob("*.pcap"))
    assert len(files) > 100
    for path in files:
        data = path.read_bytes()
        table = scan_records(data, parse_global_header(data, str(path)))
        with open(path, "rb") as f:
            reader = dpkt.pcap.Reader(f)
            expected = [(ts, len(buf)) for ts, buf in reader]
        assert len(table) == len(expected), path
        assert table.caplen.tolist() == [n for _, n in expected], path
        got = table.ts_ns / 1e9
        assert np.allclose(got, [float(t) for t, _ in expected], rtol=0, atol=2e-6), path


# --------------------------------------------------------------------------------------------
# PcapReader


def test_reader(tmp_path: Path) -> None:
    data = pcap_bytes([(T0, b"abc" * 10), (T0 + 1, b"defg")], linktype=113, snaplen=99)
    p = tmp_path / "a.pcap"
    p.write_bytes(data)
    with PcapReader(p) as r:
        assert r.header.linktype == 113 and r.header.snaplen == 99 and r.header.nanosecond
        assert r.size == len(data)
        assert r.pread(24 + 16, 3) == b"abc"
        assert r.pread(len(data) - 2, 100) == b"fg"
        arr = r.array()
        assert arr.tobytes() == data
        table = r.scan()
        assert table.offset.tolist() == [24, 70]
    # views outliving the reader keep working (the mapping is freed with them)
    assert arr[24 + 16] == ord("a")


@pytest.mark.parametrize("content", [None, b"", b"\xd4\xc3\xb2\xa1" + bytes(10)])
def test_reader_errors(tmp_path: Path, content: bytes | None) -> None:
    p = tmp_path / "bad.pcap"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(FormatError) as e:
        PcapReader(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_reader_on_directory(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot"):
        PcapReader(tmp_path)


@pytest.mark.parametrize("order,nanosecond", [("<", True), ("<", False), (">", True)])
def test_headers_disagree_finds_each_field(order, nanosecond):
    """Every field of a record header is compared with the index's values, in both byte
    orders and precisions; only the records that differ are flagged."""
    magic = MAGIC_NS if nanosecond else MAGIC_US
    unit = 1 if nanosecond else 1000
    data = bytearray(struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 262144, 1))
    at, ts, cap, wire = [], [], [], []
    for i in range(40):
        t = T0 // unit * unit + i * 1_000_003 * unit
        frame = bytes([i]) * (60 + i)
        at.append(len(data))
        ts.append(t)
        cap.append(len(frame))
        wire.append(len(frame) + (i % 3))
        sec, frac = divmod(t, 10**9)
        data += struct.pack(order + "IIII", sec, frac // unit, len(frame), wire[-1]) + frame
    hdr = parse_global_header(bytes(data[:24]), "x")
    arr = np.frombuffer(bytes(data), np.uint8)
    cols = [np.array(c, np.int64) for c in (at, cap, wire, ts)]
    assert not headers_disagree(arr, *cols, hdr).any()
    for field, k in ((1, 3), (2, 17), (3, 25)):  # caplen, wirelen, timestamp
        changed = [c.copy() for c in cols]
        changed[field][k] += unit if field == 3 else 1
        assert np.flatnonzero(headers_disagree(arr, *changed, hdr)).tolist() == [k]
