"""index/libpcap.py against libpcap itself and tcpdump as the oracle."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import CORPUS, NS, read_pcap_records, synthetic_traffic, write_pcap

from pcapvault.index.errors import PcapVaultError
from pcapvault.index.libpcap import FilterError, compile_filter
from pcapvault.index.pcapfile import PcapReader

FILTERS = [
    "", "tcp", "udp", "icmp", "arp", "ip6", "port 80", "host 10.0.1.3", "net 10.1.0.0/16",
    "vlan", "vlan 100", "vlan and vlan", "tcp[13] & 2 != 0", "len > 100", "greater 200",
    "less 60", "ip[8] == 64", "ether broadcast", "not ip", "ip6 and udp port 53",
    "tcp[0] % tcp[1] == 2", "ip[0] << ip[1] > 5", "ip[1] >> ip[0] == 0",
    "ip[2:2] / 3 > 3", "tcp[2:2] / tcp[12] > 30", "ip[8] - ip[9] > 100", "ip[1] * 3 < 20",
    "ip[2:2] ^ 0xff > 9",
    "icmp[icmptype] == icmp-echo", "ip6 protochain 17", "portrange 1000-2000",
]


@pytest.fixture(scope="module")
def synth_pcap(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("lp") / "synth.pcap"
    write_pcap(p, synthetic_traffic(1500, 1763737200 * NS, seed=3))
    return p


def _packets(path: Path):
    with PcapReader(path) as r:
        t = r.scan()
        arr = np.array(r.array())  # copy: the mapping closes with the reader
        return r.header.linktype, arr, t.offset.astype(np.int64) + 16, t.caplen, t.wirelen


def test_compile_error_is_libpcaps_message():
    with pytest.raises(FilterError) as e:
        compile_filter("tcp port eighty")
    assert isinstance(e.value, PcapVaultError)
    # The same text tcpdump prints, which is libpcap's pcap_geterr().
    r = subprocess.run(["tcpdump", "-d", "-y", "EN10MB", "-i", "lo", "tcp port eighty"],
                       capture_output=True, text=True)
    tail = r.stderr.strip().splitlines()[-1]
    assert "eighty" in str(e.value)
    assert tail.split(": ", 1)[1] in str(e.value)


@pytest.mark.parametrize("expr", ["tcp\0udp", "\0", "tcp\0"])
def test_a_nul_is_refused_not_a_cut(expr):
    """libpcap reads a C string: `tcp\0udp` once compiled as `tcp`, and `\0` as no filter
    (everything), while the audit recorded the whole text."""
    with pytest.raises(FilterError, match="NUL"):
        compile_filter(expr)
    with pytest.raises(FilterError, match="NUL"):
        compile_filter(expr, optimize=False)


def test_program_length_matches_tcpdump(synth_pcap):
    for expr in FILTERS[1:12]:
        f = compile_filter(expr, 1)
        prog, count = f.kernel_program()
        assert len(prog) == 8 * count
        d = subprocess.run(["tcpdump", "-r", str(synth_pcap), "-d", expr], capture_output=True,
                           text=True, check=True).stdout
        assert count == len([ln for ln in d.splitlines() if re.match(r"^\(\d+\)", ln)]), expr
        ddd = subprocess.run(["tcpdump", "-r", str(synth_pcap), "-ddd", expr],
                             capture_output=True, text=True, check=True).stdout.split("\n")
        assert int(ddd[0]) == count
        # -ddd prints code jt jf k in decimal: the same instructions, byte for byte.
        insns = [tuple(map(int, ln.split())) for ln in ddd[1 : 1 + count]]
        assert insns == [tuple(int(x) for x in i) for i in f.insns.tolist()]


def test_match_uses_wire_length():
    f = compile_filter("len > 100")
    data = bytes(60)
    assert not f.match(data, 60)
    assert f.match(data, 1500)  # pcapy-ng gets this one wrong
    assert compile_filter("").match(data, 60)


def test_batch_equals_per_packet_libpcap(synth_pcap):
    lt, arr, offs, caps, wires = _packets(synth_pcap)
    for expr in FILTERS:
        f = compile_filter(expr, lt)
        fast = f.match_many(arr, offs, caps, wires)
        ref = f.match_many(arr, offs, caps, wires, engine="libpcap")
        assert (fast == ref).all(), expr


def test_matches_equal_tcpdump_selection(synth_pcap):
    lt, arr, offs, caps, wires = _packets(synth_pcap)
    for expr in FILTERS[1:]:
        f = compile_filter(expr, lt)
        m = f.match_many(arr, offs, caps, wires)
        r = subprocess.run(["tcpdump", "-r", str(synth_pcap), "-w", "-", expr],
                           capture_output=True, check=True)
        want = [p[2] for p in read_pcap_records(r.stdout)]
        got = [bytes(arr[o : o + c]) for o, c, k in zip(offs, caps, m, strict=True) if k]
        assert got == want, expr


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"tcpdump test corpus not found at {CORPUS}")
def test_batch_on_corpus():
    files = sorted(CORPUS.glob("*.pcap"))
    for path in files:
        try:
            lt, arr, offs, caps, wires = _packets(path)
        except PcapVaultError:
            continue
        for expr in FILTERS:
            try:
                f = compile_filter(expr, lt)
            except FilterError:
                continue
            fast = f.match_many(arr, offs, caps, wires)
            ref = f.match_many(arr, offs, caps, wires, engine="libpcap")
            assert (fast == ref).all(), (path.name, expr)


def test_free_and_reuse():
    for _ in range(2000):
        with compile_filter("host 10.0.0.1 and tcp port 80") as f:
            assert len(f) > 5
    f = compile_filter("tcp")
    f.close()
    with pytest.raises(ValueError):
        f.match(b"", 0)
