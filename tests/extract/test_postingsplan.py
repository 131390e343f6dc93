"""The address-postings plan (extract/postingsplan.py, hostkeys.py): it plans the queries it is
for, leaves every other one to the flow-table plan, and its answers equal tcpdump's selection,
whether read record by record without numpy (records.py) or by the engine (engine.py)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from extract_helpers import (
    NS,
    SYNTH_START,
    build_dumpset,
    corpus_dumpset,
    epoch,
    ether,
    ipv4,
    read_pcap_records,
    synthetic_dumpset,
    tcp,
    tcpdump_select,
    tcpdump_window,
)
from indexes import as_version

from pcapvault.extract import hostkeys, postingsplan, records
from pcapvault.extract.access import open_query
from pcapvault.extract.cli import main
from pcapvault.extract.engine import RequestRun
from pcapvault.extract.flowplan import Source
from pcapvault.extract.output import Output
from pcapvault.extract.report import Stats
from pcapvault.extract.request import Request
from pcapvault.index.indexfile import read_index
from pcapvault.index.libpcap import compile_filter
from pcapvault.index.postings import Postings

START = SYNTH_START

# Every one of these names an address on each accepting path: the fast path answers them.
HOST_FILTERS = [
    "host 10.0.1.3",
    "src host 10.0.1.3",
    "dst host 192.168.1.1",
    "host 2001:db8::1",
    "src host fe80::1",
    "ip6 host 2001:db8::2",
    "arp host 10.0.1.3",
    "ip host 10.0.0.2",
    "host 10.0.1.3 or host 10.1.2.4",
    "host 10.0.1.3 and host 10.0.0.2",
    "host 10.0.1.3 and tcp port 80",
    "host 10.0.1.3 and not host 10.0.0.2",
    "host 10.0.1.3 and ip[8] == 128",
    "(host 10.0.0.1 or host 2001:db8::1) and udp",
    "host 203.0.113.99",
]
# These do not: the engine answers them.
ENGINE_FILTERS = ["", "tcp", "not host 10.0.1.3", "net 10.1.0.0/16", "vlan and host 10.0.1.3",
                  "host 10.0.1.3 or tcp", "ether host 00:16:3e:00:01:02", "port 80"]


def postings(root: Path, expr: str, begin: int, end: int) -> postingsplan.PostingsPlan | None:
    return postingsplan.plan(open_query(str(root), expr), begin, end)


def through_engine(root: Path, expr: str, begin: int, end: int, out: Path,
                   strategy: type) -> list:
    """The engine's records for the request, its dump set planned by `strategy`."""
    run = RequestRun(Request([str(root)], begin, end, expr), [Source(str(root), 0, expr)],
                     Stats(), lambda m: None, postings=strategy is not Source)
    assert type(run.sources[0]) is strategy
    try:
        run.write(lambda ifaces, **opts: Output(str(out), ifaces, **opts))
    finally:
        if run.out is not None:
            run.out.close()
    return read_pcap_records(out.read_bytes()) if out.exists() else []


def answer(root: Path, expr: str, begin: int, end: int, out: Path) -> list | None:
    """The postings plan's records for the request, read without numpy, or None if the
    flow-table plan must answer it. The engine reading the same plan, and the engine reading
    the flow-table plan, must give the same records."""
    plan = postings(root, expr, begin, end)
    if plan is None:
        return None
    if out.exists():
        out.unlink()
    res = records.run(plan, begin, end, str(out), False, False, Stats())
    assert res is not None
    if not res.written:
        assert not out.exists()
        got = []
    else:
        got = read_pcap_records(out.read_bytes())
    for strategy in (postingsplan.PostingsSource, Source):
        other = out.with_suffix(f".{strategy.__name__}.pcap")
        other.unlink(missing_ok=True)
        assert through_engine(root, expr, begin, end, other, strategy) == got, strategy
    return got


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_dumpset(tmp_path_factory.mktemp("hq-synth") / "ds")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_dumpset(tmp_path_factory.mktemp("hq-corpus") / "ds", ethernet_only=True)


def _corpus_hosts(files: list[Path], n: int) -> list[str]:
    """The addresses the corpus uses most (IPv4 and IPv6), from its indexes."""
    seen: dict[str, int] = {}
    for f in files:
        idx = read_index(str(f) + ".idx")
        for row, cnt in zip(idx.flows, idx.flow_packets.tolist(), strict=True):
            if not row["flags"] & 0x08 or row["ipver"] == 0:
                continue
            for a in (bytes(row["src"]), bytes(row["dst"])):
                ip = ipaddress.ip_address(a)
                text = str(ip.ipv4_mapped or ip) if row["ipver"] == 4 else str(ip)
                seen[text] = seen.get(text, 0) + cnt
    return [a for a, _ in sorted(seen.items(), key=lambda kv: -kv[1])[:n]]


@pytest.mark.parametrize("expr", HOST_FILTERS)
def test_synthetic_host_filters_equal_tcpdump(synth, tmp_path, expr):
    root, files = synth
    windows = [(START, START + 3600 * NS),  # everything
               (START + 400 * NS + 7, START + 1300 * NS + 11)]  # cuts files and slots
    for b, e in windows:
        got = answer(root, expr, b, e, tmp_path / "o.pcap")
        assert got is not None, f"{expr!r}: the fast path should answer it"
        assert got == tcpdump_window(files, expr, b, e), (expr, b, e)


def test_microsecond_dump_set_keeps_its_precision(tmp_path):
    """A microsecond dump set: records copied as stored, a microsecond pcap header, and a
    window's edges decided on microsecond record timestamps (packets 100 us on either side of
    each edge, in files the window cuts)."""
    t0 = START // 1000 * 1000 + 10 * NS
    b, e = t0 + 60 * NS + 500_000, t0 + 120 * NS + 500_000
    frame = ether(b"\x02" * 6, b"\x04" * 6, 0x0800,
                  ipv4("10.9.0.1", "10.9.1.1", 6, tcp(1000, 80, 0x10)))
    stamps = sorted({t0 + i * NS for i in range(180)}
                    | {edge + d for edge in (b, e) for d in (-400_000, -100_000, 100_000)})
    root = tmp_path / "us"
    ds = build_dumpset(root, [(t, frame, len(frame)) for t in stamps], per_file=50,
                       nanosecond=False)
    files = [sf.pcap for sf in ds.files()]
    out = tmp_path / "o.pcap"
    for window in ((START, START + 3600 * NS), (b, e)):
        got = answer(root, "host 10.9.0.1", *window, out)
        assert got and got == tcpdump_window(files, "host 10.9.0.1", *window)
        assert out.read_bytes()[:4] == bytes.fromhex("d4c3b2a1")


def test_corpus_hosts_equal_tcpdump(corpus, tmp_path):
    root, files = corpus
    hosts = _corpus_hosts(files, 25)
    assert sum(":" in h for h in hosts) >= 3, hosts  # IPv6 hosts too
    mid = START + 30 * 60 * NS + 3
    for h in hosts:
        for expr in (f"host {h}", f"dst host {h}"):
            for b, e in ((START, START + 24 * 3600 * NS), (mid, mid + 20 * 60 * NS)):
                got = answer(root, expr, b, e, tmp_path / "o.pcap")
                assert got is not None, expr
                assert got == tcpdump_window(files, expr, b, e), (expr, b, e)


@pytest.mark.parametrize("expr", ENGINE_FILTERS)
def test_other_filters_go_to_the_engine(synth, expr):
    root, _ = synth
    assert postings(root, expr, START, START + 3600 * NS) is None


def test_decisions_agree_with_libpcap_on_every_posting(synth, corpus):
    """Each posting the fast path takes without libpcap (YES) or drops (NO) is one libpcap
    accepts or rejects: checked packet by packet on both dump sets."""
    checked = {hostkeys.YES: 0, hostkeys.NO: 0}
    corpus_filters = [f"{d}host {h}" for h in _corpus_hosts(corpus[1], 10)
                      for d in ("", "src ", "dst ")]
    for (_, files), exprs in ((synth, HOST_FILTERS), (corpus, corpus_filters)):
        for expr in exprs:
            flt = compile_filter(expr, 1, 262144)
            keys = hostkeys.posting_keys(flt.program)
            assert keys, expr
            for f in files:
                data = Path(f).read_bytes()
                with Postings.read(str(f) + ".idx") as p:
                    for addr, etype in keys:
                        k = p.find(addr, etype)
                        if k is None:
                            continue
                        pl = p.entries(k)
                        roles: dict[int, int] = {}
                        for i, off in enumerate(pl.offset):
                            roles[off] = roles.get(off, 0) | (1 if i < pl.sources else 2)
                        for off, r in roles.items():
                            dec = hostkeys.decide(flt.program, addr, etype, r)
                            if dec == hostkeys.MAYBE:
                                continue
                            cap, wire = struct.unpack_from("<II", data, off + 8)
                            assert flt.match(data[off + 16 : off + 16 + cap], wire) == (
                                dec == hostkeys.YES), (expr, f, off)
                            checked[dec] += 1
    assert checked[hostkeys.YES] > 1000 and checked[hostkeys.NO] > 50, checked


def test_short_frames_are_confirmed_by_libpcap(tmp_path):
    """Frames cut before the index could record their addresses sit in the "address unknown"
    lists; libpcap decides them (a 32-byte IPv4 frame still has its source address)."""
    pkts = []
    for i in range(40):
        frame = ether(b"\x02" * 6, b"\x04" * 6, 0x0800,
                      ipv4(f"10.9.0.{1 + i % 4}", "10.9.1.1", 6, tcp(1000 + i, 80, 0x02)))
        pkts.append((START + i * NS, frame[:32], len(frame)))
    root = tmp_path / "ds"
    ds = build_dumpset(root, pkts, snaplen=32)
    files = [sf.pcap for sf in ds.files()]
    for expr in ("host 10.9.0.2", "src host 10.9.0.3", "dst host 10.9.1.1"):
        got = answer(root, expr, START, START + 3600 * NS, tmp_path / "o.pcap")
        assert got is not None
        assert got == tcpdump_window(files, expr, START, START + 3600 * NS), expr
    assert len(answer(root, "host 10.9.0.2", START, START + 3600 * NS, tmp_path / "o.pcap")) == 10
    assert answer(root, "dst host 10.9.1.1", START, START + 3600 * NS, tmp_path / "o.pcap") == []


def test_indexes_without_postings_go_to_the_engine(synth, tmp_path):
    """A dump set indexed by an earlier release (index version 2) is answered by the engine,
    and still exactly."""
    root = tmp_path / "ds"
    shutil.copytree(synth[0], root, symlinks=True)
    files = [sf for sf in sorted(root.rglob("*.pcap")) if not sf.is_symlink()]
    idx_path = Path(str(files[1]) + ".idx")
    idx_path.write_bytes(as_version(idx_path.read_bytes(), 2))
    assert postings(root, "host 10.0.1.3", START, START + 3600 * NS) is None
    out = tmp_path / "o.pcap"
    rc = _cli(["-t", str(root), "-b", epoch(START), "-e", epoch(START + 3600 * NS),
               "-f", "host 10.0.1.3", "-o", str(out)])
    assert rc == 0
    assert read_pcap_records(out.read_bytes()) == tcpdump_window(files, "host 10.0.1.3", START,
                                                         START + 3600 * NS)


def test_a_stale_index_hands_over_before_writing(synth, tmp_path):
    """A pcap whose records no longer sit where its index says (here: 8 bytes inserted after
    the file header) is noticed while reading, before anything is written."""
    root = tmp_path / "ds"
    shutil.copytree(synth[0], root, symlinks=True)
    pcap = sorted(p for p in root.rglob("*.pcap") if not p.is_symlink())[0]
    data = pcap.read_bytes()
    pcap.write_bytes(data[:24] + bytes(8) + data[24:])
    plan = postings(root, "host 10.0.1.3", START, START + 3600 * NS)
    assert plan is not None
    out = tmp_path / "o.pcap"
    assert records.run(plan, START, START + 3600 * NS, str(out), False, False, Stats()) is None
    assert not out.exists()


def test_torn_pcaps_go_to_the_engine(synth, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synth[0], root, symlinks=True)
    pcap = sorted(p for p in root.rglob("*.pcap") if not p.is_symlink())[2]
    with open(pcap, "r+b") as f:
        f.truncate(os.path.getsize(pcap) - 5)
    assert postings(root, "host 10.0.1.3", START, START + 3600 * NS) is None


def test_listing_and_verbose_summary(synth, tmp_path, capsys):
    root, files = synth
    args = ["-t", str(root), "-b", epoch(START), "-e", epoch(START + 3600 * NS),
            "-f", "host 10.0.1.3", "-l", "-v"]
    assert _cli(args) == 0
    cap = capsys.readouterr()
    listed = dict(line.split("\t") for line in cap.out.splitlines())
    want = {}
    for f in files:
        n = len(tcpdump_select([f], "host 10.0.1.3"))
        if n:
            want[os.path.realpath(f)] = str(n)
    assert listed == want
    assert f"files considered {len(files)}, skipped by timeline 0" in cap.err
    assert "written " + str(sum(map(int, want.values()))) in cap.err


def test_entry_point_pipes_into_tcpdump(synth, tmp_path):
    """The installed command's entry point (extract/__main__.py) with -O, read by tcpdump -r -."""
    root, files = synth
    cmd = [sys.executable, "-c", "from pcapvault.extract.__main__ import main; main()",
           "-t", str(root), "-b", epoch(START), "-e", epoch(START + 3600 * NS),
           "-f", "src host 10.0.1.3", "-O"]
    ours = subprocess.run(cmd, capture_output=True, check=True).stdout
    td = subprocess.run(["tcpdump", "-r", "-", "-w", "-", "--time-stamp-precision=nano"],
                        input=ours, capture_output=True, check=True).stdout
    assert read_pcap_records(td) == read_pcap_records(ours) == tcpdump_window(
        files, "src host 10.0.1.3", START, START + 3600 * NS)


def test_entry_point_exit_statuses(synth, tmp_path):
    """The entry point leaves without the interpreter's teardown: statuses, messages and
    output files must still be those of the command."""
    root, files = synth
    base = [sys.executable, "-c", "from pcapvault.extract.__main__ import main; main()",
            "-t", str(root), "-b", epoch(START), "-e", epoch(START + 3600 * NS)]
    out = tmp_path / "o.pcap"
    ok = subprocess.run([*base, "-f", "host 10.0.0.2", "-o", str(out), "-v"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "written" in ok.stderr  # the -v line, flushed before leaving
    assert read_pcap_records(out.read_bytes()) == tcpdump_window(files, "host 10.0.0.2", START,
                                                         START + 3600 * NS)
    listed = subprocess.run([*base, "-f", "host 10.0.0.2", "-l"], capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.count("\n") >= 1  # buffered stdout flushed
    none = subprocess.run([*base, "-f", "host 203.0.113.99", "-o", str(tmp_path / "n.pcap")],
                          capture_output=True, text=True)
    assert none.returncode == 1 and not (tmp_path / "n.pcap").exists()
    bad = subprocess.run([*base, "-f", "host 10.0.0.2 and", "-O"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "bad filter" in bad.stderr


def test_closed_pipe_ends_quietly(tmp_path):
    """A reader that leaves early (head) ends the fast path quietly, status 0: 2.8 MB of one
    host's packets, far more than a pipe holds."""
    frame = ether(b"\x02" * 6, b"\x04" * 6, 0x0800,
                  ipv4("10.9.0.1", "10.9.1.1", 6, tcp(1000, 80, 0x10, bytes(1400))))
    root = tmp_path / "ds"
    build_dumpset(root, [(START + i * 1000, frame, len(frame)) for i in range(2000)],
                  per_file=500)
    cmd = (f"{sys.executable} -c 'from pcapvault.extract.__main__ import main; main()' "
           f"-t {root} -b {epoch(START)} -e {epoch(START + 3600 * NS)} -f 'host 10.9.0.1' -O")
    whole = subprocess.run(["bash", "-c", cmd + " | wc -c"], capture_output=True, text=True)
    assert int(whole.stdout) > 2_000_000
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd + " | head -c 100 >/dev/null"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_engine_reads_a_dense_postings_plan_with_o_direct(tmp_path, monkeypatch):
    """A host that fills its files, out of the page cache: the engine reads the postings plan
    with O_DIRECT and learns timestamps and wire lengths on its checking thread; a window
    that cuts the files keeps exactly tcpdump's records, and a damaged record is skipped and
    reported."""
    from extract_helpers import flip_caplen

    from pcapvault.extract import engine

    frame = ether(b"\x02" * 6, b"\x04" * 6, 0x0800,
                  ipv4("10.9.0.1", "10.9.1.1", 6, tcp(1000, 80, 0x10, bytes(1400))))
    root = tmp_path / "ds"
    ds = build_dumpset(root, [(START + i * 10_000_000, frame, len(frame) + i % 7)
                              for i in range(6000)], per_file=2000)
    files = [sf.pcap for sf in ds.files()]
    b, e = START + 5 * NS + 3, START + 55 * NS + 5  # cuts the first and the last file
    whole = tcpdump_window(files, "host 10.9.0.1", b, e)
    at, damaged = flip_caplen(files[1], 700)
    want = [p for p in whole if p != damaged]
    opened = []
    real = engine.open_direct
    monkeypatch.setattr(engine, "open_direct", lambda p: opened.append(p) or real(p))
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    warnings: list[str] = []
    stats = Stats()
    run = RequestRun(Request([str(root)], b, e, "host 10.9.0.1"),
                     [Source(str(root), 0, "host 10.9.0.1")], stats, warnings.append)
    assert isinstance(run.sources[0], postingsplan.PostingsSource)
    out = tmp_path / "o.pcap"
    try:
        run.write(lambda ifaces, **opts: Output(str(out), ifaces, **opts))
    finally:
        run.out.close()
    assert len(opened) == 3
    assert stats.damaged_records == 1 and any(f"first at byte {at}" in w for w in warnings)
    assert read_pcap_records(out.read_bytes()) == want and len(want) == len(whole) - 1 > 4000
