"""Shared fixtures for the extraction tests: dump sets built the way the recorder builds them,
realistic synthetic traffic, and tcpdump as the oracle."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from pcapvault.extract import engine
from pcapvault.extract.flowplan import Source, Stats
from pcapvault.extract.output import Interface, Output
from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.pcapfile import global_header, record_header
from pcapvault.recorder.indexer import index_and_link

CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus/tcpdump-tests"
NS = 1_000_000_000

Packet = tuple[int, bytes, int]  # ts_ns, captured bytes, wire length


def write_pcap(path: Path, packets: list[Packet], linktype: int = 1, nanosecond: bool = True,
               snaplen: int = 262144) -> None:
    with open(path, "wb") as f:
        f.write(global_header(linktype, snaplen, nanosecond))
        for ts, data, wire in packets:
            f.write(record_header(ts, len(data), wire, nanosecond))
            f.write(data)


def build_dumpset(root: Path, packets: list[Packet], *, linktype: int = 1,
                  nanosecond: bool = True, snaplen: int = 262144, per_file: int = 200,
                  interface: str = "eth0") -> DumpSet:
    """A dump set as the recorder leaves it: files closed at slot boundaries or every
    `per_file` packets, each indexed and linked into the timeline."""
    ds = DumpSet.create(root, interface=interface, linktype=linktype, snaplen=snaplen,
                        nanosecond=nanosecond)
    group: list[Packet] = []

    def flush() -> None:
        if not group:
            return
        tmp = ds.temp_path(len(os.listdir(ds.root)))
        write_pcap(tmp, group, linktype, nanosecond, snaplen)
        sf = ds.place(tmp, group[0][0] if nanosecond else group[0][0] // 1000 * 1000)
        index_and_link(ds, sf)
        group.clear()

    for p in packets:
        if group and (
            len(group) >= per_file
            or timeline.slot_of(p[0] // NS) != timeline.slot_of(group[0][0] // NS)
        ):
            flush()
        group.append(p)
    flush()
    return ds


def engine_extract(roots: list[Path], expr: str, q: engine.Query,
                   make: Callable[[list[Interface]], Output]) -> Output:
    """The engine over these dump sets into the output `make` builds for their interfaces,
    closed afterwards (what npcapextract and the service do, without their front ends)."""
    sources = [Source(str(r), i, expr) for i, r in enumerate(roots)]
    ifaces = [Interface(s.interface, s.linktype, s.snaplen, s.nanosecond) for s in sources]
    out = make(ifaces)
    try:
        engine.extract(sources, q, out, Stats(), lambda m: None)
    finally:
        out.close()
    return out


def read_pcap_records(data: bytes) -> list[tuple[int, int, bytes]]:
    """(ts_ns, wirelen, bytes) of every record of a classic little-endian pcap."""
    magic = struct.unpack_from("<I", data)[0]
    assert magic in (0xA1B2C3D4, 0xA1B23C4D), hex(magic)
    mult = 1 if magic == 0xA1B23C4D else 1000
    out = []
    o = 24
    while o + 16 <= len(data):
        sec, frac, cap, wire = struct.unpack_from("<IIII", data, o)
        out.append((sec * NS + frac * mult, wire, data[o + 16 : o + 16 + cap]))
        o += 16 + cap
    assert o == len(data)
    return out


def tcpdump_select(files: list[Path], expr: str) -> list[tuple[int, int, bytes]]:
    """What `tcpdump -r FILE -w - FILTER` selects from each file, concatenated."""
    out = []
    for f in files:
        r = subprocess.run(["tcpdump", "--time-stamp-precision=nano", "-r", str(f), "-w", "-",
                            expr], capture_output=True, check=True)
        out += read_pcap_records(r.stdout)
    return out


# --- synthetic traffic -------------------------------------------------------------------


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ether(dst: bytes, src: bytes, etype: int, payload: bytes, vlans: tuple[int, ...] = ()) -> bytes:
    tags = b"".join(struct.pack("!HH", 0x8100 if i else (0x88A8 if len(vlans) > 1 else 0x8100),
                                v) for i, v in enumerate(vlans))
    return dst + src + tags + struct.pack("!H", etype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ttl: int = 64, frag: int = 0,
         options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 1, frag, ttl,
                      proto, 0, bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    hdr += options
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    import ipaddress

    return struct.pack("!IHBB", 0x60000000, len(payload), nh, 64) + \
        ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + payload


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 0x50, flags, 65535, 0, 0) + payload


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def synthetic_traffic(n: int, start_ns: int, seed: int = 7, span_s: float = 3600.0
                      ) -> list[Packet]:
    """Mixed traffic: IPv4 TCP/UDP/ICMP among many hosts, DNS, ARP, IPv6, VLAN and QinQ
    tagged frames, IP options, fragments, truncated (sliced) packets; timestamps increasing."""
    rnd = random.Random(seed)
    hosts = [f"10.{a}.{b}.{c}" for a in (0, 1) for b in range(4) for c in range(1, 9)]
    hosts += ["192.168.1.1", "192.168.1.2", "172.16.0.5", "8.8.8.8"]
    hosts6 = ["2001:db8::1", "2001:db8::2", "fe80::1", "2001:db8:1::7"]
    macs = [bytes([0, 0x16, 0x3E, 0, i, j]) for i in range(4) for j in range(4)]
    out: list[Packet] = []
    ts = start_ns
    step = int(span_s * NS / n)
    for _ in range(n):
        ts += rnd.randint(1, 2 * step)
        k = rnd.random()
        src, dst = rnd.sample(hosts, 2)
        smac, dmac = rnd.sample(macs, 2)
        vl: tuple[int, ...] = ()
        if k < 0.45:
            flags = rnd.choice([0x02, 0x12, 0x10, 0x18, 0x11, 0x04])
            pay = os.urandom(rnd.choice([0, 0, 20, 100, 500, 1400]))
            sp = rnd.choice([80, 443, 22, 8080, rnd.randint(1024, 65535)])
            l4 = tcp(rnd.randint(1024, 65535), sp, flags, pay)
            if rnd.random() < 0.5:
                l4 = tcp(sp, rnd.randint(1024, 65535), flags, pay)
            pkt = ether(dmac, smac, 0x0800, ipv4(src, dst, 6, l4, ttl=rnd.choice([64, 128, 255])))
        elif k < 0.60:
            dport = rnd.choice([53, 123, 161, 5353, rnd.randint(1024, 65535)])
            pkt = ether(dmac, smac, 0x0800,
                        ipv4(src, dst, 17, udp(rnd.randint(1024, 65535), dport, os.urandom(40))))
        elif k < 0.65:
            pkt = ether(dmac, smac, 0x0800, ipv4(src, dst, 1, b"\x08\0\0\0\0\1\0\1" + bytes(48)))
        elif k < 0.70:
            arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, smac,
                              bytes(map(int, src.split("."))), bytes(6),
                              bytes(map(int, dst.split("."))))
            pkt = ether(b"\xff" * 6, smac, 0x0806, arp)
        elif k < 0.80:
            s6, d6 = rnd.sample(hosts6, 2)
            if rnd.random() < 0.5:
                pl = ipv6(s6, d6, 6, tcp(rnd.randint(1024, 65535), rnd.choice([80, 443]), 0x18,
                                         os.urandom(30)))
            elif rnd.random() < 0.5:
                pl = ipv6(s6, d6, 17, udp(5353, rnd.choice([53, 5353]), os.urandom(20)))
            else:
                # hop-by-hop options header before UDP
                hbh = struct.pack("!BB", 17, 0) + b"\x01\x04\0\0\0\0"
                pl = ipv6(s6, d6, 0, hbh + udp(1000, 53, os.urandom(12)))
            pkt = ether(dmac, smac, 0x86DD, pl)
        elif k < 0.90:
            vl = (rnd.choice([100, 200, 300]),)
            if rnd.random() < 0.3:
                vl = (10, rnd.choice([100, 200]))
            l4 = tcp(rnd.randint(1024, 65535), rnd.choice([80, 25]), 0x10, os.urandom(60))
            pkt = ether(dmac, smac, 0x0800, ipv4(src, dst, 6, l4), vl)
        elif k < 0.94:
            # IP options (IHL 6) and fragments
            if rnd.random() < 0.5:
                pkt = ether(dmac, smac, 0x0800, ipv4(src, dst, 6, tcp(1234, 80, 0x18, b"x" * 50),
                                                     options=b"\x94\x04\0\0"))
            else:
                pkt = ether(dmac, smac, 0x0800, ipv4(src, dst, 17, os.urandom(64),
                                                     frag=rnd.choice([0x2000, 0x0010, 0x0020])))
        else:
            pkt = ether(dmac, smac, rnd.choice([0x88CC, 0x8863, 0x0026]), os.urandom(46))
        wire = len(pkt)
        if rnd.random() < 0.05:
            pkt = pkt[: rnd.choice([10, 14, 20, 30, 40, 54])]  # sliced by a small snaplen
        out.append((ts, pkt, wire))
    return out


def epoch(ns: int) -> str:
    """A nanosecond timestamp as the epoch-seconds text npcapextract's -b/-e accept."""
    return f"{ns // NS}.{ns % NS:09d}"


def tcpdump_window(files: list[Path], expr: str, begin: int, end: int) -> list:
    """The oracle: tcpdump's selection over `files`, restricted to [begin, end)."""
    return [p for p in tcpdump_select(files, expr) if begin <= p[0] < end]


SYNTH_START = 1763737200 * NS + 123_456_789  # 2025-11-21 15:00:00.123456789 UTC, a slot start


def synthetic_dumpset(root: Path) -> tuple[Path, list[Path]]:
    """30 minutes of synthetic traffic from SYNTH_START (three 10-minute slots, files also
    closed every 300 packets): the dump set and its pcaps."""
    ds = build_dumpset(root, synthetic_traffic(2400, SYNTH_START, seed=11, span_s=1800),
                       per_file=300)
    return root, [sf.pcap for sf in ds.files()]


def corpus_dumpset(root: Path, ethernet_only: bool = False) -> tuple[Path, list[Path]]:
    """tcpdump's test corpus replayed from SYNTH_START (corpus_packets): the dump set and its
    pcaps; the test is skipped where the corpus is missing."""
    import pytest

    if not CORPUS.is_dir():
        pytest.skip(f"tcpdump test corpus not found at {CORPUS}")
    ds = build_dumpset(root, corpus_packets(SYNTH_START, ethernet_only), per_file=160)
    return root, [sf.pcap for sf in ds.files()]


def corpus_packets(start_ns: int, ethernet_only: bool = False) -> list[Packet]:
    """tcpdump's test captures, one after the other, one packet every 0.25 s from
    `start_ns` (so that they span several timeline slots); the broken ones are skipped."""
    from pcapvault.index.pcapfile import PcapReader

    packets: list[Packet] = []
    ts = start_ns
    for f in sorted(CORPUS.glob("*.pcap")):
        try:
            with PcapReader(f) as r:
                if ethernet_only and r.header.linktype != 1:
                    continue
                t = r.scan()
                arr = r.array()
                for o, c, w in zip(t.offset.tolist(), t.caplen.tolist(), t.wirelen.tolist(),
                                   strict=True):
                    ts += 250_000_000
                    packets.append((ts, bytes(arr[o + 16 : o + 16 + c]), w))
                del arr
        except Exception:  # noqa: BLE001 - the corpus holds deliberately broken files
            continue
    return packets


def records(pcap: Path) -> list[int]:
    """Offsets of the pcap's records."""
    data = pcap.read_bytes()
    out, o = [], 24
    while o + 16 <= len(data):
        out.append(o)
        o += 16 + struct.unpack_from("<I", data, o + 8)[0]
    return out


def flip_caplen(pcap: Path, k: int) -> tuple[int, tuple[int, int, bytes]]:
    """Flip one bit of record k's captured length (the file keeps its size): its offset and
    the packet as the oracle reads it."""
    at = records(pcap)[k]
    pkt = read_pcap_records(pcap.read_bytes())[k]
    with open(pcap, "r+b") as f:
        f.seek(at + 8)
        cap = struct.unpack("<I", f.read(4))[0]
        f.seek(at + 8)
        f.write(struct.pack("<I", cap ^ 0x400))
    return at, pkt
