"""Address postings (index version 3): the numpy-free reader against postings computed one
packet at a time from the decoded index, tcpdump as the oracle for `host`, `src host` and
`dst host`, the block time table against the packet columns, and refusal of anything damaged
with a one-line error naming the file."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from frames import (
    corpus_files,
    eth,
    ipv4,
    ipv6,
    needs_corpus,
    needs_tcpdump,
    ports,
    tcpdump_select,
)
from indexes import (
    as_version,
    sample_index,
    with_postings,
)

from pcapvault.index.builder import build_index
from pcapvault.index.errors import FormatError
from pcapvault.index.indexfile import (
    FLAG_ADDRS,
    VLAN_ABSENT,
    PacketIndex,
    _stable_order,
    address_bytes,
    address_text,
    build_postings,
    decode_index,
    decode_postings,
    encode_index,
    encode_postings,
    postings_directory,
    read_index,
    read_postings,
    write_index,
)
from pcapvault.index.pcapfile import pcap_bytes
from pcapvault.index.postings import (
    BLOCK,
    FRAME_ENTRIES,
    READ_AHEAD,
    VERSION,
    NoPostings,
    Postings,
    parse_header,
)
from pcapvault.index.zstdlib import zstd

T0 = 1_763_737_200_000_000_000
POSTED = (0x0800, 0x0806, 0x8035, 0x86DD)
IPV4_TYPES = (0x0800, 0x0806, 0x8035)

Key = tuple[bytes, int, bool]  # address (zeros for "unknown"), ethertype, unknown
Entry = tuple[int, int]  # record offset, record length
Parts = tuple[list[Entry], list[Entry]]  # source part, destination part


def reference_postings(idx: PacketIndex) -> dict[Key, Parts]:
    """FORMAT.md's postings, one packet at a time, from a decoded index."""
    lists: dict[Key, Parts] = defaultdict(lambda: ([], []))
    for i in range(idx.count):
        row = idx.flows[idx.flow[i]]
        et = int(row["ethertype"])
        if int(row["vlan1"]) != VLAN_ABSENT or et not in POSTED:
            continue
        entry = (int(idx.offset[i]), 16 + int(idx.caplen[i]))
        if not row["flags"] & FLAG_ADDRS:
            lists[(bytes(16), et, True)][0].append(entry)
            continue
        lists[(bytes(row["src"]), et, False)][0].append(entry)
        lists[(bytes(row["dst"]), et, False)][1].append(entry)
    return dict(lists)


def reference_blocks(idx: PacketIndex) -> list[tuple[int, int, int]]:
    return [(int(idx.offset[i]), int(idx.ts_ns[i : i + BLOCK].min()),
             int(idx.ts_ns[i : i + BLOCK].max())) for i in range(0, idx.count, BLOCK)]


def stored_lists(p: Postings) -> dict[Key, Parts]:
    out = {}
    for k in range(p.keys):
        got = p.entries(k)
        assert len(got.offset) == len(got.length) == p.size(k) > 0
        assert got.sources == p.sources(k)
        entries = list(zip(got.offset, got.length, strict=True))
        out[p.key(k)] = (entries[: got.sources], entries[got.sources :])
    return out


def sort_bytes(key: Key) -> bytes:
    address, et, unknown = key
    return address + struct.pack(">HH", et, int(unknown))


def write(tmp_path: Path, data: bytes, name: str = "x.pcap.idx") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def index_of(tmp_path: Path, frames: list[bytes], linktype: int = 1) -> tuple[Path, Path]:
    """A real pcap of `frames` (1 ms apart) and its index, both written in tmp_path."""
    pcap = tmp_path / "t.pcap"
    pcap.write_bytes(pcap_bytes([(T0 + i * 1_000_000, f) for i, f in enumerate(frames)],
                                linktype=linktype))
    path = tmp_path / "t.pcap.idx"
    write_index(path, build_index(pcap))
    return pcap, path


def respliced(idx: PacketIndex, change) -> bytes:
    """The file of `idx` with its postings altered by `change` (a function of the built
    PostingsSection) and re-encoded, every checksum valid."""
    section = build_postings(idx)
    change(section)
    directory, frames = encode_postings(section)
    return with_postings(encode_index(idx), directory, len(section.keys), frames)


def read_error(path: Path, key: int | None = None) -> str:
    """The one-line FormatError of reading `path`'s postings (and list `key`)."""
    with pytest.raises(FormatError) as e:
        with Postings.read(str(path)) as p:
            p.entries(key if key is not None else 0)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


def udp4(src: str, dst: str, i: int = 0) -> bytes:
    return eth(0x0800, ipv4(17, ports(1000 + i % 5000, 53), src=src, dst=dst))


# --------------------------------------------------------------------------------------------
# Round trip


@needs_corpus
def test_corpus_round_trip(tmp_path: Path) -> None:
    """Every list of every corpus capture equals the one computed packet by packet, and the
    block time table the one computed from the packet columns."""
    totals = defaultdict(int)
    for pcap in corpus_files():
        path = tmp_path / "c.idx"
        write_index(path, build_index(pcap))
        idx = read_index(path)
        assert idx.linktype == 1, pcap
        want = reference_postings(idx)
        with Postings.read(str(path)) as p:
            assert (p.version, p.count, p.first_ns, p.last_ns, p.pcap_size) == (
                VERSION, idx.count, idx.first_ns, idx.last_ns, idx.pcap_size)
            got = stored_lists(p)
            assert got == want, pcap
            assert p.blocks() == reference_blocks(idx), pcap
            order = [sort_bytes(p.key(k)) for k in range(p.keys)]
            assert order == sorted(set(order)), pcap
            for key, (src, dst) in want.items():
                k = p.find(key[0], key[1], unknown=key[2])
                assert k is not None and (p.size(k), p.sources(k)) == (len(src) + len(dst),
                                                                       len(src))
            assert p.find(address_bytes("203.0.113.254"), 0x0800) is None
        totals["keys"] += len(want)
        totals["unknown"] += sum(1 for key in want if key[2])
        totals["arp"] += sum(1 for key in want if key[1] in (0x0806, 0x8035) and not key[2])
        totals["ip6"] += sum(1 for key in want if key[1] == 0x86DD and not key[2])
        totals["both"] += sum(1 for key, (s, d) in want.items() if set(s) & set(d))
    # guard against a vacuous pass: every kind of list occurs in the corpus
    assert totals["keys"] > 300 and totals["unknown"] and totals["arp"] and totals["ip6"] > 30
    assert totals["both"]  # packets from an address to itself


def _addresses(p: Postings, types: tuple[int, ...]) -> list[bytes]:
    found = {p.key(k)[0] for k in range(p.keys) if p.key(k)[1] in types and not p.key(k)[2]}
    return sorted(found)


def _records(p: Postings, number: dict[int, int], keys: list[int | None],
             part: str | None = None) -> set[int]:
    """Record numbers (found by their offsets) of the entries of `keys`: of their source
    parts ("src"), destination parts ("dst") or both (None)."""
    out = set()
    for k in keys:
        if k is not None:
            lst = p.entries(k)
            start = lst.sources if part == "dst" else 0
            end = lst.sources if part == "src" else len(lst.offset)
            out.update(number[off] for off in lst.offset[start:end])
    return out


@needs_tcpdump
def test_tcpdump_host_selects_the_posted_records(
    combined: tuple[Path, np.ndarray], tmp_path: Path  # noqa: F811
) -> None:
    """`host ADDR` selects every record posted under ADDR for its family's ethertypes, and
    otherwise only records of those ethertypes' "address unknown" lists; `src host ADDR`
    likewise with exactly the source parts, `dst host ADDR` the destination parts."""
    pcap, _ = combined
    path = tmp_path / "corpus.pcap.idx"
    write_index(path, build_index(pcap))
    idx = read_index(path)
    number = {off: i for i, off in enumerate(idx.offset.tolist())}
    with Postings.read(str(path)) as p:
        checked = 0
        for types, family in ((IPV4_TYPES, 4), ((0x86DD,), 6)):
            unknown = [p.find(bytes(16), et, unknown=True) for et in types]
            maybe = _records(p, number, unknown)
            addresses = _addresses(p, types)
            assert len(addresses) > 20
            for address in addresses[:: max(1, len(addresses) // 12)]:
                text = address_text(address, family)
                keys = [p.find(address, et) for et in types]
                for expr, part in (("host", None), ("src host", "src"), ("dst host", "dst")):
                    selected = set(tcpdump_select(pcap, f"{expr} {text}").tolist())
                    posted = _records(p, number, keys, part)
                    assert posted <= selected, (expr, text, sorted(posted - selected))
                    assert selected <= posted | maybe, (
                        expr, text, sorted(selected - posted - maybe))
                    assert posted or part is not None, text
                    checked += 1
        assert checked > 60


def test_lists_and_frames_of_a_real_capture(tmp_path: Path) -> None:
    """Thousands of hosts around one busy server: the server's list is long (alone in its
    frame), the hosts' short ones share frames of at least FRAME_ENTRIES entries; a packet
    with src == dst is in both parts of its list; tagged frames and other ethertypes are not
    posted; frames cut short are under "address unknown", as sources."""
    rng = np.random.default_rng(7)
    frames = []
    for i in range(30_000):
        host = f"10.{1 + int(rng.integers(0, 12))}.{int(rng.integers(0, 256))}.7"
        frames.append(udp4(host, "10.0.0.1", i) if i % 3 else udp4("10.0.0.1", host, i))
    frames += [udp4("10.0.0.9", "10.0.0.9"),
               eth(0x0800, ipv4(17, ports(1, 2), src="10.0.0.1"), tags=((0x8100, 5),)),
               eth(0x88CC, bytes(40)), udp4("10.0.0.1", "10.0.0.2")[:30],
               eth(0x86DD, ipv6(17, ports(1, 2), src="2001:db8::5", dst="2001:db8::5"))]
    _, path = index_of(tmp_path, frames)
    idx = read_index(path)
    section = decode_postings(path.read_bytes(), str(path))
    keys = section.keys
    m = section.entries
    assert len(keys) == len(reference_postings(idx)) > 1000 and len(m) > 3
    assert section.offset_bytes == 4 and {len(f) for f in section.frames} == {
        6 * int(n) for n in m}  # u32 offsets, u16 lengths
    for f in range(len(m)):
        mine = keys[keys["frame"] == f]
        assert len(mine) and int(mine["count"].sum()) == m[f]
        assert mine["first"].tolist() == (np.cumsum(mine["count"]) - mine["count"]).tolist()
        if len(mine) > 1 or mine["count"][0] < FRAME_ENTRIES:
            assert (mine["count"] < FRAME_ENTRIES).all()
            # closed once full, or before a long list (or at the end)
            nxt = keys[keys["frame"] == f + 1]
            assert m[f] >= FRAME_ENTRIES or not len(nxt) or nxt["count"][0] >= FRAME_ENTRIES
            assert m[f] - mine["count"][-1] < FRAME_ENTRIES
    assert (keys["frame"][1:] >= keys["frame"][:-1]).all()
    (server,) = np.flatnonzero(keys["count"] >= FRAME_ENTRIES)  # 10.0.0.1
    assert (keys["frame"] == keys["frame"][server]).sum() == 1
    assert not keys["reserved"].any()
    with Postings.read(str(path)) as p:
        assert stored_lists(p) == reference_postings(idx)
        for address, et in (("10.0.0.9", 0x0800), ("2001:db8::5", 0x86DD)):
            same = p.entries(p.find(address_bytes(address), et))
            assert same.sources == 1 and len(same.offset) == 2
            assert same.offset[0] == same.offset[1] and same.length[0] == same.length[1]
        short = p.entries(p.find(b"", 0x0800, unknown=True))
        assert short.sources == 1 and short.length == [16 + 30]
        server = p.entries(p.find(address_bytes("10.0.0.1"), 0x0800))
        # not the tagged, the LLDP or the short frame
        assert server.sources == 10_000 and len(server.offset) == 30_000
        for part in (server.offset[: server.sources], server.offset[server.sources :]):
            assert part == sorted(part) and len(set(part)) == len(part)
        assert p.find(address_bytes("10.0.0.1"), 0x88CC) is None


def test_block_time_table(tmp_path: Path) -> None:
    """One block per BLOCK packets in pcap order, the last one shorter; timestamps that step
    back count by their minimum and maximum, not their first and last."""
    rng = np.random.default_rng(3)
    steps = rng.integers(-400_000, 1_000_000, 2 * BLOCK + 300)
    pcap = tmp_path / "t.pcap"
    pcap.write_bytes(pcap_bytes(
        [(T0 + int(t), udp4("10.0.0.1", "10.0.0.2", i)[: 40 + i % 30])
         for i, t in enumerate(np.cumsum(steps))]))
    path = tmp_path / "t.pcap.idx"
    write_index(path, build_index(pcap))
    idx = read_index(path)
    want = reference_blocks(idx)
    assert len(want) == 3
    assert any(b[1] < idx.ts_ns[i * BLOCK] for i, b in enumerate(want))  # steps back
    with Postings.read(str(path)) as p:
        assert p.block_count == 3 and p.blocks() == want
    assert [tuple(b) for b in read_postings(path).blocks.tolist()] == want
    exact = sample_index(2 * BLOCK)
    with Postings.read(str(write(tmp_path, encode_index(exact)))) as p:
        assert p.block_count == 2 and p.blocks() == reference_blocks(exact)


@pytest.mark.parametrize("pcap_size, caplen, widths", [
    (1 << 20, 1500, (4, 2)), (5 << 30, 1500, (8, 2)), (1 << 20, 65520, (4, 4)),
    (5 << 30, 70_000, (8, 4))])
def test_offset_and_length_widths(tmp_path: Path, pcap_size: int, caplen: int,
                                  widths: tuple[int, int]) -> None:
    """Offsets are 8 bytes only for a pcap of 4 GiB or more, lengths 4 only when a record
    of the file is 64 KiB or longer: the frame's size tells the reader which."""
    idx = sample_index(2000)
    idx.caplen = idx.caplen.copy()
    idx.caplen[7] = caplen
    idx.wirelen = idx.caplen
    gaps = np.zeros(idx.count, np.int64)
    gaps[1500] = max(0, pcap_size - (1 << 20))  # a 4 GiB hole, if wanted
    sizes = np.concatenate(([24], 16 + idx.caplen[:-1].astype(np.int64)))
    idx.offset = (np.cumsum(sizes) + np.cumsum(gaps)).astype(np.uint64)
    idx.pcap_size = int(idx.offset[-1]) + 16 + int(idx.caplen[-1])
    assert (idx.pcap_size >= 1 << 32) == (widths[0] == 8)
    path = write(tmp_path, encode_index(idx))
    section = read_postings(path)
    assert section.offset_bytes == widths[0]
    m = section.entries
    assert [len(f) for f in section.frames] == [int(n) * sum(widths) for n in m]
    with Postings.read(str(path)) as p:
        assert stored_lists(p) == reference_postings(idx)


@pytest.mark.parametrize("sources, destinations", [(70_000, 3), (40_000, 40_000)])
def test_more_keys_than_16_bits(tmp_path: Path, sources: int, destinations: int) -> None:
    """65536 keys or more: each part is grouped on its own (in two passes when it alone has
    65536 keys or more) and the parts interleaved; the lists are the same."""
    def host(net: int, i: int) -> str:
        return f"10.{net + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"

    n = max(sources, destinations)
    frames = [udp4(host(0, i % sources), host(100, i % destinations), i) for i in range(n)]
    pcap = tmp_path / "big.pcap"
    pcap.write_bytes(pcap_bytes([(T0 + i, f) for i, f in enumerate(frames)]))
    idx = build_index(pcap)
    section = build_postings(idx)
    assert len(section.keys) == sources + destinations >= 1 << 16
    path = write(tmp_path, encode_index(idx))
    with Postings.read(str(path)) as p:
        assert stored_lists(p) == reference_postings(idx)


@pytest.mark.parametrize("nkeys", [3, 1000, 65535, 65536, 200_000, 3_000_000])
def test_grouping_is_a_stable_sort_by_key(nkeys: int) -> None:
    """The radix grouping of entry slots equals numpy's stable argsort of the key numbers,
    whatever their range (one 16-bit pass, a partition by the few high values, or two
    passes)."""
    rng = np.random.default_rng(nkeys)
    rows = [rng.integers(0, nkeys + 1, 5000) for _ in range(2)]
    rows[0][-1] = nkeys  # the "no key" number is one of them
    flow = rng.integers(0, 5000, 20_000)
    want = np.argsort(np.concatenate([r[flow] for r in rows]), kind="stable")
    assert np.array_equal(_stable_order(rows, flow, nkeys), want)


def test_directory_longer_than_the_first_read(tmp_path: Path) -> None:
    """More keys than READ_AHEAD holds: the directory comes in a second read."""
    frames = [eth(0x86DD, ipv6(17, ports(1, 2), src=f"2001:db8::{i:x}", dst="2001:db8::ffff"))
              for i in range(1, 9000)]
    _, path = index_of(tmp_path, frames)
    with Postings.read(str(path)) as p:
        start, length = p.directory_span()
        assert start == 0 and length > READ_AHEAD and p.keys == 9000
        last = p.find(address_bytes("2001:db8::2327"), 0x86DD)
        assert last is not None and (p.size(last), p.sources(last)) == (1, 1)
        assert p.entries(last).offset == [int(read_index(path).offset[-1])]
        server = p.find(address_bytes("2001:db8::ffff"), 0x86DD)
        assert (p.size(server), p.sources(server)) == (8999, 0)
        assert len(p.blocks()) == 9


def test_reads_only_the_directory_and_one_frame(tmp_path: Path) -> None:
    """The flow table and packet section may be anything: they are not read. The spans name
    the bytes that are."""
    frames = [udp4(f"10.0.{i % 50}.1", "10.9.9.9", i) for i in range(20_000)]
    _, path = index_of(tmp_path, frames)
    data = bytearray(path.read_bytes())
    h = parse_header(bytes(data), "x")
    data[h.summary_offset : h.frames_offset] = bytes(h.frames_offset - h.summary_offset)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        decode_index(bytes(data), "x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with Postings.read(str(path), fd=fd) as p:
            k = p.find(address_bytes("10.0.7.1"), 0x0800)
            assert p.entries(k).length == [16 + len(frames[0])] * 400
            start, length = p.frame_span(k)
            assert h.frames_offset <= start and start + length <= len(data)
            assert p.directory_span() == (0, h.summary_offset)
            assert p.frame_span(p.find(address_bytes("10.9.9.9"), 0x0800))[0] != start
        os.fstat(fd)  # still open: a given fd is the caller's
    finally:
        os.close(fd)


def test_index_readers_never_read_the_frames(tmp_path: Path) -> None:
    """read_index and decode_index need (and verify) only the bytes before the postings
    frames: frames that are garbage, or not there at all, change nothing for them."""
    frames = [udp4(f"10.0.{i % 50}.1", "10.9.9.9", i) for i in range(5_000)]
    _, path = index_of(tmp_path, frames)
    good = path.read_bytes()
    h = parse_header(good, "x")
    assert h.frames_len > 0
    path.write_bytes(good[: h.frames_offset] + bytes(h.frames_len))  # the frames zeroed
    for packets, verify in ((True, True), (False, True), (False, False)):
        assert read_index(path, packets=packets, verify=verify).count == 5_000
    assert decode_index(good[: h.frames_offset], "x", file_size=len(good)).count == 5_000
    with pytest.raises(FormatError, match="truncated"):
        decode_index(good[: h.frames_offset], "x")  # without the real size: it is short
    assert "postings frame 0" in read_error(path)
    with pytest.raises(FormatError, match="postings frame 0"):
        read_postings(path)


def test_non_ethernet_link_types_have_no_postings(tmp_path: Path) -> None:
    frame = ipv4(17, ports(1, 2))
    for linktype, frames in ((101, [frame] * 3), (113, [bytes(14) + b"\x08\x00" + frame] * 3)):
        _, path = index_of(tmp_path, frames, linktype=linktype)
        h = parse_header(path.read_bytes(), "x")
        # the directory holds only the block time table and the time bins (head, one bin)
        assert (h.version, h.directory_len, h.keys, h.frames_len) == (5, 24 + 32, 0, 0)
        assert read_index(path).count == 3
        with Postings.read(str(path)) as p:
            assert (p.keys, p.frames, p.linktype, len(p.blocks())) == (0, 0, linktype, 1)
            assert p.find(address_bytes("10.0.0.1"), 0x0800) is None


def test_empty_and_unposted_captures(tmp_path: Path) -> None:
    _, path = index_of(tmp_path, [])
    with Postings.read(str(path)) as p:
        assert p.keys == 0 and p.count == 0 and p.blocks() == []
    _, path = index_of(tmp_path, [eth(0x0800, ipv4(6, ports(1, 2)), tags=((0x8100, 1),))])
    with Postings.read(str(path)) as p:
        assert p.keys == 0 and p.count == 1 and len(p.blocks()) == 1


# --------------------------------------------------------------------------------------------
# Older and newer versions, damage


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_have_no_postings(tmp_path: Path, version: int) -> None:
    idx = sample_index(50)
    path = write(tmp_path, as_version(encode_index(idx), version))
    assert decode_index(path.read_bytes(), str(path)).count == 50
    with pytest.raises(NoPostings) as e:
        Postings.read(str(path))
    assert str(e.value).startswith(str(path)) and f"version {version}" in str(e.value)
    with pytest.raises(NoPostings):
        decode_postings(path.read_bytes(), str(path))


def test_newer_version_is_refused(tmp_path: Path) -> None:
    data = bytearray(encode_index(sample_index(5)))
    struct.pack_into("<H", data, 8, 6)
    msg = read_error(write(tmp_path, bytes(data[:30])))
    assert "version 6 is newer than this pcapvault, which reads versions 1, 2, 3, 4 and 5" in msg
    with pytest.raises(FormatError) as e:
        Postings.read(str(write(tmp_path, bytes(data))))
    assert not isinstance(e.value, NoPostings)


def test_bad_magic_missing_and_truncated_files(tmp_path: Path) -> None:
    assert "not a pcapvault index" in read_error(write(tmp_path, bytes(100)))
    assert "cannot read index" in read_error(tmp_path / "missing.idx")
    data = encode_index(sample_index(300))
    h = parse_header(data, "x")
    for cut in (70, 80, 100, h.summary_offset, h.frames_offset, len(data) - 1):
        assert "truncated" in read_error(write(tmp_path, data[:cut])), cut
    assert "trailing garbage" in read_error(write(tmp_path, data + b"\0"))


def test_every_flipped_directory_byte_is_detected(tmp_path: Path) -> None:
    """Header fields of the postings and every directory byte, block time table included."""
    data = encode_index(sample_index(3000))
    h = parse_header(data, "x")
    assert h.directory_len > 40 * h.keys + 16 + 2 * 24
    for pos in range(64, h.summary_offset):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        path = write(tmp_path, bytes(bad))
        msg = read_error(path)
        assert "damaged" in msg or "truncated" in msg or "trailing" in msg, (pos, msg)
        with pytest.raises(FormatError):
            decode_index(bytes(bad), "x")


@pytest.mark.parametrize("field, at", [("keys", 68), ("packets", 16)])
def test_damaged_counts_are_detected(tmp_path: Path, field: str, at: int) -> None:
    """The header's key and packet counts are outside the directory's checksum: the frame
    table shows a changed key count, and a packet count that changes the number of time
    blocks (the header's own checksum covers them for every other reader)."""
    data = encode_index(sample_index(3000))
    h = parse_header(data, "x")
    fmt, value, deltas = ("<I", h.keys, (-2, -1, 1, 2)) if field == "keys" else (
        "<Q", h.count, (-BLOCK, BLOCK, 3 * BLOCK, 1 << 40))
    for delta in deltas:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, at, value + delta)
        assert "damaged" in read_error(write(tmp_path, bytes(bad))), delta
        with pytest.raises(FormatError, match="checksum"):
            decode_index(bytes(bad), "x")


def test_directory_length_that_does_not_fit(tmp_path: Path) -> None:
    """A directory whose length leaves no whole frame table beside the keys and the time
    blocks, even with every checksum right."""
    idx = sample_index(3000)
    section = build_postings(idx)
    directory, frames = encode_postings(section)
    for extra in (b"\0" * 8, b"\0" * 48):  # not a whole frame entry; 3 entries too many
        path = write(tmp_path, with_postings(encode_index(idx), directory + extra,
                                             len(section.keys), frames))
        msg = read_error(path)
        assert "cannot hold" in msg or "frame table does not match" in msg, msg
    short = directory[: 40 * len(section.keys) + 8]  # not even the block table fits
    path = write(tmp_path, with_postings(encode_index(idx), short, len(section.keys), frames))
    assert "cannot hold" in read_error(path)
    with pytest.raises(FormatError, match="cannot hold"):
        decode_index(path.read_bytes(), "x")


def test_flipped_frame_byte_is_caught_by_the_frame_checksum_only(tmp_path: Path) -> None:
    """Frames are outside the header's checksum and carry zstd content checksums: damage
    shows when a frame is read (Postings.entries, read_postings), not to the readers of the
    flow table and packet section, which never read the frames; a flipped summary byte is
    still the header checksum's."""
    frames = [udp4(f"10.0.{i % 7}.1", "10.9.9.9", i) for i in range(30)]
    _, path = index_of(tmp_path, frames)
    data = path.read_bytes()
    h = parse_header(data, "x")
    with Postings.read(str(path)) as p:
        key = p.find(address_bytes("10.0.3.1"), 0x0800)
        start, length = p.frame_span(key)
    assert (start, start + length) == (h.frames_offset, len(data))
    for pos in range(start, start + length):
        bad = bytearray(data)
        bad[pos] ^= 0x04
        damaged = write(tmp_path, bytes(bad), "d.idx")
        assert read_index(damaged).count == 30  # frames are not read there...
        decode_index(bytes(bad), "x")
        msg = read_error(damaged, key)  # ...but here
        assert "postings frame 0" in msg and "damaged" in msg, (pos, msg)
        with pytest.raises(FormatError, match="postings frame 0"):
            read_postings(damaged)
    bad = bytearray(data)
    bad[h.summary_offset + h.summary_len // 2] ^= 0x04
    damaged = write(tmp_path, bytes(bad), "d.idx")
    for read in (read_index, read_postings):
        with pytest.raises(FormatError, match="checksum mismatch"):
            read(damaged)
    with Postings.read(str(damaged)) as p:  # reads no summary: cannot tell
        assert p.entries(key).offset


def test_lists_that_do_not_fit_their_frame(tmp_path: Path) -> None:
    idx = sample_index(300)

    def overlong(section) -> None:
        section.keys["count"][-1] += 1

    def beyond(section) -> None:
        section.keys["frame"][0] = 7

    for change, words in ((overlong, "beyond its frame"), (beyond, "names frame 7")):
        path = write(tmp_path, respliced(idx, change))
        last = parse_header(path.read_bytes(), "x").keys - 1 if change is overlong else 0
        assert words in read_error(path, last)
        with pytest.raises(FormatError, match="does not fit the frame table"):
            decode_index(path.read_bytes(), str(path))


def test_more_sources_than_entries(tmp_path: Path) -> None:
    idx = sample_index(300)

    def sources(section) -> None:
        section.keys["sources"][0] = section.keys["count"][0] + 1

    path = write(tmp_path, respliced(idx, sources))
    assert "sources in a list of" in read_error(path, 0)
    with pytest.raises(FormatError, match="postings key 0 has a wrong source count"):
        decode_index(path.read_bytes(), str(path))


def test_frame_of_the_wrong_size(tmp_path: Path) -> None:
    """A frame decompressing to other than m x (offset width + 2 or 4) bytes."""
    idx = sample_index(300)
    section = build_postings(idx)
    (frame,) = section.frames
    m = len(frame) // 6
    for size in (len(frame) - 6, 7 * m):  # an entry short; 3-byte lengths
        blob = zstd.compress(bytes(frame[:size]) + bytes(max(0, size - len(frame))))
        directory = postings_directory(section, [blob])
        path = write(tmp_path, with_postings(encode_index(idx), directory, len(section.keys),
                                             blob))
        msg = read_error(path)
        assert f"postings frame 0 is {size} bytes, expected {6 * m} or {8 * m}" in msg


def test_record_beyond_the_pcap(tmp_path: Path) -> None:
    """A list naming a record past the pcap size in the header (a faulty writer's frame,
    checksums right) is refused when it is read."""
    idx = sample_index(300)

    def far(section) -> None:
        frame = bytearray(section.frames[0])
        m = len(frame) // 6
        first = int(section.keys["first"][-1])
        frame[3 * m + first] = 0xFF  # the top byte of the last list's first offset
        section.frames[0] = bytes(frame)

    path = write(tmp_path, respliced(idx, far))
    last = parse_header(path.read_bytes(), "x").keys - 1
    assert "beyond the pcap" in read_error(path, last)


def test_unsorted_keys_are_refused_by_the_full_decoder(tmp_path: Path) -> None:
    def swap(section) -> None:
        section.keys[[0, 1]] = section.keys[[1, 0]]

    path = write(tmp_path, respliced(sample_index(300), swap))
    with pytest.raises(FormatError, match="postings key 1 out of order"):
        decode_index(path.read_bytes(), str(path))


def test_block_table_contradicting_the_header(tmp_path: Path) -> None:
    idx = sample_index(3000)

    def late(section) -> None:
        section.blocks["max_ns"][1] = idx.last_ns + 1

    path = write(tmp_path, respliced(idx, late))
    with pytest.raises(FormatError, match="postings time block 1 contradicts the header"):
        decode_index(path.read_bytes(), str(path))


def test_reader_needs_no_numpy(tmp_path: Path) -> None:
    """The host-query path reads postings before numpy is imported: it must stay that way."""
    frames = [udp4("10.0.0.1", "10.0.0.2", i) for i in range(3)] + [udp4("10.0.0.2", "10.0.0.1")]
    _, path = index_of(tmp_path, frames)
    code = (
        "import sys\n"
        "from pcapvault.index.postings import Postings\n"
        f"with Postings.read({str(path)!r}) as p:\n"
        "    lst = p.entries(p.find(bytes(10) + b'\\xff\\xff' + bytes([10, 0, 0, 2]), 0x0800))\n"
        "    blocks = p.blocks()\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
        "print(lst.offset, lst.length, lst.sources, len(blocks))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["[234,", "24,", "94,", "164]", "[70,", "70,", "70,", "70]", "1", "1"]
