"""Address postings (index version 3): the numpy-free reader against postings computed one
packet at a time from the decoded index, tcpdump as the oracle for `host ADDR`, and refusal
of anything damaged with a one-line error naming the file."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_index_builder import (
    combined,  # noqa: F401 (fixture: the whole corpus in one capture)
    corpus_files,
    eth,
    ipv4,
    ipv6,
    needs_corpus,
    needs_tcpdump,
    ports,
    tcpdump_select,
)
from test_indexfile import as_version, sample_index, with_crc

from pcapvault.index import indexfile
from pcapvault.index.builder import build_index, index_records
from pcapvault.index.errors import FormatError
from pcapvault.index.indexfile import (
    FLAG_ADDRS,
    VLAN_ABSENT,
    PacketIndex,
    PostingsSection,
    address_bytes,
    address_text,
    build_postings,
    decode_index,
    decode_postings,
    encode_index,
    encode_postings,
    read_index,
    write_index,
)
from pcapvault.index.pcapfile import parse_global_header, pcap_bytes, scan_records
from pcapvault.index.postings import (
    FRAME_ENTRIES,
    READ_AHEAD,
    ROLE_DST,
    ROLE_SRC,
    NoPostings,
    Postings,
    parse_header,
)

T0 = 1_763_737_200_000_000_000
POSTED = (0x0800, 0x0806, 0x8035, 0x86DD)
IPV4_TYPES = (0x0800, 0x0806, 0x8035)

Key = tuple[bytes, int, bool]  # address (zeros for "unknown"), ethertype, unknown
Entry = tuple[int, int, int, int]  # ts_ns, record offset, record length, roles


def reference_postings(idx: PacketIndex) -> dict[Key, list[Entry]]:
    """FORMAT.md's postings, one packet at a time, from a decoded index."""
    lists: dict[Key, list[Entry]] = defaultdict(list)
    for i in range(idx.count):
        row = idx.flows[idx.flow[i]]
        et = int(row["ethertype"])
        if int(row["vlan1"]) != VLAN_ABSENT or et not in POSTED:
            continue
        where = (int(idx.ts_ns[i]), int(idx.offset[i]), 16 + int(idx.caplen[i]))
        if not row["flags"] & FLAG_ADDRS:
            lists[(bytes(16), et, True)].append((*where, 0))
            continue
        src, dst = bytes(row["src"]), bytes(row["dst"])
        if src == dst:
            lists[(src, et, False)].append((*where, ROLE_SRC | ROLE_DST))
        else:
            lists[(src, et, False)].append((*where, ROLE_SRC))
            lists[(dst, et, False)].append((*where, ROLE_DST))
    return lists


def stored_lists(p: Postings) -> dict[Key, list[Entry]]:
    out = {}
    for k in range(p.keys):
        got = p.entries(k)
        assert len(got.ts_ns) == p.size(k) > 0
        out[p.key(k)] = list(zip(got.ts_ns, got.offset, got.length, got.roles, strict=True))
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


def with_postings(data: bytes, directory: bytes, keys: int, frames: bytes) -> bytes:
    """`data` (a version 3 file) with other postings, header fields and checksums made to
    match them: to reach the checks behind the checksums."""
    h = parse_header(data, "x")
    head = bytearray(data[:80])
    struct.pack_into("<IIII", head, 64, len(directory), keys, len(frames), zlib.crc32(directory))
    return with_crc(bytes(head) + directory + data[h.summary_offset : h.frames_offset] + frames)


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
    """Every list of every corpus capture equals the one computed packet by packet."""
    totals = defaultdict(int)
    for pcap in corpus_files():
        path = tmp_path / "c.idx"
        write_index(path, build_index(pcap))
        idx = read_index(path)
        assert idx.linktype == 1, pcap
        want = reference_postings(idx)
        with Postings.read(str(path)) as p:
            assert (p.version, p.count, p.first_ns, p.last_ns, p.pcap_size) == (
                3, idx.count, idx.first_ns, idx.last_ns, idx.pcap_size)
            got = stored_lists(p)
            assert got == want, pcap
            order = [sort_bytes(p.key(k)) for k in range(p.keys)]
            assert order == sorted(set(order)), pcap
            for key, lst in want.items():
                k = p.find(key[0], key[1], unknown=key[2])
                assert k is not None and p.size(k) == len(lst)
            assert p.find(address_bytes("203.0.113.254"), 0x0800) is None
        totals["keys"] += len(want)
        totals["unknown"] += sum(1 for key in want if key[2])
        totals["arp"] += sum(1 for key in want if key[1] in (0x0806, 0x8035) and not key[2])
        totals["ip6"] += sum(1 for key in want if key[1] == 0x86DD and not key[2])
    # guard against a vacuous pass: every kind of list occurs in the corpus
    assert totals["keys"] > 300 and totals["unknown"] and totals["arp"] and totals["ip6"] > 30


def _addresses(p: Postings, types: tuple[int, ...]) -> list[bytes]:
    found = {p.key(k)[0] for k in range(p.keys) if p.key(k)[1] in types and not p.key(k)[2]}
    return sorted(found)


def _records(p: Postings, keys: list[int | None], role: int | None = None) -> set[int]:
    """Record numbers (the combined capture stamps record i at i seconds) of the lists."""
    out = set()
    for k in keys:
        if k is not None:
            lst = p.entries(k)
            out.update(ts // 1_000_000_000 for ts, r in zip(lst.ts_ns, lst.roles, strict=True)
                       if role is None or r & role)
    return out


@needs_tcpdump
def test_tcpdump_host_selects_the_posted_records(
    combined: tuple[Path, np.ndarray], tmp_path: Path  # noqa: F811
) -> None:
    """`host ADDR` selects every record posted under ADDR for its family's ethertypes, and
    otherwise only records of those ethertypes' "address unknown" lists; likewise `src host`
    with the source role."""
    pcap, _ = combined
    path = tmp_path / "corpus.pcap.idx"
    write_index(path, build_index(pcap))
    with Postings.read(str(path)) as p:
        checked = 0
        for types, family in ((IPV4_TYPES, 4), ((0x86DD,), 6)):
            unknown = [p.find(bytes(16), et, unknown=True) for et in types]
            maybe = _records(p, unknown)
            addresses = _addresses(p, types)
            assert len(addresses) > 20
            for address in addresses[:: max(1, len(addresses) // 12)]:
                text = address_text(address, family)
                keys = [p.find(address, et) for et in types]
                for expr, role in (("host", None), ("src host", ROLE_SRC)):
                    selected = set(tcpdump_select(pcap, f"{expr} {text}").tolist())
                    posted = _records(p, keys, role)
                    assert posted <= selected, (expr, text, sorted(posted - selected))
                    assert selected <= posted | maybe, (
                        expr, text, sorted(selected - posted - maybe))
                    assert posted or role is not None, text
                    checked += 1
        assert checked > 40


def test_lists_and_frames_of_a_real_capture(tmp_path: Path) -> None:
    """Thousands of hosts around one busy server: the server's lists are long (each alone in
    its frame), the hosts' short ones share frames of at least FRAME_ENTRIES entries; a
    packet with src == dst is one entry with both roles; tagged frames and other ethertypes
    are not posted; frames cut short are under "address unknown"."""
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
    m = section.frame_entries()
    assert len(keys) == len(reference_postings(idx)) > 1000 and len(m) > 3
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
    with Postings.read(str(path)) as p:
        assert stored_lists(p) == reference_postings(idx)
        same = p.entries(p.find(address_bytes("10.0.0.9"), 0x0800))
        assert same.roles == bytes([ROLE_SRC | ROLE_DST])
        same = p.entries(p.find(address_bytes("2001:db8::5"), 0x86DD))
        assert same.roles == bytes([ROLE_SRC | ROLE_DST])
        short = p.entries(p.find(b"", 0x0800, unknown=True))
        assert short.roles == b"\0" and short.length == [16 + 30]
        server = p.entries(p.find(address_bytes("10.0.0.1"), 0x0800))
        assert len(server.offset) == 30_000  # not the tagged, the LLDP or the short frame
        assert server.offset == sorted(server.offset)
        assert set(server.roles) == {ROLE_SRC, ROLE_DST}
        assert p.find(address_bytes("10.0.0.1"), 0x88CC) is None


def test_directory_longer_than_the_first_read(tmp_path: Path) -> None:
    """More keys than READ_AHEAD holds: the directory comes in a second read."""
    frames = [eth(0x86DD, ipv6(17, ports(1, 2), src=f"2001:db8::{i:x}", dst="2001:db8::ffff"))
              for i in range(1, 9000)]
    _, path = index_of(tmp_path, frames)
    with Postings.read(str(path)) as p:
        start, length = p.directory_span()
        assert start == 0 and length > READ_AHEAD and p.keys == 9000
        last = p.find(address_bytes("2001:db8::2327"), 0x86DD)
        assert last is not None and p.size(last) == 1
        assert p.entries(last).offset == [int(read_index(path).offset[-1])]
        assert p.size(p.find(address_bytes("2001:db8::ffff"), 0x86DD)) == 8999


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


def test_non_ethernet_link_types_have_no_postings(tmp_path: Path) -> None:
    frame = ipv4(17, ports(1, 2))
    for linktype, frames in ((101, [frame] * 3), (113, [bytes(14) + b"\x08\x00" + frame] * 3)):
        _, path = index_of(tmp_path, frames, linktype=linktype)
        h = parse_header(path.read_bytes(), "x")
        assert (h.version, h.directory_len, h.keys, h.frames_len) == (3, 0, 0, 0)
        assert read_index(path).count == 3
        with Postings.read(str(path)) as p:
            assert (p.keys, p.frames, p.linktype) == (0, 0, linktype)
            assert p.find(address_bytes("10.0.0.1"), 0x0800) is None


def test_empty_and_unposted_captures(tmp_path: Path) -> None:
    _, path = index_of(tmp_path, [])
    with Postings.read(str(path)) as p:
        assert p.keys == 0 and p.count == 0
    _, path = index_of(tmp_path, [eth(0x0800, ipv4(6, ports(1, 2)), tags=((0x8100, 1),))])
    with Postings.read(str(path)) as p:
        assert p.keys == 0 and p.count == 1


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
    struct.pack_into("<H", data, 8, 4)
    msg = read_error(write(tmp_path, bytes(data[:30])))
    assert "version 4 is newer than this pcapvault, which reads versions 1, 2 and 3" in msg
    with pytest.raises(FormatError) as e:
        Postings.read(str(write(tmp_path, bytes(data))))
    assert not isinstance(e.value, NoPostings)


def test_bad_magic_missing_and_truncated_files(tmp_path: Path) -> None:
    assert "not a pcapvault index" in read_error(write(tmp_path, bytes(100)))
    assert "cannot read index" in read_error(tmp_path / "missing.idx")
    data = encode_index(sample_index(300))
    h = parse_header(data, "x")
    for cut in (70, 80, 100, h.summary_offset, len(data) - 1):
        assert "truncated" in read_error(write(tmp_path, data[:cut])), cut
    assert "trailing garbage" in read_error(write(tmp_path, data + b"\0"))


def test_every_flipped_directory_byte_is_detected(tmp_path: Path) -> None:
    data = encode_index(sample_index(300))
    h = parse_header(data, "x")
    assert h.directory_len > 32
    for pos in range(64, h.summary_offset):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        path = write(tmp_path, bytes(bad))
        msg = read_error(path)
        assert "damaged" in msg or "truncated" in msg or "trailing" in msg, (pos, msg)
        with pytest.raises(FormatError):
            decode_index(bytes(bad), "x")


def test_damaged_key_count_is_detected(tmp_path: Path) -> None:
    """The header's key count is outside the directory's checksum: the frame table shows."""
    data = encode_index(sample_index(300))
    keys = parse_header(data, "x").keys
    for wrong in (keys - 2, keys - 1, keys + 1, keys + 2):
        bad = bytearray(data)
        struct.pack_into("<I", bad, 68, wrong)
        assert "damaged" in read_error(write(tmp_path, bytes(bad))), wrong


def test_every_flipped_frame_byte_is_detected(tmp_path: Path) -> None:
    """Frames carry zstd content checksums: damage shows when the frame is read, even in a
    file whose own checksum was made to match."""
    frames = [udp4(f"10.0.{i % 7}.1", "10.9.9.9", i) for i in range(30)]
    _, path = index_of(tmp_path, frames)
    data = path.read_bytes()
    with Postings.read(str(path)) as p:
        key = p.find(address_bytes("10.0.3.1"), 0x0800)
        start, length = p.frame_span(key)
    for pos in range(start, start + length):
        bad = bytearray(data)
        bad[pos] ^= 0x04
        damaged = write(tmp_path, with_crc(bytes(bad)), "d.idx")
        decode_index(damaged.read_bytes(), "x")  # frames are not decompressed there...
        msg = read_error(damaged, key)  # ...but here
        assert "postings frame 0" in msg and "damaged" in msg, (pos, msg)


def _respliced(tmp_path: Path, change) -> Path:
    """A sample index whose postings section was altered by `change` and re-encoded, with
    every checksum valid."""
    idx = sample_index(300)
    section = build_postings(idx)
    change(section)
    directory, frames = encode_postings(section)
    return write(tmp_path, with_postings(encode_index(idx), directory, len(section.keys),
                                         frames))


def test_lists_that_do_not_fit_their_frame(tmp_path: Path) -> None:
    def overlong(section) -> None:
        section.keys["count"][-1] += 1

    def beyond(section) -> None:
        section.keys["frame"][0] = 7

    for change, words in ((overlong, "beyond its frame"), (beyond, "names frame 7")):
        path = _respliced(tmp_path, change)
        last = parse_header(path.read_bytes(), "x").keys - 1 if change is overlong else 0
        assert words in read_error(path, last)
        with pytest.raises(FormatError, match="does not fit the frame table"):
            decode_index(path.read_bytes(), str(path))


def test_frame_of_the_wrong_size(tmp_path: Path) -> None:
    """A frame decompressing to fewer entries than the frame table says."""
    idx = sample_index(300)
    section = build_postings(idx)
    (frame,) = section.frames
    _, blob = encode_postings(PostingsSection(section.keys, [frame[:-21]]))
    directory = section.keys.tobytes() + struct.pack("<QII", 0, len(blob), len(frame) // 21)
    path = write(tmp_path, with_postings(encode_index(idx), directory, len(section.keys), blob))
    msg = read_error(path)
    assert f"postings frame 0 is {len(frame) - 21} bytes, expected {len(frame)}" in msg


def test_unsorted_keys_are_refused_by_the_full_decoder(tmp_path: Path) -> None:
    def swap(section) -> None:
        section.keys[[0, 1]] = section.keys[[1, 0]]

    path = _respliced(tmp_path, swap)
    with pytest.raises(FormatError, match="postings key 1 out of order"):
        decode_index(path.read_bytes(), str(path))


def test_reader_needs_no_numpy(tmp_path: Path) -> None:
    """The host-query path reads postings before numpy is imported: it must stay that way."""
    frames = [udp4("10.0.0.1", "10.0.0.2", i) for i in range(3)]
    _, path = index_of(tmp_path, frames)
    code = (
        "import sys\n"
        "from pcapvault.index.postings import Postings\n"
        f"with Postings.read({str(path)!r}) as p:\n"
        "    lst = p.entries(p.find(bytes(10) + b'\\xff\\xff' + bytes([10, 0, 0, 2]), 0x0800))\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
        "print(lst.offset, lst.roles.hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["[24,", "94,", "164]", "020202"]


def test_key_hash_collisions_take_the_exact_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are grouped through a hash, checked afterwards: with every key hashing alike the
    postings come out the same."""
    frames = [udp4(f"10.{i % 3}.{i % 11}.1", f"10.9.{i % 5}.9", i) for i in range(500)]
    frames += [eth(0x86DD, ipv6(17, ports(1, 2), src=f"2001:db8::{i}")) for i in range(1, 9)]
    pcap = pcap_bytes([(T0 + i, f) for i, f in enumerate(frames)])
    header = parse_global_header(pcap, "x")
    idx = index_records(pcap, header, scan_records(pcap, header))
    normal = build_postings(idx)
    monkeypatch.setattr(indexfile, "_KEY_HASH", (np.uint64(0),) * 3)
    colliding = build_postings(idx)
    assert len(normal.keys) == 33 + 5 + 8  # 10.x.y.1, 10.9.z.9, 2001:db8::1..8
    assert colliding.keys.tobytes() == normal.keys.tobytes()
    assert colliding.frames == normal.frames
