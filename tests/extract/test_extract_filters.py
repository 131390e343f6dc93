"""npcapextract output equals tcpdump's selection, packet for packet, over many filters and
windows, on realistic synthetic traffic and on tcpdump's own test corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    NS,
    SYNTH_START,
    corpus_dumpset,
    epoch,
    read_pcap_records,
    synthetic_dumpset,
    tcpdump_window,
)

from pcapvault.extract.cli import main
from pcapvault.extract.flowmatch import MAYBE, NO, YES, FlowMatcher
from pcapvault.index.indexfile import FLAG_ADDRS, read_index
from pcapvault.index.libpcap import compile_filter
from pcapvault.index.pcapfile import PcapReader

START = SYNTH_START

FILTERS = [
    "",
    "tcp",
    "udp",
    "icmp",
    "arp",
    "arp host 10.0.1.3",
    "arp src host 10.0.1.3 or arp dst host 10.0.0.2",
    "rarp or (arp and not host 10.0.1.3)",
    "ip",
    "ip6",
    "host 10.0.1.3",
    "src host 10.0.1.3",
    "dst host 192.168.1.1",
    "host 2001:db8::1",
    "net 10.1.0.0/16",
    "src net 10.0.2.0/24 and dst net 10.1.0.0/16",
    "port 80",
    "tcp port 443",
    "udp port 53",
    "src port 53 or dst port 5353",
    "portrange 1024-2048",
    "vlan",
    "vlan 100",
    "vlan 10 and vlan 200",
    "vlan and tcp port 25",
    "not tcp",
    "not (host 10.0.1.3 or port 80)",
    "tcp and not port 22 and not port 443",
    "(udp or icmp) and net 10.0.0.0/16",
    "ip6 and udp",
    "ip6 and tcp port 80",
    "ip proto 17 and not udp port 53",
    "tcp[13] & 2 != 0",
    "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
    "len > 500",
    "greater 1000 and tcp",
    "less 64",
    "ip[8] == 128",
    "ether broadcast",
    "ether host 00:16:3e:00:01:02",
    "ip[6:2] & 0x1fff != 0",
    "ip6 protochain 17",
    "host 203.0.113.99",
    "port 9",
    "vlan 999",
    "llc",
    "stp",
]


def run(args: list[str], capsys=None) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def extract(ds: Path, tmp: Path, expr: str, begin: int, end: int) -> list:
    out = tmp / "out.pcap"
    if out.exists():
        out.unlink()
    rc = run(["-t", str(ds), "-b", epoch(begin), "-e", epoch(end), "-f", expr, "-o", str(out)])
    if rc == 1:
        assert not out.exists()
        return []
    assert rc == 0
    return read_pcap_records(out.read_bytes())


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_dumpset(tmp_path_factory.mktemp("synth") / "ds")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_dumpset(tmp_path_factory.mktemp("corpus") / "ds")


@pytest.mark.parametrize("expr", FILTERS)
def test_synthetic_whole_span(synth, tmp_path, expr):
    root, files = synth
    b, e = START - NS, START + 3600 * NS
    assert extract(root, tmp_path, expr, b, e) == tcpdump_window(files, expr, b, e)


@pytest.mark.parametrize("expr", FILTERS)
def test_corpus_whole_span(corpus, tmp_path, expr):
    root, files = corpus
    b, e = START, START + 7200 * NS
    assert extract(root, tmp_path, expr, b, e) == tcpdump_window(files, expr, b, e)


WINDOWS = [
    # inside one file
    (START + 100 * NS + 7, START + 130 * NS + 3),
    # across a slot boundary (15:10:00 UTC), starting and ending inside files
    (START + 555 * NS + 1, START + 655 * NS + 999),
    # exactly on a slot boundary, both ends
    (1763737800 * NS, 1763738400 * NS),
    # empty window and a window before the data
    (START + 10 * NS, START + 10 * NS),
    (START - 3600 * NS, START - 1800 * NS),
]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("expr", ["", "host 10.0.1.3", "tcp[13] & 2 != 0", "not udp"])
def test_windows_trim_inside_files(synth, tmp_path, window, expr):
    root, files = synth
    b, e = window
    assert extract(root, tmp_path, expr, b, e) == tcpdump_window(files, expr, b, e)


def test_begin_inclusive_end_exclusive(synth, tmp_path):
    root, files = synth
    allp = tcpdump_window(files, "", 0, 2**63 - 1)
    t5, t9 = allp[5][0], allp[9][0]
    got = extract(root, tmp_path, "", t5, t9)
    assert [p[0] for p in got] == [p[0] for p in allp[5:9]]


def test_flow_decisions_are_sound_on_every_file(synth, corpus):
    """No flow row decided NO holds a packet libpcap matches; none decided YES holds one it
    rejects. Checked packet by packet on every indexed file."""
    for _root, files in (synth, corpus):
        for pcap in files:
            idx = read_index(Path(str(pcap) + ".idx"))
            with PcapReader(pcap) as r:
                arr = np.array(r.array())
            for expr in FILTERS:
                f = compile_filter(expr)
                dec = FlowMatcher(f).decide(idx.flows)[idx.flow.astype(np.int64)]
                m = f.match_many(arr, idx.offset.astype(np.int64) + 16, idx.caplen, idx.wirelen)
                assert not (m & (dec == NO)).any(), (pcap, expr)
                assert not (~m & (dec == YES)).any(), (pcap, expr)
                assert set(np.unique(dec)) <= {NO, YES, MAYBE}


def test_host_filters_decide_arp_rows(synth):
    """ARP rows record the addresses `arp host` compares, so a host filter settles them
    without reading the frames (before, every ARP frame was a candidate)."""
    _root, files = synth
    f = compile_filter("host 10.0.1.3")
    decided = 0
    for pcap in files:
        idx = read_index(Path(str(pcap) + ".idx"))
        # frames sliced before the target address stay candidates; libpcap decides them
        arp = (idx.flows["ethertype"] == 0x0806) & (idx.flows["flags"] & FLAG_ADDRS != 0)
        dec = FlowMatcher(f).decide(idx.flows[arp])
        assert (dec != MAYBE).all(), pcap
        decided += len(dec)
    assert decided > 20


def test_index_skips_what_it_can(synth, tmp_path, capsys):
    root, files = synth
    rc = run(["-t", str(root), "-b", f"{START / NS}", "-e", f"{(START + 3600 * NS) / NS}",
              "-f", "host 10.0.1.3 and tcp port 80", "-o", str(tmp_path / "o.pcap"), "-v"])
    err = capsys.readouterr().err
    read = int(err.split("packets read ")[1].split(",")[0])
    assert rc == 0
    assert read < 2400 // 10, err  # only candidates are read
