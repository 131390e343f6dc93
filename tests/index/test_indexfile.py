"""The .pcap.idx file: round trip, atomic writing, and refusal of anything damaged."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import pyzstd
from indexes import T0, as_version, sample_index, with_crc

from pcapvault.index import indexfile
from pcapvault.index.atomicfile import temp_path
from pcapvault.index.builder import build_index, index_records
from pcapvault.index.errors import FormatError
from pcapvault.index.indexfile import (
    FLOW_DTYPE,
    HEADER_LEN,
    VERSION,
    PacketIndex,
    address_bytes,
    address_text,
    decode_index,
    empty_flows,
    encode_index,
    flow_totals,
    flows_of_packets,
    index_problem,
    matches_address,
    read_bins,
    read_index,
    records_problem,
    write_index,
)
from pcapvault.index.pcapfile import parse_global_header, pcap_bytes, scan_records
from pcapvault.index.postings import parse_header


def totals_of(idx: PacketIndex) -> list[np.ndarray]:
    """The per-flow wire bytes, first and last timestamp `idx` has, else those of its
    packet columns."""
    if idx.has_totals:
        return [idx.flow_bytes, idx.flow_first_ns, idx.flow_last_ns]
    return list(flow_totals(idx.flow, len(idx.flows), idx.ts_ns, idx.wirelen)[1:])


def assert_same(a: PacketIndex, b: PacketIndex, packets: bool = True) -> None:
    for name in ("nanosecond", "linktype", "count", "first_ns", "last_ns", "pcap_size"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.flows.tobytes() == b.flows.tobytes()
    assert np.array_equal(a.flow_packets, b.flow_packets)
    if b.version >= 4:  # the totals a writer computes from the packet columns if not given
        for mine, theirs in zip(totals_of(a), totals_of(b), strict=True):
            assert np.array_equal(mine.astype(np.int64), theirs.astype(np.int64))
    else:
        assert not b.has_totals
    for name in ("ts_ns", "offset", "caplen", "wirelen", "flow"):
        if packets:
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        else:
            assert getattr(b, name) is None


def test_round_trip(tmp_path: Path) -> None:
    idx = sample_index()
    p = tmp_path / "x.pcap.idx"
    write_index(p, idx)
    assert_same(idx, read_index(p))
    assert_same(idx, read_index(p, packets=False), packets=False)
    assert not read_index(p, packets=False).has_packets
    assert [f.name for f in tmp_path.iterdir()] == ["x.pcap.idx"]  # no .part left behind


@pytest.mark.parametrize("n", [0, 1, 2])
def test_round_trip_tiny(n: int) -> None:
    idx = sample_index(n) if n else PacketIndex(
        False, 105, 0, 0, 0, 24, empty_flows(0), np.zeros(0, np.uint32), np.zeros(0, np.int64),
        np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint32),
        np.zeros(0, np.uint32))
    assert_same(idx, decode_index(encode_index(idx), "x"))


def test_header_layout_matches_format_doc() -> None:
    idx = sample_index(10)
    data = encode_index(idx)
    magic, version, flags, linktype, count, first, last, size, nflows, slen, plen, crc = (
        struct.unpack_from("<8sHHIQqqQIIII", data))
    dlen, keys, flen, dcrc = struct.unpack_from("<IIII", data, 64)
    assert (magic, version, flags, linktype, count) == (b"PVIDX\x00\r\n", 5, 1, 1, 10)
    assert (first, last, size, nflows) == (idx.first_ns, idx.last_ns, idx.pcap_size, 5)
    assert HEADER_LEN == 80 and len(data) == 80 + dlen + slen + plen + flen
    # the checksum covers everything but itself up to the postings frames
    assert crc == zlib.crc32(data[64 : 80 + dlen + slen + plen], zlib.crc32(data[:60]))
    assert dcrc == zlib.crc32(data[80 : 80 + dlen]) and keys and flen
    # keys, frame table, one time block, then the time bins: a head entry (first bin's
    # start and width in seconds, bins) and per bin the packets and wire bytes
    n = idx.last_ns // 10**9 - idx.first_ns // 10**9 + 1
    start, width, bins = struct.unpack_from("<qII", data, 80 + dlen - 16 * (n + 1))
    assert (start, width, bins) == (idx.first_ns // 10**9, 1, n)
    table = np.frombuffer(data, "<u8", 2 * n, 80 + dlen - 16 * n).reshape(n, 2)
    second = idx.ts_ns // 10**9 - start
    assert table[:, 0].tolist() == np.bincount(second, minlength=n).tolist()
    assert table[:, 1].tolist() == np.bincount(second, idx.wirelen, minlength=n).tolist()
    assert (dlen - 40 * keys - 24 - 16 * (n + 1)) % 16 == 0
    summary = pyzstd.decompress(data[80 + dlen : 80 + dlen + slen])
    wire, first, last = flow_totals(idx.flow, 5, idx.ts_ns, idx.wirelen)[1:]
    # the totals byte-transposed, as the packet columns: wire bytes, first times after the
    # file's first, last times after the flow's first
    totals = [wire.astype("<u8"), first - idx.first_ns, last - first]
    planes = b"".join(c.view(np.uint8).reshape(-1, 8).T.tobytes() for c in totals)
    assert summary == b"".join([idx.flows.tobytes(), idx.flow_packets.astype("<u4").tobytes(),
                                planes])
    assert wire.sum() == idx.wirelen.sum() and (first <= last).all()
    assert FLOW_DTYPE.itemsize == 48
    assert [FLOW_DTYPE.fields[k][1] for k in ("ethertype", "vlan1", "vlan2", "ipver", "proto",
                                              "flags", "sport", "dport", "src", "dst")] == [
        0, 2, 4, 6, 7, 8, 10, 12, 16, 32]


def test_packet_section_coding_is_compact() -> None:
    """Contiguous records and unsnapped lengths must cost (almost) nothing."""
    n = 100_000
    caplen = np.full(n, 60, np.uint32)
    idx = PacketIndex(
        True, 1, n, T0, T0 + n - 1, 24 + n * 76, empty_flows(1), np.array([n], np.uint32),
        T0 + np.arange(n), 24 + 76 * np.arange(n, dtype=np.uint64), caplen, caplen,
        np.zeros(n, np.uint32))
    h = parse_header(encode_index(idx), "x")
    assert h.summary_len + h.packets_len < 2000
    # nothing posted: the time blocks and one or two time bins only
    assert (h.keys, h.directory_len) == (0, 24 * 98 + 16 * (h.bins + 1)) and h.bins <= 2


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "y.pcap.idx"
    write_index(p, sample_index(10))
    before = p.read_bytes()

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(indexfile.os, "replace", boom)
    with pytest.raises(OSError):
        write_index(p, sample_index(20))
    assert p.read_bytes() == before
    assert not temp_path(p).exists()
    assert temp_path(p).name == ".y.pcap.idx.part"


def test_write_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_index(tmp_path / "no" / "x.idx", sample_index(3))


def read_error(data: bytes, tmp_path: Path, packets: bool = True) -> str:
    p = tmp_path / "bad.idx"
    p.write_bytes(data)
    with pytest.raises(FormatError) as e:
        read_index(p, packets=packets)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg
    return msg


def test_every_flipped_byte_is_detected(tmp_path: Path) -> None:
    """Every byte up to the postings frames (the frames have checksums of their own, see
    test_postings)."""
    data = encode_index(sample_index(300))
    end = parse_header(data, "x").frames_offset
    assert end < len(data)
    for pos in list(range(10, 80)) + list(range(80, end, 7)) + [end - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x20
        msg = read_error(bytes(bad), tmp_path)
        assert any(w in msg for w in ("checksum", "truncated", "trailing", "packet times")), (
            pos, msg)
    assert "checksum" in read_error(data[:100] + bytes([data[100] ^ 1]) + data[101:], tmp_path)


@pytest.mark.parametrize("cut", [0, 3, 8, 9, 20, 63, 64, 65, 79, 80, 81, -1])
def test_truncated_index(tmp_path: Path, cut: int) -> None:
    data = encode_index(sample_index(50))
    msg = read_error(data[:cut] if cut >= 0 else data[:-1], tmp_path)
    assert "truncated" in msg or (cut in (0, 3) and "not a pcapvault index" in msg)


def test_trailing_garbage(tmp_path: Path) -> None:
    assert "trailing" in read_error(encode_index(sample_index(5)) + b"x", tmp_path)


def test_bad_magic(tmp_path: Path) -> None:
    assert "not a pcapvault index" in read_error(b"\xd4\xc3\xb2\xa1" + bytes(100), tmp_path)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_older_versions_are_still_read(tmp_path: Path, version: int) -> None:
    """Version 1 (no ARP addresses), 2 (no postings), 3 (no per-flow totals) and 4 (no time
    bins) indexes stay readable: their rows are valid version 5 rows, only less
    informative."""
    idx = sample_index(20)
    assert struct.unpack_from("<H", encode_index(idx), 8) == (VERSION,) == (5,)
    p = tmp_path / "old.idx"
    p.write_bytes(as_version(encode_index(idx), version))
    assert p.stat().st_size < len(encode_index(idx))
    back = read_index(p)
    assert back.version == version and back.has_totals == (version >= 4)
    assert parse_header(p.read_bytes(), "x").bins == 0 and read_bins(p) is None
    assert_same(idx, back)
    # written again, it is a version 5 index with the totals of its packet columns
    again = decode_index(encode_index(back), "again")
    assert again.version == 5 and again.has_totals
    assert_same(idx, again)
    assert_same(idx, read_index(p, packets=False, verify=False), packets=False)
    assert_same(idx, decode_index(p.read_bytes(), str(p)))
    bad = bytearray(p.read_bytes())
    bad[70] ^= 1
    assert "checksum" in read_error(bytes(bad), tmp_path)


@pytest.mark.parametrize("version", [6, 7, 0xFFFF])
def test_newer_version_is_refused(tmp_path: Path, version: int) -> None:
    data = bytearray(encode_index(sample_index(5)))
    struct.pack_into("<H", data, 8, version)
    # a newer format may change anything after the version field: even a header that no
    # longer parses must produce the version message
    msg = read_error(with_crc(bytes(data))[:40], tmp_path)
    assert f"version {version}" in msg and "versions 1, 2, 3, 4 and 5" in msg and "newer" in msg
    msg = read_error(with_crc(bytes(data)), tmp_path, packets=False)
    assert f"version {version}" in msg


def test_version_0_is_unknown(tmp_path: Path) -> None:
    data = bytearray(encode_index(sample_index(5)))
    struct.pack_into("<H", data, 8, 0)
    assert "version 0 is unknown to" in read_error(bytes(data), tmp_path)


def test_section_that_does_not_decompress(tmp_path: Path) -> None:
    data = bytearray(encode_index(sample_index(50)))
    end = parse_header(bytes(data), "x").frames_offset
    data[end - 8 : end] = b"garbage!"  # the packet section's last bytes
    msg = read_error(with_crc(bytes(data)), tmp_path)
    assert "packet section" in msg and "damaged" in msg
    # the summary alone is still readable: the packet section is not decompressed
    p = tmp_path / "bad.idx"
    assert read_index(p, packets=False).count == 50


def _rebuild(idx: PacketIndex, summary: bytes | None = None, packets: bytes | None = None,
             **header: int) -> bytes:
    """An index file with chosen raw sections and header fields and a valid checksum."""
    data = encode_index(idx)
    h = parse_header(data, "x")
    s = pyzstd.compress(summary) if summary is not None else data[
        h.summary_offset : h.packets_offset]
    k = pyzstd.compress(packets) if packets is not None else data[
        h.packets_offset : h.frames_offset]
    fields = dict(count=idx.count, nflows=len(idx.flows))
    fields.update(header)
    head = bytearray(data[: h.summary_offset])
    struct.pack_into("<Q", head, 16, fields["count"])
    struct.pack_into("<III", head, 48, fields["nflows"], len(s), len(k))
    return with_crc(bytes(head) + s + k + data[h.frames_offset :])


def test_section_of_the_wrong_size(tmp_path: Path) -> None:
    idx = sample_index(20)
    assert "summary section" in read_error(_rebuild(idx, summary=b"\0" * 7), tmp_path)
    assert "packet section" in read_error(_rebuild(idx, packets=b"\0" * 9), tmp_path)
    # a packet count damaged in the header: the time bins (directory) disagree first
    assert "time bins contradict the header" in read_error(_rebuild(idx, count=21), tmp_path)


def test_flow_number_out_of_range(tmp_path: Path) -> None:
    idx = sample_index(20)
    bad = PacketIndex(**{**idx.__dict__, "flow": idx.flow.copy()})
    bad.flow[7] = 99
    with pytest.raises(ValueError, match="flow numbers"):
        encode_index(bad)
    packets = indexfile._byte_planes(indexfile._packet_columns(bad)).tobytes()
    assert "flow number" in read_error(_rebuild(idx, packets=packets), tmp_path)


def test_summary_without_verification_reads_only_the_summary(tmp_path: Path) -> None:
    idx = sample_index(200)
    data = bytearray(encode_index(idx))
    end = parse_header(bytes(data), "x").frames_offset
    data[end - 20 : end] = bytes(20)  # packet section (and so the checksum) ruined
    p = tmp_path / "s.idx"
    p.write_bytes(bytes(data))
    quick = read_index(p, packets=False, verify=False)
    assert_same(idx, quick, packets=False)
    assert "checksum" in read_error(bytes(data), tmp_path, packets=False)
    # truncation is still noticed, from the file size
    p.write_bytes(bytes(data[:-1]))
    with pytest.raises(FormatError, match="truncated"):
        read_index(p, packets=False, verify=False)
    p.write_bytes(bytes(data[:50]))
    with pytest.raises(FormatError, match="truncated"):
        read_index(p, packets=False, verify=False)


def test_section_claiming_more_data_is_refused(tmp_path: Path) -> None:
    """A section decompressing to more than it should is stopped at the expected size."""
    idx = sample_index(20)
    big = _rebuild(idx, summary=bytes(10_000_000))
    msg = read_error(big, tmp_path)
    assert "summary section" in msg and "+ bytes" in msg


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="cannot read index"):
        read_index(tmp_path / "missing.idx")
    with pytest.raises(FormatError, match="cannot read index"):
        read_index(tmp_path)


def test_flow_helpers() -> None:
    idx = sample_index(40)
    rows = flows_of_packets(idx)
    assert rows.dtype == FLOW_DTYPE and len(rows) == 40
    assert rows.tobytes() == idx.flows[idx.flow].tobytes()
    assert flows_of_packets(idx, slice(3, 5)).tobytes() == rows[3:5].tobytes()
    assert address_bytes("1.2.3.4") == bytes(10) + b"\xff\xff\x01\x02\x03\x04"
    assert address_text(address_bytes("1.2.3.4"), 4) == "1.2.3.4"
    assert address_text(address_bytes("2001:db8::7"), 6) == "2001:db8::7"
    assert matches_address(idx.flows, "src", "10.0.0.1").tolist() == [1, 0, 0, 0, 0]
    assert matches_address(idx.flows, "dst", "2001:db8::7").tolist() == [0, 0, 1, 0, 0]
    summary = PacketIndex(**{**idx.__dict__, "flow": None})
    with pytest.raises(ValueError):
        flows_of_packets(summary)


def test_index_problem_finds_inconsistencies() -> None:
    assert index_problem(sample_index()) is None
    idx = sample_index(30)
    idx.offset = idx.offset.copy()
    idx.offset[[10, 11]] = idx.offset[[11, 10]]
    assert "entry 11" in index_problem(idx) and "sorted" in index_problem(idx)
    idx = sample_index(30)
    idx.first_ns -= 1
    assert "timestamp" in index_problem(idx)
    idx = sample_index(30)
    idx.flow_packets = idx.flow_packets[::-1].copy()
    assert "flow" in index_problem(idx)
    idx = sample_index(30)
    idx.pcap_size -= 1
    assert "past the pcap size" in index_problem(idx)
    # the version 4 totals are checked against the entries too
    good = decode_index(encode_index(sample_index(30)), "x")
    assert index_problem(good) is None
    for name, what in (("flow_bytes", "wire bytes"), ("flow_first_ns", "first timestamp"),
                       ("flow_last_ns", "last timestamp")):
        idx = PacketIndex(**{**good.__dict__, name: getattr(good, name).copy()})
        getattr(idx, name)[2] += 1
        assert index_problem(idx) == (
            f"flow 2: summary says {what} {getattr(idx, name)[2]}, entries say "
            f"{getattr(good, name)[2]}")


def test_records_problem() -> None:
    frames = [bytes([i]) * (20 + i) for i in range(30)]
    data = pcap_bytes((T0 + i * 1000, f) for i, f in enumerate(frames))
    header = parse_global_header(data, "x")
    records = scan_records(data, header)
    idx = index_records(data, header, records)
    assert records_problem(idx, records) is None
    other = scan_records(data[:-3], header)
    assert "29 complete records" in records_problem(idx, other)
    idx.caplen = idx.caplen.copy()
    idx.caplen[4] += 1
    assert records_problem(idx, records).startswith("entry 4: captured length")


def test_flow_totals_from_the_summary_alone(tmp_path: Path) -> None:
    """Version 4: per flow its wire bytes and earliest and latest timestamp, read without
    the packet section (here ruined, so that reading it would fail)."""
    idx = sample_index(500)
    data = bytearray(encode_index(idx))
    end = parse_header(bytes(data), "x").frames_offset
    data[end - 20 : end] = bytes(20)
    p = tmp_path / "t.idx"
    p.write_bytes(with_crc(bytes(data)))
    quick = read_index(p, packets=False)
    assert quick.has_totals and not quick.has_packets
    for f in range(len(idx.flows)):
        mine = idx.flow == f
        assert quick.flow_bytes[f] == idx.wirelen[mine].sum()
        assert quick.flow_first_ns[f] == idx.ts_ns[mine].min()
        assert quick.flow_last_ns[f] == idx.ts_ns[mine].max()
    assert "packet section" in read_error(with_crc(bytes(data)), tmp_path)


def test_build_write_read_real_file(tmp_path: Path) -> None:
    p = tmp_path / "a.pcap"
    p.write_bytes(pcap_bytes([(T0 + i, b"\x00" * 12 + b"\x08\x00" + bytes(40)) for i in
                              range(100)], nanosecond=False))
    idx = build_index(p)
    write_index(str(p) + ".idx", idx)
    back = read_index(str(p) + ".idx")
    assert_same(idx, back)
    assert not back.nanosecond and back.count == 100
    assert idx.has_totals and back.flow_bytes.tolist() == [54 * 100]


@pytest.mark.parametrize("dtype", ["<i8", "<u8", "<u4", "<u2"])
@pytest.mark.parametrize("shape", ["small", "first-whole", "negative", "zeros", "extremes",
                                   "one", "empty", "two-planes", "three-planes"])
def test_columns_come_back_from_their_planes_exactly(dtype, shape):
    """_from_planes transposes only the planes a column uses (but its first value): every
    kind of column comes back exactly as the writer's planes hold it."""
    rng = np.random.default_rng(abs(hash((dtype, shape))) % 2**32)
    info = np.iinfo(dtype)
    n = {"one": 1, "empty": 0}.get(shape, 5000)
    col = rng.integers(0, 200, n).astype(dtype)
    if shape == "first-whole" and n:
        col[0] = info.max - 3
    elif shape == "negative" and info.min < 0:
        col[n // 2] = -5
    elif shape == "zeros":
        col[:] = 0
    elif shape == "extremes":
        col[::7], col[1::7] = info.max, info.min
    elif shape == "two-planes":
        col[1:] = rng.integers(0, 1 << 16, n - 1).astype(dtype) if info.max >= 1 << 16 else col[1:]
    elif shape == "three-planes":
        col[1:] = rng.integers(0, 1 << 24, n - 1).astype(dtype) if info.max >= 1 << 24 else col[1:]
    other = rng.integers(0, 1 << 30, n).astype("<u4")
    raw = np.frombuffer(indexfile._byte_planes([col, other]), np.uint8)
    back, back_other = indexfile._from_planes(raw, n, (dtype, "<u4"))
    assert back.dtype == np.dtype(dtype) and np.array_equal(back, col)
    assert np.array_equal(back_other, other)
