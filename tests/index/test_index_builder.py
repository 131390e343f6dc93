"""The index builder against an independent per-packet reference decoder, dpkt and tcpdump.

The vectorised builder is checked three ways:
- against `ref_row`, a plain one-packet-at-a-time decoder written from docs/FORMAT.md, on
  fabricated edge cases (every truncation length, fragments, tags, extension headers) and on
  thousands of randomly structured frames;
- against dpkt for the exact addresses and ports of plain IPv4 TCP/UDP packets;
- against tcpdump as the oracle for BPF filters over the real-world corpus: every packet
  tcpdump selects must be one the index says could match.
"""

from __future__ import annotations

import struct
from pathlib import Path

import dpkt
import numpy as np
import pytest
from frames import (
    MAC,
    corpus_files,
    eth,
    ipv4,
    ipv6,
    needs_corpus,
    needs_tcpdump,
    ports,
    tcpdump_select,
)

from pcapvault.index import builder
from pcapvault.index.builder import (
    IPV6_EXTENSIONS,
    MAX_IPV6_EXTENSIONS,
    MAX_VLAN_TAGS,
    build_index,
    index_pcap,
    index_records,
)
from pcapvault.index.indexfile import (
    ETHERTYPE_ARP,
    ETHERTYPE_RARP,
    FLAG_ADDRS,
    FLAG_FRAGMENT,
    FLAG_PORTS,
    FLAG_PROTO,
    FLOW_DTYPE,
    PORT_PROTOCOLS,
    VLAN_ABSENT,
    VLAN_TPIDS,
    VLAN_UNREADABLE,
    address_array,
    address_bytes,
    flows_of_packets,
)
from pcapvault.index.pcapfile import parse_global_header, pcap_bytes, scan_records

T0 = 1_700_000_000_000_000_000


# --------------------------------------------------------------------------------------------
# Reference decoder: one packet at a time, straight from FORMAT.md


def ref_row(frame: bytes, linktype: int = 1) -> bytes:
    """The 48-byte flow row FORMAT.md prescribes for `frame`."""
    n = len(frame)

    def be16(at: int) -> int:
        return int.from_bytes(frame[at : at + 2], "big")

    r = dict(et=0, v1=VLAN_ABSENT, v2=VLAN_ABSENT, ipver=0, proto=0, flags=0, sport=0, dport=0,
             src=bytes(16), dst=bytes(16))
    if linktype in (1, 113, 276):
        tpos, pos = {1: (12, 14), 113: (14, 16), 276: (0, 20)}[linktype]
        if n < tpos + 2:
            return _pack(r)
        et = be16(tpos)
        for depth in range(MAX_VLAN_TAGS):
            if et not in VLAN_TPIDS:
                break
            vid = be16(pos) & 0x0FFF if n >= pos + 2 else VLAN_UNREADABLE
            r["v1" if depth == 0 else "v2"] = vid if depth < 2 else r["v2"]
            et = be16(pos + 2) if n >= pos + 4 else 0
            pos += 4
    elif linktype in (101, 228, 229):
        version = frame[0] >> 4 if n else 0
        et, pos = {4: 0x0800, 6: 0x86DD}.get(version, 0), 0
    else:
        return _pack(r)
    r["et"] = et
    if et == 0x0800:
        _ref_ipv4(frame, pos, r)
    elif et == 0x86DD:
        _ref_ipv6(frame, pos, r)
    elif et in (ETHERTYPE_ARP, ETHERTYPE_RARP) and n >= pos + 28:
        # the bytes libpcap's `arp host` compares, whatever the ARP header says
        r["flags"] |= FLAG_ADDRS
        r["src"] = bytes(10) + b"\xff\xff" + frame[pos + 14 : pos + 18]
        r["dst"] = bytes(10) + b"\xff\xff" + frame[pos + 24 : pos + 28]
    return _pack(r)


def _ref_ipv4(frame: bytes, p: int, r: dict) -> None:
    n = len(frame)
    r["ipver"] = 4
    nonfirst = n >= p + 8 and int.from_bytes(frame[p + 6 : p + 8], "big") & 0x1FFF != 0
    if n >= p + 10:
        r["proto"] = frame[p + 9]
        r["flags"] |= FLAG_PROTO
    if nonfirst:
        r["flags"] |= FLAG_FRAGMENT
    if n >= p + 20:
        r["flags"] |= FLAG_ADDRS
        r["src"] = bytes(10) + b"\xff\xff" + frame[p + 12 : p + 16]
        r["dst"] = bytes(10) + b"\xff\xff" + frame[p + 16 : p + 20]
    if r["flags"] & FLAG_PROTO and not nonfirst and r["proto"] in PORT_PROTOCOLS:
        l4 = p + (frame[p] & 0x0F) * 4
        if n >= l4 + 4:
            _ref_ports(frame, l4, r)


def _ref_ipv6(frame: bytes, p: int, r: dict) -> None:
    n = len(frame)
    r["ipver"] = 6
    if n >= p + 40:
        r["flags"] |= FLAG_ADDRS
        r["src"], r["dst"] = frame[p + 8 : p + 24], frame[p + 24 : p + 40]
    if n < p + 7:
        return
    nh, cur, nonfirst, known = frame[p + 6], p + 40, False, True
    steps = 0
    while nh in IPV6_EXTENSIONS:
        if steps == MAX_IPV6_EXTENSIONS or n < cur + 1:
            known = False
            break
        nxt = frame[cur]
        if nh == 44:
            size = 8
            if n >= cur + 4:
                nonfirst |= int.from_bytes(frame[cur + 2 : cur + 4], "big") >> 3 != 0
        elif n < cur + 2:
            size = 1 << 30
        elif nh == 51:
            size = (frame[cur + 1] + 2) * 4
        else:
            size = (frame[cur + 1] + 1) * 8
        nh, cur, steps = nxt, cur + size, steps + 1
    if nonfirst:
        r["flags"] |= FLAG_FRAGMENT
    if known:
        r["proto"] = nh
        r["flags"] |= FLAG_PROTO
        if not nonfirst and nh in PORT_PROTOCOLS and n >= cur + 4:
            _ref_ports(frame, cur, r)


def _ref_ports(frame: bytes, at: int, r: dict) -> None:
    r["flags"] |= FLAG_PORTS
    r["sport"], r["dport"] = struct.unpack_from(">HH", frame, at)


def _pack(r: dict) -> bytes:
    return struct.pack(
        "<HHHBBBxHHxx16s16s", r["et"], r["v1"], r["v2"], r["ipver"], r["proto"], r["flags"],
        r["sport"], r["dport"], r["src"], r["dst"],
    )


# --------------------------------------------------------------------------------------------
# Frame construction


def ext(nh: int, body_len8: int = 0) -> bytes:
    """An IPv6 extension header (HBH, routing, dest-opts...) of (body_len8 + 1) * 8 bytes."""
    return struct.pack(">BB", nh, body_len8) + bytes(6 + 8 * body_len8)


def frag6(nh: int, offset: int, more: bool = False) -> bytes:
    return struct.pack(">BBHI", nh, 0, (offset << 3) | int(more), 0x1234)


def rows_of(frames: list[bytes], linktype: int = 1) -> np.ndarray:
    """The builder's flow rows for `frames`, in packet order."""
    data = pcap_bytes([(T0 + i, f) for i, f in enumerate(frames)], linktype=linktype)
    header = parse_global_header(data, "x")
    idx = index_records(data, header, scan_records(data, header))
    return flows_of_packets(idx)


def assert_like_reference(frames: list[bytes], linktype: int = 1) -> np.ndarray:
    rows = rows_of(frames, linktype)
    for i, frame in enumerate(frames):
        got, want = rows[i].tobytes(), ref_row(frame, linktype)
        if got != want:
            g = np.frombuffer(got, FLOW_DTYPE)[0]
            w = np.frombuffer(want, FLOW_DTYPE)[0]
            pytest.fail(f"frame {i} ({frame.hex()}): builder {g} != reference {w}")
    return rows


# --------------------------------------------------------------------------------------------
# Fabricated cases


def test_plain_ipv4_tcp_fields() -> None:
    frame = eth(0x0800, ipv4(6, ports(40000, 443), "10.1.2.3", "172.16.0.9"))
    (row,) = assert_like_reference([frame])
    assert row["ethertype"] == 0x0800 and row["ipver"] == 4 and row["proto"] == 6
    assert row["flags"] == FLAG_PROTO | FLAG_ADDRS | FLAG_PORTS
    assert (row["sport"], row["dport"]) == (40000, 443)
    assert row["src"].tobytes() == address_bytes("10.1.2.3")
    assert (row["dst"] == address_array("172.16.0.9")).all()
    assert row["vlan1"] == VLAN_ABSENT and row["vlan2"] == VLAN_ABSENT


@pytest.mark.parametrize("proto", [6, 17, 132, 136])
def test_port_protocols(proto: int) -> None:
    (row,) = assert_like_reference([eth(0x0800, ipv4(proto, ports(1, 2)))])
    assert row["flags"] & FLAG_PORTS and (row["sport"], row["dport"]) == (1, 2)


def test_icmp_and_gre_have_no_ports() -> None:
    rows = assert_like_reference(
        [eth(0x0800, ipv4(1, ports(8, 0))), eth(0x0800, ipv4(47, b"x" * 8))]
    )
    assert not (rows["flags"] & FLAG_PORTS).any()
    assert rows["proto"].tolist() == [1, 47]


def test_ipv4_fragments() -> None:
    first = eth(0x0800, ipv4(17, ports(53, 5353), frag=0x2000))  # MF, offset 0
    later = eth(0x0800, ipv4(17, ports(53, 5353), frag=0x0010))  # offset 16*8
    dont = eth(0x0800, ipv4(17, ports(53, 5353), frag=0x4000))  # DF only
    rows = assert_like_reference([first, later, dont])
    assert rows["flags"].tolist() == [
        FLAG_PROTO | FLAG_ADDRS | FLAG_PORTS,
        FLAG_PROTO | FLAG_ADDRS | FLAG_FRAGMENT,
        FLAG_PROTO | FLAG_ADDRS | FLAG_PORTS,
    ]
    assert rows["proto"].tolist() == [17, 17, 17]


def test_ipv4_options_move_the_ports() -> None:
    frame = eth(0x0800, ipv4(6, ports(7, 9), options=bytes(40)))  # IHL 15: past HEAD
    (row,) = assert_like_reference([frame])
    assert (row["sport"], row["dport"]) == (7, 9)


def test_vlan_qinq_and_more_tags() -> None:
    payload = ipv4(6, ports(1000, 80))
    frames = [
        eth(0x0800, payload, ((0x8100, 100),)),
        eth(0x0800, payload, ((0x88A8, 200), (0x8100, 0x1FFF))),  # PCP/DEI bits dropped
        eth(0x0800, payload, ((0x9100, 3), (0x9100, 4), (0x8100, 5))),
        eth(0x0800, payload, ((0x8100, 1),) * (MAX_VLAN_TAGS + 1)),  # more than we follow
    ]
    rows = assert_like_reference(frames)
    assert rows["vlan1"].tolist() == [100, 200, 3, 1]
    assert rows["vlan2"].tolist() == [VLAN_ABSENT, 0xFFF, 4, 1]
    assert rows["ethertype"].tolist() == [0x0800, 0x0800, 0x0800, 0x8100]
    assert rows["sport"].tolist() == [1000, 1000, 1000, 0]


def test_ipv6_extension_headers() -> None:
    tcp = ports(22, 50000)
    frames = [
        eth(0x86DD, ipv6(6, tcp)),
        eth(0x86DD, ipv6(0, ext(44) + frag6(6, 0, more=True) + tcp)),  # HBH + first frag
        eth(0x86DD, ipv6(0, ext(44) + frag6(6, 100) + tcp)),  # HBH + later fragment
        eth(0x86DD, ipv6(43, ext(60, 2) + ext(17, 1) + ports(53, 53))),  # routing, dest opts
        eth(0x86DD, ipv6(51, struct.pack(">BB", 17, 4) + bytes(22) + ports(500, 4500))),  # AH
        eth(0x86DD, ipv6(135, ext(59) + bytes(8))),  # mobility, then no next header
        eth(0x86DD, ipv6(50, bytes(30))),  # ESP: stop
        eth(0x86DD, ipv6(60, ext(60) * MAX_IPV6_EXTENSIONS + tcp)),  # too many: unknown
        eth(0x86DD, ipv6(58, bytes(8)), ((0x8100, 7), (0x8100, 8))),  # QinQ ICMPv6
    ]
    rows = assert_like_reference(frames)
    assert rows["proto"].tolist() == [6, 6, 6, 17, 17, 59, 50, 0, 58]
    assert rows["sport"].tolist() == [22, 22, 0, 53, 500, 0, 0, 0, 0]
    assert rows["flags"][2] & FLAG_FRAGMENT and not rows["flags"][1] & FLAG_FRAGMENT
    assert not rows["flags"][7] & FLAG_PROTO
    assert rows["src"][0].tobytes() == address_bytes("2001:db8::1")


def test_non_ip_and_tiny_frames() -> None:
    frames = [
        b"", b"\x01", MAC, MAC + b"\x08", MAC + b"\x08\x00",  # up to a bare ethertype
        eth(ETHERTYPE_ARP, bytes(28)), eth(0x0026, b"\x42\x42\x03" + bytes(40)),  # LLC/STP
        eth(0x8100, b""), eth(0x8100, b"\x00"),  # tag cut before / inside the TCI
        eth(0x8847, bytes(30)),  # MPLS is not looked through
    ]
    rows = assert_like_reference(frames)
    assert rows["ethertype"].tolist() == [0, 0, 0, 0, 0x0800, 0x0806, 0x0026, 0, 0, 0x8847]
    assert rows["vlan1"].tolist()[7:9] == [VLAN_UNREADABLE, VLAN_UNREADABLE]
    assert rows["ipver"].tolist()[4] == 4 and rows["flags"][4] == 0


@pytest.mark.parametrize(
    "frame",
    [
        eth(0x0800, ipv4(6, ports(1234, 80)), ((0x8100, 10),)),
        eth(0x86DD, ipv6(0, ext(44) + frag6(6, 0) + ports(1234, 80)), ((0x88A8, 1), (0x8100, 2))),
        eth(0x0800, ipv4(17, ports(53, 53), options=bytes(8))),
        eth(0x86DD, ipv6(51, struct.pack(">BB", 6, 1) + bytes(10) + ports(80, 81))),
    ],
    ids=["vlan-ipv4-tcp", "qinq-ipv6-hbh-frag-tcp", "ipv4-options-udp", "ipv6-ah-tcp"],
)
def test_truncated_at_every_length(frame: bytes) -> None:
    assert_like_reference([frame[:n] for n in range(len(frame) + 1)])


@pytest.mark.parametrize("linktype", [113, 276, 101, 228, 105, 147])
def test_other_link_types(linktype: int) -> None:
    l3 = [ipv4(6, ports(1, 2)), ipv6(17, ports(3, 4)), bytes(20)]
    if linktype == 113:
        frames = [bytes(14) + struct.pack(">H", et) + p
                  for et, p in zip((0x0800, 0x86DD, 0x0806), l3, strict=True)]
    elif linktype == 276:
        frames = [struct.pack(">H", et) + bytes(18) + p
                  for et, p in zip((0x0800, 0x86DD, 0x0806), l3, strict=True)]
    else:
        frames = l3
    rows = assert_like_reference(frames + [f[:n] for f in frames for n in (0, 5, 30)], linktype)
    if linktype in (105, 147):
        assert (rows["ethertype"] == 0).all() and (rows["ipver"] == 0).all()
    else:
        assert rows["sport"].tolist()[:2] == [1, 3]


@pytest.mark.parametrize("linktype", [1, 113, 276, 101, 229])
def test_other_link_types_all_ipv4_or_ipv6(linktype: int) -> None:
    """Batches of one protocol only take the whole-batch route of the parsers."""
    rng = np.random.default_rng(linktype)
    for version in (4, 6):
        l3 = [ipv4(int(rng.choice([6, 17, 1])), ports(i, 2 * i), src=f"10.0.{i % 256}.1")
              if version == 4 else ipv6(int(rng.choice([6, 17, 58])), ports(i, 3 * i))
              for i in range(300)]
        et = 0x0800 if version == 4 else 0x86DD
        frames = {1: [eth(et, p) for p in l3], 113: [bytes(14) + struct.pack(">H", et) + p
                                                     for p in l3],
                  276: [struct.pack(">H", et) + bytes(18) + p for p in l3]}.get(linktype, l3)
        frames = [f[: int(rng.integers(len(f) - 30, len(f) + 1))] for f in frames]
        rows = assert_like_reference(frames, linktype)
        assert (rows["ipver"] == version).all() and (rows["flags"] & FLAG_ADDRS != 0).sum() > 100


def random_frame(rng: np.random.Generator) -> bytes:
    """A frame of random but mostly well-formed structure, cut at a random length."""
    ntags = int(rng.choice([0, 0, 0, 1, 2, 3, 5]))
    tags = tuple((int(rng.choice([0x8100, 0x88A8, 0x9100])), int(rng.integers(0, 65536)))
                 for _ in range(ntags))
    kind = rng.choice(["v4", "v4", "v6", "v6", "arp", "random"])
    transport = ports(int(rng.integers(0, 65536)), int(rng.integers(0, 65536)),
                      int(rng.integers(0, 40)))
    proto = int(rng.choice([6, 17, 132, 136, 1, 58, 47, int(rng.integers(0, 256))]))
    if kind == "v4":
        frag = int(rng.choice([0, 0x2000, 0x4000, int(rng.integers(0, 65536))]))
        ihl_options = bytes(4 * int(rng.choice([0, 0, 1, 10])))
        body = bytearray(ipv4(proto, transport, frag=frag, options=ihl_options))
        if rng.random() < 0.05:
            body[0] = 0x40 | int(rng.integers(0, 16))  # malformed IHL
        frame = eth(0x0800, bytes(body), tags)
    elif kind == "v6":
        chain, nh = b"", proto
        for _ in range(int(rng.choice([0, 0, 1, 2, 3, 9]))):
            t = int(rng.choice([0, 43, 44, 51, 60, 135]))
            if t == 44:
                chain = frag6(nh, int(rng.choice([0, 0, 5])), bool(rng.random() < 0.5)) + chain
            elif t == 51:
                k = int(rng.integers(0, 4))
                chain = struct.pack(">BB", nh, k) + bytes(4 * (k + 2) - 2) + chain
            else:
                chain = ext(nh, int(rng.integers(0, 3))) + chain
            nh = t
        frame = eth(0x86DD, ipv6(nh, chain + transport), tags)
    elif kind == "arp":
        body = rng.integers(0, 256, 28, dtype=np.uint8).tobytes()
        frame = eth(int(rng.choice([ETHERTYPE_ARP, ETHERTYPE_RARP])), body, tags)
    else:
        frame = rng.integers(0, 256, int(rng.integers(0, 120)), dtype=np.uint8).tobytes()
    if rng.random() < 0.5:
        frame = frame[: int(rng.integers(0, len(frame) + 1))]
    return frame


def test_random_frames_match_reference() -> None:
    rng = np.random.default_rng(20251121)
    frames = [random_frame(rng) for _ in range(6000)]
    rows = assert_like_reference(frames)
    # the generator must really reach the interesting cases
    flags = rows["flags"]
    assert (flags & FLAG_FRAGMENT).sum() > 50 and (flags & FLAG_PORTS).sum() > 500
    assert (rows["vlan2"] != VLAN_ABSENT).sum() > 100 and (rows["ipver"] == 6).sum() > 1000


def plain_ipv4_frame(rng: np.random.Generator) -> bytes:
    """Untagged IPv4, sometimes fragmented, with a bad IHL or cut short."""
    proto = int(rng.choice([6, 17, 132, 136, 1, 47]))
    frag = int(rng.choice([0, 0, 0x2000, 0x4000, 0x0001, int(rng.integers(0, 65536))]))
    body = bytearray(ipv4(proto, ports(int(rng.integers(0, 65536)), int(rng.integers(0, 65536))),
                          src=f"10.{rng.integers(256)}.{rng.integers(256)}.1", frag=frag))
    if rng.random() < 0.05:
        body[0] = 0x40 | int(rng.integers(0, 16))
    frame = eth(0x0800, bytes(body))
    return frame[: int(rng.integers(0, len(frame) + 1))] if rng.random() < 0.3 else frame


@pytest.mark.parametrize("share", [0.8, 1.0, 0.3])
def test_mostly_ipv4_batches_match_reference(share: float) -> None:
    """Batches where IPv4 is (nearly) everything take other routes through the builder than
    the mixed ones above."""
    rng = np.random.default_rng(int(share * 10))
    frames = [plain_ipv4_frame(rng) if rng.random() < share else random_frame(rng)
              for _ in range(4000)]
    if share == 1.0:
        frames = [f if f[12:14] == b"\x08\x00" else eth(0x0800, b"") for f in frames]
    rows = assert_like_reference(frames)
    flags = rows["flags"]
    assert ((flags & FLAG_PORTS) != 0).sum() > 500 and ((flags & FLAG_FRAGMENT) != 0).sum() > 20


def test_many_chunks_and_blocks_give_the_same_index(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    frames = [random_frame(rng) for _ in range(3000)]
    data = pcap_bytes([(T0 + i, f) for i, f in enumerate(frames)])
    header = parse_global_header(data, "x")
    records = scan_records(data, header)
    whole = index_records(data, header, records)
    monkeypatch.setattr(builder, "CHUNK", 100)
    monkeypatch.setattr(builder.FlowTableBuilder, "BLOCK", 250)
    pieces = index_records(data, header, records)
    assert whole.flows.tobytes() == pieces.flows.tobytes()
    assert np.array_equal(whole.flow, pieces.flow)
    for name in ("flow_packets", "flow_bytes", "flow_first_ns", "flow_last_ns"):
        assert np.array_equal(getattr(whole, name), getattr(pieces, name)), name


def test_fast_path_equals_index_of_scanned_records() -> None:
    """index_pcap reads timestamps and lengths along with the frames; index_records takes them
    from scan_records: both must give the same index, torn tail included."""
    rng = np.random.default_rng(12)
    frames = [random_frame(rng) for _ in range(2500)]
    data = pcap_bytes([(T0 + 1000 * i, f, len(f) + i % 3) for i, f in enumerate(frames)])
    data = data[:-3]
    header = parse_global_header(data, "x")
    a = index_records(data, header, scan_records(data, header))
    b, loc = index_pcap(data, header)
    assert loc.torn and b.pcap_size == a.pcap_size == loc.complete_end
    assert a.flows.tobytes() == b.flows.tobytes()
    for name in ("count", "first_ns", "last_ns", "nanosecond", "linktype"):
        assert getattr(a, name) == getattr(b, name)
    for name in ("ts_ns", "offset", "caplen", "wirelen", "flow", "flow_packets"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_hash_collisions_do_not_merge_flows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a useless hash every row collides; flows must still come out exact."""
    rng = np.random.default_rng(8)
    frames = [random_frame(rng) for _ in range(800)]
    expected = assert_like_reference(frames)
    monkeypatch.setattr(builder, "hash_rows", lambda w: w[0] & np.uint64(3))
    rows = rows_of(frames)
    assert rows.tobytes() == expected.tobytes()


def test_hash_collision_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of different blocks with equal hashes must not be merged either."""
    frames = [eth(0x0800, ipv4(17, ports(1000 + i % 7, 53), src=f"10.0.{i // 50}.1"))
              for i in range(200)]
    expected = assert_like_reference(frames)
    monkeypatch.setattr(builder.FlowTableBuilder, "BLOCK", 50)
    monkeypatch.setattr(builder, "CHUNK", 50)
    # the hash sees only the ports: no collision within a block (one source address each),
    # collisions between blocks
    monkeypatch.setattr(builder, "hash_rows", lambda w: (w[1] >> np.uint64(16)) * np.uint64(3))
    rows = rows_of(frames)
    assert rows.tobytes() == expected.tobytes()


def test_flow_table_builder_against_numpy_unique() -> None:
    rng = np.random.default_rng(3)
    words = rng.integers(0, 4, (6, 5000)).astype(np.uint64) << np.uint64(40)
    table = builder.FlowTableBuilder()
    table.BLOCK = 700
    for lo in range(0, 5000, 300):
        table.add(words[:, lo : lo + 300])
    flows, counts, flow = table.finish()
    rows = flows.view(np.uint64).reshape(-1, 6)
    assert np.array_equal(rows[flow], words.T)
    unique = np.unique(words.T, axis=0)
    assert len(rows) == len(unique) and counts.sum() == 5000


def test_flow_table_is_sorted_distinct_with_counts() -> None:
    rng = np.random.default_rng(11)
    frames = [random_frame(rng) for _ in range(2000)]
    data = pcap_bytes([(T0 + i, f) for i, f in enumerate(frames)])
    header = parse_global_header(data, "x")
    idx = index_records(data, header, scan_records(data, header))
    flows = idx.flows
    names = ("ethertype", "vlan1", "vlan2", "ipver", "proto", "flags", "sport", "dport")
    keys = [tuple(int(r[k]) for k in names) + (r["src"].tobytes(), r["dst"].tobytes())
            for r in flows]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert idx.flow_packets.sum() == len(frames)
    assert np.array_equal(np.bincount(idx.flow, minlength=len(flows)), idx.flow_packets)
    assert idx.first_ns == T0 and idx.last_ns == T0 + len(frames) - 1
    assert idx.pcap_size == len(data)


def test_flow_totals_of_every_row() -> None:
    """Version 4's per-flow totals: wire bytes (not captured ones) and earliest and latest
    time of each row's packets, also when time steps back; the same over many chunks."""
    rng = np.random.default_rng(13)
    frames = [random_frame(rng) for _ in range(3000)]
    ts = T0 + np.cumsum(rng.integers(-40, 1000, len(frames)))
    data = pcap_bytes([(int(t), f, len(f) + i % 5) for i, (t, f) in enumerate(
        zip(ts, frames, strict=True))])
    header = parse_global_header(data, "x")
    idx = index_records(data, header, scan_records(data, header))
    assert (idx.ts_ns != np.sort(idx.ts_ns)).any()
    for f in range(len(idx.flows)):
        mine = idx.flow == f
        assert idx.flow_bytes[f] == idx.wirelen[mine].sum() > idx.caplen[mine].sum() - 1
        assert (idx.flow_first_ns[f], idx.flow_last_ns[f]) == (idx.ts_ns[mine].min(),
                                                             idx.ts_ns[mine].max())
    fast, _ = index_pcap(data, header)
    for name in ("flow_bytes", "flow_first_ns", "flow_last_ns"):
        assert np.array_equal(getattr(idx, name), getattr(fast, name)), name


def test_empty_pcap(tmp_path: Path) -> None:
    p = tmp_path / "e.pcap"
    p.write_bytes(pcap_bytes([]))
    idx = build_index(p)
    assert idx.count == 0 and len(idx.flows) == 0 and idx.first_ns == 0 and idx.last_ns == 0


def test_torn_pcap_indexes_complete_records(tmp_path: Path) -> None:
    frames = [eth(0x0800, ipv4(6, ports(i, 80))) for i in range(10)]
    data = pcap_bytes([(T0 + i, f) for i, f in enumerate(frames)])
    p = tmp_path / "t.pcap"
    p.write_bytes(data[:-5])
    idx = build_index(p)
    assert idx.count == 9 and idx.pcap_size == len(data) - 16 - len(frames[-1])


# --------------------------------------------------------------------------------------------
# Real-world corpus


@needs_corpus
def test_corpus_never_crashes_and_matches_reference() -> None:
    files = corpus_files()
    assert len(files) >= 200
    total = 0
    for path in files:
        idx = build_index(path)
        data = path.read_bytes()
        records = scan_records(data, parse_global_header(data, str(path)))
        assert idx.count == len(records), path
        rows = flows_of_packets(idx)
        for i, off in enumerate(records.offset.tolist()):
            frame = data[off + 16 : off + 16 + int(records.caplen[i])]
            assert rows[i].tobytes() == ref_row(frame, idx.linktype), (path, i)
        total += idx.count
    assert total > 2000


@needs_corpus
def test_corpus_truncated_and_corrupted_never_fails(tmp_path: Path) -> None:
    """Real captures cut short or with random bytes overwritten (lengths included): the
    builder indexes what it can, and the index it writes reads back and checks out."""
    from pcapvault.index.indexfile import index_problem, read_index, write_index

    rng = np.random.default_rng(2025)
    files = corpus_files()
    for path in [files[i] for i in rng.choice(len(files), 40, replace=False)]:
        data = bytearray(path.read_bytes())
        for trial in range(4):
            bad = bytearray(data[: int(rng.integers(24, len(data) + 1))])
            if trial % 2:
                for at in rng.integers(24, max(len(bad), 25), 1 + len(bad) // 200):
                    if at < len(bad):
                        bad[at] = int(rng.integers(0, 256))
            p = tmp_path / "x.pcap"
            p.write_bytes(bytes(bad))
            idx = build_index(p)
            assert idx.pcap_size <= len(bad)
            write_index(tmp_path / "x.idx", idx)
            back = read_index(tmp_path / "x.idx")
            assert index_problem(back) is None, path


@needs_corpus
def test_corpus_plain_ipv4_ports_and_addresses_equal_dpkt() -> None:
    compared = 0
    for path in corpus_files():
        idx = build_index(path)
        rows = flows_of_packets(idx)
        with open(path, "rb") as f:
            for i, (_, buf) in enumerate(dpkt.pcap.Reader(f)):
                row = rows[i]
                if row["vlan1"] != VLAN_ABSENT or row["ipver"] != 4:
                    continue
                try:
                    ip = dpkt.ethernet.Ethernet(buf).data
                except (dpkt.UnpackError, dpkt.NeedData):
                    continue
                if not isinstance(ip, dpkt.ip.IP):
                    continue
                assert row["flags"] & FLAG_ADDRS
                assert row["src"].tobytes()[12:] == ip.src and row["dst"].tobytes()[12:] == ip.dst
                assert row["proto"] == ip.p
                l4 = ip.data
                if isinstance(l4, dpkt.tcp.TCP | dpkt.udp.UDP) and not ip.offset:
                    assert row["flags"] & FLAG_PORTS, (path, i)
                    assert (row["sport"], row["dport"]) == (l4.sport, l4.dport), (path, i)
                    compared += 1
    assert compared > 500


# tcpdump as the oracle. Each filter comes with the index predicate that must hold for every
# packet tcpdump selects ("could match"), and optionally a "plain" condition under which the
# converse must hold too (untagged IPv4 with the needed fields captured).


def _proto(r: np.ndarray, p: int, ver: int | None = None) -> np.ndarray:
    ok = (r["flags"] & FLAG_PROTO != 0) & (r["proto"] == p) & (r["ipver"] != 0)
    return ok & (r["ipver"] == ver) if ver else ok


def _port(r: np.ndarray, p: int) -> np.ndarray:
    return (r["flags"] & FLAG_PORTS != 0) & ((r["sport"] == p) | (r["dport"] == p))


def _plain4(r: np.ndarray, need: int = FLAG_PROTO | FLAG_ADDRS) -> np.ndarray:
    return (r["vlan1"] == VLAN_ABSENT) & (r["ethertype"] == 0x0800) & (r["flags"] & need == need)


ORACLE = {
    "ip": (lambda r: r["ethertype"] == 0x0800, lambda r: _plain4(r, 0)),
    "ip6": (lambda r: r["ethertype"] == 0x86DD,
            lambda r: (r["vlan1"] == VLAN_ABSENT) & (r["ethertype"] == 0x86DD)),
    "arp": (lambda r: r["ethertype"] == ETHERTYPE_ARP,
            lambda r: r["vlan1"] == VLAN_ABSENT),
    "vlan": (lambda r: r["vlan1"] != VLAN_ABSENT, lambda r: np.ones(len(r), bool)),
    "tcp": (lambda r: _proto(r, 6), _plain4),
    "udp": (lambda r: _proto(r, 17), _plain4),
    "icmp": (lambda r: _proto(r, 1, 4), _plain4),
    "icmp6": (lambda r: _proto(r, 58, 6), None),
    "ip6 and tcp": (lambda r: _proto(r, 6, 6), None),
    "ip6 and udp": (lambda r: _proto(r, 17, 6), None),
    "ip proto 47": (lambda r: _proto(r, 47, 4), _plain4),
    "port 53": (lambda r: _port(r, 53), lambda r: _plain4(r, FLAG_PORTS)),
    "port 80 or port 443": (lambda r: _port(r, 80) | _port(r, 443),
                            lambda r: _plain4(r, FLAG_PORTS)),
    "udp port 500": (lambda r: _proto(r, 17) & _port(r, 500), lambda r: _plain4(r, FLAG_PORTS)),
    "vlan and ip": (lambda r: (r["vlan1"] != VLAN_ABSENT) & (r["ethertype"] == 0x0800), None),
    "vlan and ip6": (lambda r: (r["vlan1"] != VLAN_ABSENT) & (r["ethertype"] == 0x86DD), None),
    "ip[6:2] & 0x1fff != 0": (lambda r: (r["ethertype"] == 0x0800)
                              & (r["flags"] & FLAG_FRAGMENT != 0), None),
}


@needs_tcpdump
@pytest.mark.parametrize("expr", list(ORACLE))
def test_tcpdump_selection_is_within_index_prediction(
    combined: tuple[Path, np.ndarray], expr: str
) -> None:
    pcap, rows = combined
    could, plain = ORACLE[expr]
    selected = tcpdump_select(pcap, expr)
    predicted = could(rows)
    missed = selected[~predicted[selected]]
    assert len(missed) == 0, f"{expr}: index says no for records {missed[:10].tolist()}"
    if plain is not None:
        sure = np.flatnonzero(predicted & plain(rows))
        extra = np.setdiff1d(sure, selected)
        assert len(extra) == 0, f"{expr}: index says yes, tcpdump no: {extra[:10].tolist()}"
    # guard against a vacuous pass (the corpus holds no IPv6 TCP, no tagged IPv6)
    assert len(selected) > 0 or expr in ("ip6 and tcp", "vlan and ip6"), expr


@needs_tcpdump
def test_tcpdump_host_and_port_selections_equal_flow_rows(
    combined: tuple[Path, np.ndarray]
) -> None:
    """For untagged IPv4 TCP/UDP flows, 'src host A and dst host B and src port P and
    dst port Q' selects exactly the packets of that flow row."""
    pcap, rows = combined
    plain = _plain4(rows, FLAG_PROTO | FLAG_ADDRS | FLAG_PORTS) & (
        (rows["proto"] == 6) | (rows["proto"] == 17))
    keys = rows[plain][["src", "dst", "sport", "dport", "proto"]]
    _, first = np.unique(keys.view(np.dtype((np.void, keys.dtype.itemsize))), return_index=True)
    chosen = np.flatnonzero(plain)[np.sort(first)][:: max(len(first) // 12, 1)]
    assert len(chosen) >= 8
    for i in chosen:
        r = rows[i]
        src = ".".join(map(str, r["src"][12:]))
        dst = ".".join(map(str, r["dst"][12:]))
        name = {6: "tcp", 17: "udp"}[int(r["proto"])]
        expr = (f"ip and src host {src} and dst host {dst} and {name} src port {r['sport']} "
                f"and {name} dst port {r['dport']}")
        same = (
            plain & (rows["proto"] == r["proto"])
            & (rows["src"] == r["src"]).all(axis=1) & (rows["dst"] == r["dst"]).all(axis=1)
            & (rows["sport"] == r["sport"]) & (rows["dport"] == r["dport"])
        )
        selected = tcpdump_select(pcap, expr)
        assert np.array_equal(np.sort(selected), np.flatnonzero(same)), expr


@needs_tcpdump
def test_tcpdump_host_selection_is_within_index_prediction(
    combined: tuple[Path, np.ndarray]
) -> None:
    pcap, rows = combined
    with_addr = np.flatnonzero((rows["flags"] & FLAG_ADDRS != 0) & (rows["ipver"] == 4))
    for i in with_addr[:: max(len(with_addr) // 6, 1)][:6]:
        host = ".".join(map(str, rows[i]["src"][12:]))
        addr = address_array(host)
        could = (
            (rows["flags"] & FLAG_ADDRS != 0)
            & ((rows["src"] == addr).all(axis=1) | (rows["dst"] == addr).all(axis=1))
        ) | (  # an ARP frame cut before its target address may still match on its sender
            np.isin(rows["ethertype"], [ETHERTYPE_ARP, ETHERTYPE_RARP])
            & (rows["flags"] & FLAG_ADDRS == 0)
        )
        selected = tcpdump_select(pcap, f"host {host}")
        assert could[selected].all(), host
        assert i in selected


@needs_tcpdump
def test_tcpdump_arp_host_selection_equals_flow_rows(combined: tuple[Path, np.ndarray]) -> None:
    """`arp host X` selects exactly the untagged ARP rows recording X as sender or target
    (plus, at most, frames cut before their target address). RARP takes the same path in the
    builder; the reference test covers it on random frames (the corpus has one RARP frame)."""
    pcap, rows = combined
    ours = rows["ethertype"] == ETHERTYPE_ARP
    with_addr = ours & (rows["flags"] & FLAG_ADDRS != 0)
    hosts = {".".join(map(str, rows[i][f][12:]))
             for i in np.flatnonzero(with_addr & (rows["vlan1"] == VLAN_ABSENT))
             for f in ("src", "dst")}
    assert len(hosts) >= 4  # the corpus must exercise this
    for host in sorted(hosts)[:: max(len(hosts) // 8, 1)]:
        addr = address_array(host)
        hit = with_addr & ((rows["src"] == addr).all(axis=1) | (rows["dst"] == addr).all(axis=1))
        selected = tcpdump_select(pcap, f"arp host {host}")
        could = hit | (ours & (rows["flags"] & FLAG_ADDRS == 0))
        assert could[selected].all(), host
        sure = np.flatnonzero(hit & (rows["vlan1"] == VLAN_ABSENT))
        assert np.isin(sure, selected).all(), host
        assert len(selected) > 0, host
