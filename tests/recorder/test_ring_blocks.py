"""recorder/ring.py: TPACKET_V3 blocks into pcap records, on blocks built here byte by byte
the way the kernel lays them out, and on a real AF_PACKET ring over a veth pair."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
import time

from pcapvault.index.pcapfile import pcap_bytes
from pcapvault.recorder import ring
from pcapvault.recorder.ring import BLOCK_SIZE, PacketRing, block_to_records

# The kernel's layout for TPACKET_V3 on Ethernet: a 48-byte block descriptor, then per packet
# a 48-byte tpacket3_hdr and a sockaddr_ll, the frame at tp_mac = 82 so that the network
# header (tp_net = 96) is 16-aligned; the next header at the next 16-byte boundary.
FIRST, MAC = 48, 82
VLAN_VALID, TPID_VALID = 1 << 4, 1 << 6
SNAPLEN = 1536


def frame(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return bytes(rnd.getrandbits(8) for _ in range(n))


def build_block(packets: list[dict], *, mac: int = MAC) -> mmap.mmap:
    """One retired block holding `packets` (dicts: data, sec, nsec, wire, status, tci, tpid)."""
    m = mmap.mmap(-1, BLOCK_SIZE)
    off = end = FIRST
    for i, p in enumerate(packets):
        data = p["data"]
        nxt = 0 if i == len(packets) - 1 else (mac + len(data) + 15) & ~15
        struct.pack_into("<IIIIIIHHIIH", m, off, nxt, p["sec"], p["nsec"], len(data),
                         p.get("wire", len(data)), p.get("status", 1), mac, mac + 14, 0,
                         p.get("tci", 0), p.get("tpid", 0))
        m[off + mac : off + mac + len(data)] = data
        end = off + mac + len(data)
        off += nxt
    # version 3, no private area, TP_STATUS_USER (retired), num_pkts, first packet, length
    struct.pack_into("<IIIIII", m, 0, 3, 0, 1, len(packets), FIRST, end)
    return m


def expected(packets: list[dict], snaplen: int = SNAPLEN, usec: bool = False) -> bytes:
    """What libpcap writes for them: tags the kernel took out put back, cut to the snaplen."""
    out = b""
    for p in packets:
        data, wire = p["data"], p.get("wire", len(p["data"]))
        if p.get("status", 0) & VLAN_VALID and len(data) >= 12:
            tpid = p.get("tpid", 0) if p["status"] & TPID_VALID and p.get("tpid") else 0x8100
            data = (data[:12] + struct.pack("!HH", tpid, p.get("tci", 0)) + data[12:])[:snaplen]
            wire += 4
        frac = p["nsec"] // 1000 if usec else p["nsec"]
        out += struct.pack("<IIII", p["sec"], frac, len(data), wire) + data
    return out


def convert(m: mmap.mmap, n: int, usec: bool = False, snaplen: int = SNAPLEN):
    recs = block_to_records(m, n, FIRST, snaplen, usec)
    return bytes(recs.data), recs.ends.tolist(), recs.secs.tolist()


def both_paths(m: mmap.mmap, n: int, usec: bool = False, snaplen: int = SNAPLEN):
    """The per-block and the per-packet conversion, which must agree byte for byte."""
    import numpy as np

    vec = ring._vector_records(np.frombuffer(m, np.uint8, count=BLOCK_SIZE), FIRST, n,
                               snaplen, usec)
    vec_bytes = None if vec is None else bytes(vec.data)
    slow = ring._python_records(m, n, FIRST, snaplen, usec)
    return vec_bytes, bytes(slow.data)


def packets_of(sizes: list[int], **kw) -> list[dict]:
    return [dict(data=frame(n, i), sec=1_763_737_200 + i, nsec=123_456_789 + i, **kw)
            for i, n in enumerate(sizes)]


def check(packets: list[dict], usec: bool = False, snaplen: int = SNAPLEN,
          vector: bool = True) -> None:
    m = build_block(packets)
    want = expected(packets, snaplen, usec)
    data, ends, secs = convert(m, len(packets), usec, snaplen)
    assert data == want
    assert secs == [p["sec"] for p in packets]
    assert ends[-1] == len(want)
    pos = 0
    for e in ends:  # every end is the end of one record
        caplen = struct.unpack_from("<I", want, pos + 8)[0]
        assert e == pos + 16 + caplen
        pos = e
    vec, slow = both_paths(m, len(packets), usec, snaplen)
    assert slow == want
    assert (vec == want) if vector else vec is None


def test_equal_sized_packets():
    check(packets_of([60] * 500))


def test_mixed_sizes():
    check(packets_of([60, 1514, 61, 62, 63, 64, 200, 9000 - 100, 14, 1, 777] * 20))


def test_microsecond_timestamps():
    check(packets_of([60, 100, 1514] * 10), usec=True)


def test_a_single_packet():
    check(packets_of([1514]))


def test_vlan_tags_are_put_back():
    ps = packets_of([60, 100, 1514, 1536, 64, 11])
    ps[0].update(status=1 | VLAN_VALID, tci=0x0123)                            # 802.1Q
    ps[1].update(status=1 | VLAN_VALID | TPID_VALID, tci=0xE00A, tpid=0x88A8)  # 802.1ad
    ps[2].update(status=1 | VLAN_VALID | TPID_VALID, tci=7, tpid=0)            # no TPID given
    ps[3].update(status=1 | VLAN_VALID, tci=5)                                 # cut at snaplen
    ps[5].update(status=1 | VLAN_VALID, tci=5)                 # under 12 bytes: left alone
    check(ps)
    check(ps, usec=True)


def test_payload_that_looks_like_a_header_takes_the_per_packet_path():
    """The per-block path finds headers by their (tp_mac, tp_net) words; a frame holding the
    same word at a header-aligned place must not be mistaken for one."""
    ps = packets_of([200, 300, 64])
    fake = bytearray(ps[0]["data"])
    word = struct.pack("<HH", MAC, MAC + 14)
    # Header starts are 8-aligned in the block; frame byte k sits at FIRST + MAC + k.
    k = next(k for k in range(len(fake) - 4) if (FIRST + MAC + k - 24) % 8 == 0 and k > 20)
    fake[k : k + 4] = word
    ps[0]["data"] = bytes(fake)
    check(ps, vector=False)


def test_a_block_not_laid_out_as_expected_is_still_converted():
    """A different tp_mac (another link layer header size) is walked per packet."""
    ps = packets_of([60, 70])
    m = build_block(ps, mac=MAC + 16)
    assert convert(m, 2)[0] == expected(ps)


# --- a real ring -----------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def open_ring_in(ns: str, ifname: str) -> PacketRing:
    """A PacketRing whose socket lives in network namespace `ns` (this thread goes back)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{ns}")
        try:
            r = PacketRing(ifname, buffer_mb=4, promisc=False)
            r.start()
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(home)
    return r


def test_real_ring_delivers_what_crossed_the_wire(veth, tmp_path):
    sizes = [60, 1514, 64, 9000, 61, 128] * 50
    eth = bytes.fromhex("020000000002020000000001 0800")
    frames = [eth + frame(n - 14, i) for i, n in enumerate(sizes)]
    src = tmp_path / "in.pcap"
    src.write_bytes(pcap_bytes((i * 1000, f) for i, f in enumerate(frames)))
    r = open_ring_in(veth.rx_ns, veth.rx)
    try:
        sent = veth.send([src])
        got: list[bytes] = []

        def on_block(m, base, num, first):
            recs = block_to_records(m, num, first, 65535, False)
            data, start = bytes(recs.data), 0
            for end in recs.ends.tolist():
                caplen, wire = struct.unpack_from("<II", data, start + 8)
                assert caplen == wire  # nothing cut at snaplen 65535
                got.append(data[start + 16 : end])
                start = end

        deadline = time.monotonic() + 5
        while len(got) < len(sent) and time.monotonic() < deadline:
            if r.wait(100):
                r.read_block(on_block)
        stats = r.read_stats()
    finally:
        r.close()
    assert sent == frames
    assert got == sent
    assert stats.received == len(sent) and stats.dropped == 0
