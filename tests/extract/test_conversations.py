"""Conversations, endpoints, ports and volume from the indexes (extract/conversations.py),
held to tshark's Conversations and Endpoints tables over the packets npcapextract writes for
the same window and filter, and shown to read no pcap byte when the index decides the filter."""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    NS,
    SYNTH_START,
    build_dumpset,
    corpus_dumpset,
    epoch,
    ether,
    ipv4,
    ipv6,
    read_pcap_records,
    synthetic_traffic,
    tcp,
    udp,
)
from indexes import as_version, with_crc

from pcapvault.extract import conversations as conv
from pcapvault.extract.conversations import TableError, conversations, volume
from pcapvault.extract.request import Request
from pcapvault.index.dumpset import DumpSet, DumpSetError
from pcapvault.index.libpcap import FilterError
from pcapvault.index.postings import parse_header
from pcapvault.index.times import TimeError

EXE = [sys.executable, "-m", "pcapvault.extract.cli"]
# A window that starts and ends inside files and cuts the long conversations.
B = SYNTH_START + 170 * NS + 1
E = SYNTH_START + 1410 * NS + 7


def long_flows(start_ns: int, n: int, seed: int) -> list:
    """A few conversations that last the whole half hour, both ways (TCP over IPv4 and
    IPv6, UDP, one tagged with VLANs that change), for windows that cut them. No SYN in the
    middle of one: Wireshark would start a new conversation on the same ports there."""
    rnd = random.Random(seed)
    m1, m2 = bytes.fromhex("00163e000001"), bytes.fromhex("00163e000002")
    talks = [
        lambda fwd, k: ether(m1, m2, 0x0800, ipv4(*(("10.9.0.1", "10.9.0.2") if fwd else (
            "10.9.0.2", "10.9.0.1")), 6, tcp(*((40000, 443) if fwd else (443, 40000)), 0x18,
                                            bytes(k)))),
        lambda fwd, k: ether(m1, m2, 0x86DD, ipv6(*(("2001:db8::a", "2001:db8::b") if fwd else (
            "2001:db8::b", "2001:db8::a")), 6, tcp(*((50000, 22) if fwd else (22, 50000)), 0x10,
                                                   bytes(k)))),
        lambda fwd, k: ether(m1, m2, 0x0800, ipv4(*(("10.9.0.3", "10.9.0.1") if fwd else (
            "10.9.0.1", "10.9.0.3")), 17, udp(*((5353, 53) if fwd else (53, 5353)), bytes(k)))),
        lambda fwd, k: ether(m1, m2, 0x0800, ipv4(*(("10.9.0.4", "10.9.0.5") if fwd else (
            "10.9.0.5", "10.9.0.4")), 6, tcp(*((41000, 80) if fwd else (80, 41000)),
                                             0x10, bytes(k))),
                             vlans=(100,) if k % 2 else (200,)),
    ]
    out = []
    for _ in range(n):
        ts = start_ns + rnd.randint(0, 1800 * NS)
        pkt = rnd.choice(talks)(rnd.random() < 0.6, rnd.randint(0, 900))
        out.append((ts, pkt, len(pkt)))
    return out


def traffic(seed: int, whole: bool) -> list:
    """The extraction tests' synthetic mix plus long conversations, in time order; `whole`
    drops the frames a small snaplen cut (tshark cannot dissect their headers)."""
    pk = synthetic_traffic(1500, SYNTH_START, seed=seed, span_s=1800) + long_flows(
        SYNTH_START, 600, seed)
    pk.sort(key=lambda p: p[0])
    return [p for p in pk if len(p[1]) == p[2]] if whole else pk


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("conv")
    a = build_dumpset(base / "a", traffic(5, True), per_file=250, interface="eth0")
    b = build_dumpset(base / "b", traffic(6, True), per_file=300, interface="eth1")
    return a.root, b.root


def extracted(roots: list[Path], expr: str, b: int, e: int, out: Path) -> list:
    """What npcapextract writes for the window and filter (the oracle's input)."""
    args = [x for r in roots for x in ("-t", str(r))]
    r = subprocess.run([*EXE, *args, "-b", epoch(b), "-e", epoch(e), "-f", expr, "-0",
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode in (0, 1, 3), r.stderr  # 3: damaged files skipped, said so
    return read_pcap_records(out.read_bytes())


def tshark(pcap: Path, table: str) -> str:
    r = subprocess.run(["tshark", "-n", "-o", "ip.defragment:FALSE", "-r", str(pcap), "-q",
                        "-z", table], capture_output=True, text=True, check=True)
    return r.stdout


UNITS = {"bytes": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}
CONV = re.compile(r"^(\S+)\s+<->\s+(\S+)\s+(\d+)\s+(\d+) (\w+)\s+(\d+)\s+(\d+) (\w+)\s+"
                  r"(\d+)\s+(\d+) (\w+)\s+([\d.]+)\s+([\d.]+)\s*$")


def split_port(text: str) -> tuple[str, int]:
    addr, port = text.rsplit(":", 1)
    return addr, int(port)


def same_bytes(ours: int, shown: str, unit: str) -> bool:
    """tshark prints bytes exactly below 10,000 and rounded to a unit above."""
    return ours == int(shown) if unit == "bytes" else abs(ours / UNITS[unit] - int(shown)) <= 1


def check_conversations(rows: list[dict], text: str, protocol: str, first_ns: int) -> None:
    """Our rows of `protocol` (those with ports) equal tshark's conv table, row for row:
    the same A and B, frames each way, bytes, relative start and duration."""
    theirs = [CONV.match(line) for line in text.splitlines() if "<->" in line]
    assert all(theirs)
    ours = {(r["address_a"], r["port_a"], r["address_b"], r["port_b"]): r for r in rows
            if r["protocol"] == protocol and r["port_a"] is not None}
    assert len(ours) == len(theirs)
    for m in theirs:
        a, b = split_port(m[1]), split_port(m[2])
        r = ours[(*a, *b)]
        assert (r["packets_b_to_a"], r["packets_a_to_b"], r["packets"]) == (
            int(m[3]), int(m[6]), int(m[9])), (m[0], r)
        assert same_bytes(r["bytes_b_to_a"], m[4], m[5]), (m[0], r)
        assert same_bytes(r["bytes_a_to_b"], m[7], m[8]), (m[0], r)
        assert same_bytes(r["bytes"], m[10], m[11]), (m[0], r)
        assert f"{(r['start_ns'] - first_ns) / 1e9:.9f}" == m[12]
        assert abs(r["duration_s"] - float(m[13])) <= 0.00006


def check_endpoints(rows: list[dict], text: str, v6: bool) -> None:
    theirs = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 7 and f[1].isdigit():
            theirs[f[0]] = tuple(map(int, f[1:]))
    ours = {r["address"]: (r["packets"], r["bytes"], r["tx_packets"], r["tx_bytes"],
                           r["rx_packets"], r["rx_bytes"])
            for r in rows if (":" in r["address"]) == v6}
    assert ours == theirs


def request(roots: list[Path], expr: str, b: int = B, e: int = E) -> Request:
    return Request([str(r) for r in roots], b, e, expr)


@pytest.mark.parametrize("expr,reads", [
    ("", False),
    ("ip and (tcp or udp)", False),
    ("host 10.9.0.1 or net 2001:db8::/64", False),
    ("vlan", False),
    # libpcap's tcp/udp for IPv6 looks at the first next header only: the index, which walks
    # extension headers, cannot decide an IPv6 row, so its candidates are read
    ("tcp or udp", True),
    ("tcp[13] & 2 = 0", True),  # TCP flags: the index cannot decide, candidates are read
])
def test_tables_equal_tshark_over_the_extraction(sets, tmp_path, expr, reads):
    a, _ = sets
    pcap = tmp_path / "x.pcap"
    packets = extracted([a], expr, B, E, pcap)
    assert len(packets) > 100
    req = request([a], expr)
    conv = conversations(req, "conversation")
    assert conv.read_packets == reads
    assert (conv.packets, conv.bytes) == (len(packets), sum(p[1] for p in packets))
    first = packets[0][0]
    check_conversations(conv.rows, tshark(pcap, "conv,tcp"), "tcp", first)
    check_conversations(conv.rows, tshark(pcap, "conv,udp"), "udp", first)
    assert any(r["packets_a_to_b"] and r["packets_b_to_a"] for r in conv.rows)
    ends = conversations(req, "endpoint")
    check_endpoints(ends.rows, tshark(pcap, "endpoints,ip"), False)
    check_endpoints(ends.rows, tshark(pcap, "endpoints,ipv6"), True)
    assert (ends.packets, ends.bytes, ends.read_packets) == (conv.packets, conv.bytes, reads)


def test_two_dump_sets_are_summed(sets, tmp_path):
    """A conversation seen on two interfaces counts on both, as over a merged capture."""
    pcap = tmp_path / "both.pcap"
    packets = extracted(list(sets), "tcp", B, E, pcap)
    conv = conversations(request(list(sets), "tcp"))
    assert (conv.packets, conv.bytes) == (len(packets), sum(p[1] for p in packets))
    check_conversations(conv.rows, tshark(pcap, "conv,tcp"), "tcp", packets[0][0])
    ends = conversations(request(list(sets), "tcp"), "endpoint")
    check_endpoints(ends.rows, tshark(pcap, "endpoints,ip"), False)
    one = [conversations(request([r], "tcp")).rows for r in sets]

    def key(r: dict) -> frozenset:  # A and B may swap: A sent the first packet seen
        return frozenset([(r["address_a"], r["port_a"]), (r["address_b"], r["port_b"])])

    both = {key(r): r["packets"] for r in conv.rows}
    summed: dict = {}
    for rows in one:
        for r in rows:
            summed[key(r)] = summed.get(key(r), 0) + r["packets"]
    assert both == summed


def test_ports_sort_and_limit(sets):
    a, _ = sets
    req = request([a], "")
    conv = conversations(req)
    ports = conversations(req, "port")
    # every conversation with ports counts once, under its lower port
    ported = [r for r in conv.rows if r["port_a"] is not None]
    assert sum(r["conversations"] for r in ports.rows) == len(ported)
    assert sum(r["packets"] for r in ports.rows) == sum(r["packets"] for r in ported)
    want: dict = {}
    for r in ported:
        k = (r["protocol"], min(r["port_a"], r["port_b"]))
        want[k] = want.get(k, 0) + r["bytes"]
    assert {(r["protocol"], r["port"]): r["bytes"] for r in ports.rows} == want
    https = next(r for r in ports.rows if (r["protocol"], r["port"]) == ("tcp", 443))
    assert https["conversations"] >= 2  # the long IPv4 one and short ones
    for by in ("conversation", "endpoint", "port"):
        for sort in ("bytes", "packets"):
            full = conversations(req, by, sort)
            values = [r[sort] for r in full.rows]
            assert values == sorted(values, reverse=True) and full.total_rows == len(values)
            top = conversations(req, by, sort, limit=5)
            assert top.rows == full.rows[:5] and top.total_rows == full.total_rows
            assert conversations(req, by, sort, limit=0).rows == []


def binned(packets: list, step: int, steps: int, begin: int = B
           ) -> tuple[list[int], list[int]]:
    """Packets and wire bytes per step from `begin`, counted one extracted packet at a time."""
    count, wire = np.zeros(steps, int), np.zeros(steps, int)
    for ts, length, _ in packets:
        count[(ts - begin) // step] += 1
        wire[(ts - begin) // step] += length
    return count.tolist(), wire.tolist()


@pytest.mark.parametrize("expr,reads", [("", False), ("ip and udp", False), ("udp", True),
                                        ("tcp[13] & 2 != 0", True)])
def test_volume_equals_the_extraction(sets, tmp_path, expr, reads):
    a, _ = sets
    packets = extracted([a], expr, B, E, tmp_path / "v.pcap")
    step = 7 * NS + 3
    v = volume(request([a], expr), step)
    assert (v.begin_ns, v.step_ns, len(v.packets)) == (B, step, -(-(E - B) // step))
    assert (v.packets, v.bytes) == binned(packets, step, len(v.packets))
    assert sum(v.packets) == len(packets) > 0
    assert v.read_packets == reads


def test_sliced_packets_and_odd_frames_are_counted(tmp_path):
    """Frames a snaplen cut, ARP, LLDP, fragments: in the totals and the volume as the
    extraction has them; only IP packets with addresses make conversation rows."""
    root = tmp_path / "s"
    build_dumpset(root, traffic(9, False), per_file=200)
    for expr in ("", "ip", "not ip"):
        packets = extracted([root], expr, B, E, tmp_path / "s.pcap")
        t = conversations(request([root], expr))
        assert (t.packets, t.bytes) == (len(packets), sum(p[1] for p in packets))
        assert t.read_packets == (expr != "")  # rows of cut frames are MAYBE for `ip`
        v = volume(request([root], expr), 60 * NS)
        assert (sum(v.packets), sum(v.bytes)) == (t.packets, t.bytes)
    assert conversations(request([root], "arp")).rows == []
    assert conversations(request([root], "arp")).packets > 0


def ruin_bins(index: Path, checksum: bool) -> None:
    """Damage a version 5 index's time bins: one bin's packet count (the directory's checksum
    left as it was), or with `checksum` the first bin's start in the table's head, the
    checksum made to match (a bin table that contradicts the header)."""
    data = bytearray(index.read_bytes())
    h = parse_header(bytes(data), "x")
    at = h.header_len + h.bins_at
    if checksum:
        struct.pack_into("<q", data, at, struct.unpack_from("<q", data, at)[0] - 1)
        directory = bytes(data[h.header_len : h.summary_offset])
        struct.pack_into("<I", data, 76, zlib.crc32(directory))
    else:
        data[at + 16] ^= 1
    index.write_bytes(with_crc(bytes(data)))


def test_volume_of_whole_files_from_their_time_bins(sets, tmp_path):
    """Version 5: steps of whole seconds from a whole second count a file the window holds
    whole from its time bins (its index's directory), never its packet section; off the
    seconds the packets are counted. Both equal the extraction."""
    a, _ = sets
    root = copy_of(a, tmp_path / "bins")
    b0 = B // NS * NS
    inside = inside_indexes(root, b0, E)
    assert len(inside) >= 2
    for index in inside:
        ruin_packet_section(index)  # decoding one would fail, and say so
    packets = extracted([a], "", b0, E, tmp_path / "v.pcap")
    for step in (NS, 7 * NS, 60 * NS):
        warned: list[str] = []
        v = volume(request([root], "", b0, E), step, warn=warned.append)
        assert (v.packets, v.bytes) == binned(packets, step, len(v.packets), b0), step
        assert (v.read_packets, warned) == (False, [])
    for begin, step in ((b0 + 1, 7 * NS), (b0, 7 * NS + 1)):  # off the seconds
        warned = []
        v = volume(request([root], "", begin, E), step, warn=warned.append)
        want = extracted([a], "", begin, E, tmp_path / "w.pcap")
        assert (v.packets, v.bytes) == binned(want, step, len(v.packets), begin)
        assert v.read_packets and any("packet section" in w for w in warned)
    # a filter counts packets too; bins that contradict each other are refused, said so
    assert volume(request([root], "ip", b0, E), NS).read_packets
    for checksum, said in ((False, "checksum mismatch"), (True, "time bins contradict")):
        fresh = copy_of(a, tmp_path / f"bad-bins-{checksum}")
        ruin_bins(inside_indexes(fresh, b0, E)[0], checksum)
        warned = []
        v = volume(request([fresh], "", b0, E), NS, warn=warned.append)
        assert (v.packets, v.bytes) == binned(packets, NS, len(v.packets), b0)
        assert v.read_packets and any(said in w for w in warned), warned


def test_volume_of_packets_out_of_time_order(tmp_path):
    """Timestamps that step back inside a file (a clock step, packets merged late): each
    step still counts the packets whose time falls in it, as the extraction has them."""
    pk = traffic(11, False)
    for i in range(0, len(pk) - 1, 5):
        (t0, *r0), (t1, *r1) = pk[i], pk[i + 1]
        pk[i], pk[i + 1] = (t1 + NS // 2, *r0), (t0, *r1)
    root = tmp_path / "o"
    build_dumpset(root, pk, per_file=300)
    packets = extracted([root], "", B, E, tmp_path / "o.pcap")
    step = 13 * NS + 5
    v = volume(request([root], ""), step)
    assert (v.packets, v.bytes) == binned(packets, step, len(v.packets))
    assert any(a[0] > b[0] for a, b in zip(packets[:-1], packets[1:], strict=True))


def test_corpus_totals_and_volume(tmp_path):
    """tcpdump's test captures (every link type and oddity they hold): totals and volume
    equal the extraction's, and every conversation row sums its directions."""
    root, files = corpus_dumpset(tmp_path / "corpus")
    first = SYNTH_START
    last = first + 250_000_000 * 20_000
    for expr in ("", "ip or ip6", "tcp"):
        packets = extracted([root], expr, first + 333 * NS, last, tmp_path / "c.pcap")
        req = request([root], expr, first + 333 * NS, last)
        t = conversations(req)
        assert (t.packets, t.bytes) == (len(packets), sum(p[1] for p in packets))
        for r in t.rows:
            assert r["packets"] == r["packets_a_to_b"] + r["packets_b_to_a"]
            assert r["bytes"] == r["bytes_a_to_b"] + r["bytes_b_to_a"]
        v = volume(req, 600 * NS)
        assert (sum(v.packets), sum(v.bytes)) == (t.packets, t.bytes)


def garble(pcaps: list[Path]) -> None:
    """Overwrite every record of the pcaps with noise, keeping their sizes."""
    for p in pcaps:
        size = p.stat().st_size
        with open(p, "r+b") as f:
            f.seek(24)
            f.write(os.urandom(size - 24))


def test_no_pcap_byte_is_read_when_the_index_decides(tmp_path):
    """The pcaps garbled after indexing: tables and volume of index-decidable filters are
    still those of the intact files; a filter on packet bytes reads them (and says so)."""
    root = tmp_path / "g"
    ds = build_dumpset(root, traffic(4, True), per_file=250)
    exprs = ["", "host 10.9.0.1", "ip and (tcp port 443 or udp)", "vlan"]
    before = {(x, by): conversations(request([root], x), by)
              for x in exprs for by in ("conversation", "endpoint", "port")}
    vol = {x: volume(request([root], x), 30 * NS) for x in exprs}
    maybe = conversations(request([root], "tcp[13] & 2 != 0"))
    garble([sf.pcap for sf in ds.files()])
    for (x, by), t in before.items():
        assert conversations(request([root], x), by) == t
        assert not t.read_packets
    for x, v in vol.items():
        assert volume(request([root], x), 30 * NS) == v
    warned: list[str] = []
    after = conversations(request([root], "tcp[13] & 2 != 0"), warn=warned.append)
    assert maybe.read_packets and after.read_packets
    assert after.packets != maybe.packets or warned


def test_file_without_index_is_read(sets, tmp_path):
    """A file whose index is missing is read whole (with a warning), as npcapextract does."""
    a, _ = sets
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(a, root, symlinks=True)
    from pcapvault.index.dumpset import DumpSet

    files = DumpSet.open(root).files_in_window(B, E)
    os.unlink(files[1].index)
    warned: list[str] = []
    t = conversations(request([root], "tcp"), warn=warned.append)
    assert t.read_packets and any("index unusable" in w for w in warned)
    assert t.warnings == warned
    want = conversations(request([a], "tcp"))
    assert (t.rows, t.packets, t.bytes) == (want.rows, want.packets, want.bytes)


@pytest.mark.parametrize("cut", ["half", "gone"])
def test_pcap_cut_short_or_missing_counts_as_extracted(sets, tmp_path, cut):
    """A pcap cut short counts its complete records (warned), a missing one nothing, as
    npcapextract extracts them; the index alone still decides, no packet is read."""
    import shutil

    from pcapvault.index.dumpset import DumpSet

    a, _ = sets
    root = tmp_path / "copy"
    shutil.copytree(a, root, symlinks=True)
    pcap = DumpSet.open(root).files_in_window(B, E)[2].pcap
    if cut == "half":
        os.truncate(pcap, pcap.stat().st_size // 2)
    else:
        pcap.unlink()
    packets = extracted([root], "ip", B, E, tmp_path / "t.pcap")
    warned: list[str] = []
    t = conversations(request([root], "ip"), warn=warned.append)
    assert (t.packets, t.bytes) == (len(packets), sum(p[1] for p in packets))
    assert t.packets < conversations(request([a], "ip")).packets
    assert not t.read_packets
    if cut == "half":  # a missing pcap is no longer in the timeline: nothing to warn about
        assert any(str(pcap) in w and "truncated" in w for w in warned)
    # the volume of every packet reads the times and lengths alone, the offsets for this file
    every = extracted([root], "", B, E, tmp_path / "all.pcap")
    v = volume(request([root], ""), 61 * NS)
    assert (sum(v.packets), sum(v.bytes)) == (len(every), sum(p[1] for p in every))


def test_errors_are_one_line_pcapvault_errors(sets, tmp_path):
    a, _ = sets
    req = request([a], "")
    for call, exc, words in [
        (lambda: conversations(req, "hosts"), TableError, "unknown table"),
        (lambda: conversations(req, sort="size"), TableError, "unknown sort"),
        (lambda: conversations(req, limit=-1), TableError, "bad limit"),
        (lambda: volume(req, 0), TableError, "bad step"),
        (lambda: volume(req, 1000), TableError, "longer step"),
        (lambda: conversations(request([a], "tcp and")), FilterError, "bad filter"),
        (lambda: volume(request([a], "port 99999"), NS), FilterError, "bad filter"),
        (lambda: conversations(request([tmp_path / "none"], "")), DumpSetError, "does not exist"),
        (lambda: conversations(request([a], "", E, B)), TimeError, "after its end"),
    ]:
        with pytest.raises(exc) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value)


def test_empty_window(sets):
    a, _ = sets
    t = conversations(request([a], "", B, B))
    assert (t.rows, t.total_rows, t.packets, t.bytes) == ([], 0, 0, 0)
    v = volume(request([a], "", B, B), NS)
    assert (v.packets, v.bytes) == ([], [])


def copy_of(root: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(root, dest, symlinks=True)
    return dest


def inside_indexes(root: Path, b: int = B, e: int = E) -> list[Path]:
    """The index files of the files the window holds whole."""
    out = []
    for sf in DumpSet.open(root).files_in_window(b, e):
        h = parse_header(sf.index.read_bytes(), "x")
        if b <= h.first_ns and h.last_ns < e:
            out.append(sf.index)
    return out


def ruin_packet_section(index: Path) -> None:
    """Zero an index's packet section, its checksum made to match: decoding it fails."""
    data = bytearray(index.read_bytes())
    h = parse_header(bytes(data), "x")
    data[h.packets_offset : h.frames_offset] = bytes(h.packets_len)
    index.write_bytes(with_crc(bytes(data)))


TABLE_EXPRS = ["", "ip and (tcp or udp)", "host 10.9.0.1 or net 2001:db8::/64", "vlan"]


def test_files_inside_the_window_are_summed_from_the_index_totals(sets, tmp_path):
    """Version 4: the packet section of a file the window holds whole is never decoded when
    the index decides every row (ruined here, the tables stay equal and nothing is read or
    warned); a filter the index leaves open (MAYBE) still needs it."""
    a, _ = sets
    root = copy_of(a, tmp_path / "ruined")
    inside = inside_indexes(root)
    assert 3 <= len(inside) < len(DumpSet.open(root).files_in_window(B, E))
    for index in inside:
        ruin_packet_section(index)
    for expr in TABLE_EXPRS:
        want = {by: conversations(request([a], expr), by) for by in ("conversation", "endpoint")}
        for by, t in want.items():
            warned: list[str] = []
            got = conversations(request([root], expr), by, warn=warned.append)
            assert (got.rows, got.packets, got.bytes, got.read_packets, warned) == (
                t.rows, t.packets, t.bytes, False, []), (expr, by)
        # volume: a step holding every inside file whole takes the totals too
        warned = []
        v = volume(request([root], expr), E - B, warn=warned.append)
        assert (v.packets, v.bytes, warned) == (volume(request([a], expr), E - B).packets,
                                                volume(request([a], expr), E - B).bytes, [])
    warned = []
    conversations(request([root], "tcp[13] & 2 = 0"), warn=warned.append)
    assert any("packet section" in w for w in warned)


def test_version_3_and_4_indexes_mixed(sets, tmp_path):
    """A dump set whose older files were indexed by version 3 (no totals): those take the
    packet columns, the others the totals, and the tables are those of all version 5."""
    a, _ = sets
    root = copy_of(a, tmp_path / "mixed")
    files = DumpSet.open(root).files()
    for sf in files[::2]:
        sf.index.write_bytes(as_version(sf.index.read_bytes(), 3))
    for sf in files[1::4]:
        sf.index.write_bytes(as_version(sf.index.read_bytes(), 4))
    versions = {parse_header(sf.index.read_bytes(), "x").version for sf in files}
    assert versions == {3, 4, 5}
    for index in inside_indexes(root):
        if parse_header(index.read_bytes(), "x").version >= 4:
            ruin_packet_section(index)
    for expr in TABLE_EXPRS:
        for by in ("conversation", "endpoint", "port"):
            want = conversations(request([a], expr), by)
            warned: list[str] = []
            got = conversations(request([root], expr), by, warn=warned.append)
            assert (got.rows, got.packets, got.bytes, got.read_packets, warned) == (
                want.rows, want.packets, want.bytes, False, []), (expr, by)


@pytest.mark.parametrize("fold", [1 << 21, 64])
def test_hash_collisions_and_folds_change_nothing(sets, monkeypatch, fold):
    """Rows are grouped by 64-bit hashes and then compared with their group's first: hashes
    made to collide (a crafted index could) must cost time, never a wrong table; nor may
    grouping the rows a few at a time (a long window) change one."""
    a, b = sets
    want = {(expr, by): conversations(request([a, b], expr), by)
            for expr in TABLE_EXPRS for by in ("conversation", "endpoint", "port")}
    monkeypatch.setattr(conv, "hash_rows", lambda w: w[0] >> np.uint64(56) & np.uint64(1))
    monkeypatch.setattr(conv._RowTotals, "FOLD", fold)
    for (expr, by), t in want.items():
        got = conversations(request([a, b], expr), by)
        assert (got.rows, got.total_rows, got.packets, got.bytes) == (
            t.rows, t.total_rows, t.packets, t.bytes), (expr, by)
