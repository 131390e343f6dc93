"""The pcap stream of npcapserve (server/pcap.py) against npcapextract, byte for byte.

The real engine writes into a real pipe read by the event loop, as in the server; the HTTP
layer around it is tested through the running server in test_serve_http.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from extract_helpers import NS, SYNTH_START, build_dumpset, epoch, synthetic_traffic
from recorderproc import tool

from pcapvault.extract.request import Request
from pcapvault.index.libpcap import FilterError
from pcapvault.server import filtercheck, pcap

BEGIN = SYNTH_START + 60 * NS
END = SYNTH_START + 1500 * NS


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("serve-pcap")
    a = build_dumpset(base / "a", synthetic_traffic(3000, SYNTH_START, seed=3, span_s=1800),
                      per_file=400, interface="eth0")
    b = build_dumpset(base / "b", synthetic_traffic(2000, SYNTH_START, seed=5, span_s=1800),
                      per_file=300, interface="eth1")
    return [a.root, b.root]


def extracted(roots: list[Path], expr: str, *opts: str) -> bytes:
    cmd = [tool("npcapextract"), *[a for r in roots for a in ("-t", str(r))],
           "-b", epoch(BEGIN), "-e", epoch(END), "-f", expr, "-0", "-o", "-", *opts]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout


def streamed(roots: list[Path], expr: str, pcapng: bool = False, snaplen: int | None = None,
             allowed: str | None = None, stop_after: int | None = None
             ) -> tuple[bytes, tuple[int, int, str | None]]:
    req = Request([str(r) for r in roots], BEGIN, END, expr, pcapng, snaplen, empty=True)
    prepared = pcap.prepare(req, allowed, 2.0)
    done: list = []

    async def read() -> bytes:
        got = []
        gen = pcap.body(prepared, lambda *a: done.append(a))
        async for chunk in gen:
            got.append(chunk)
            if stop_after is not None and sum(map(len, got)) >= stop_after:
                await gen.aclose()
                break
        return got

    chunks = asyncio.run(read())
    data = b"".join(chunks)
    for _ in range(200):
        if done:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert len(done) == 1
    if stop_after is not None:  # the stream gave out every chunk but the one in hand
        assert done[0][1] == len(data) - len(chunks[-1])
    return data, done[0]


@pytest.mark.parametrize("expr", ["", "tcp port 80", "host 10.0.1.3", "udp and port 53",
                                  "vlan", "ip6", "ether proto 0x88cc and not ip"])
@pytest.mark.parametrize("several", [False, True])
def test_pcap_bytes_equal_npcapextract(sets, expr, several):
    roots = sets if several else sets[:1]
    data, (packets, nbytes, error) = streamed(roots, expr)
    assert error is None
    assert data == extracted(roots, expr)
    assert nbytes == len(data)


@pytest.mark.parametrize("several", [False, True])
def test_pcapng_and_snaplen_equal_npcapextract(sets, several):
    roots = sets if several else sets[:1]
    data, _ = streamed(roots, "tcp", pcapng=True, snaplen=60)
    assert data == extracted(roots, "tcp", "--pcapng", "-s", "60")


def test_no_match_is_a_header_only_capture(sets):
    data, (packets, nbytes, error) = streamed(sets[:1], "host 203.0.113.99")
    assert packets == 0 and error is None
    assert len(data) == 24 and data == extracted(sets[:1], "host 203.0.113.99")


def test_restricted_filter_is_the_conjunction(sets):
    data, _ = streamed(sets[:1], "tcp", allowed="net 10.0.0.0/16")
    assert data == extracted(sets[:1], "(net 10.0.0.0/16) and (tcp)")


def test_reader_gone_stops_the_extraction(tmp_path):
    ds = build_dumpset(tmp_path / "big", synthetic_traffic(40000, SYNTH_START, seed=9,
                                                           span_s=1800), per_file=5000)
    full = extracted([ds.root], "")
    assert len(full) > 4 * pcap.PIPE_BYTES
    data, (packets, nbytes, error) = streamed([ds.root], "", stop_after=2 * pcap.CHUNK)
    assert error and "stopped reading" in error
    assert 0 < nbytes < len(full) // 2  # what was given out (checked in streamed)


def test_a_stream_left_after_the_engine_finished_is_incomplete(sets):
    """The engine wrote all of a small result into the pipe and ended well; the client left
    before the stream had read it: the audit must not call that a whole result."""
    req = Request([str(sets[0])], BEGIN, END, "tcp port 80", empty=True)
    prepared = pcap.prepare(req, None, 2.0)
    done: list = []

    async def read() -> None:
        gen = pcap.body(prepared, lambda *a: done.append(a))
        await gen.__anext__()
        for _ in range(250):  # until the engine has written everything and closed the pipe
            if prepared.run.out is not None and prepared.run.out.fd < 0:
                break
            await asyncio.sleep(0.02)
        assert prepared.run.out.fd < 0 and not done  # the engine is done, the stream not
        await gen.aclose()

    asyncio.run(read())
    assert len(done) == 1
    packets, nbytes, error = done[0]
    assert packets > 0 and nbytes == 0
    assert error == "the client stopped reading; result incomplete"


def test_reader_gone_stops_a_search_that_writes_nothing(tmp_path):
    """A client that leaves while the engine finds nothing to write (a filter only the
    packets can decide, matching none): the engine stops at the next file, not at the end of
    the window, although no write fails."""
    ds = build_dumpset(tmp_path / "quiet", synthetic_traffic(12000, SYNTH_START, seed=4,
                                                             span_s=1800), per_file=1000)
    expr = "ether[20:4] = 0x0badcafe and ether[24:4] = 0x0badcafe"  # matches no packet
    assert extracted([ds.root], expr) == extracted([ds.root], "host 203.0.113.99")
    req = Request([str(ds.root)], BEGIN, END, expr, empty=True)
    whole = pcap.prepare(req, None, 2.0)
    r, w = os.pipe()
    pcap._work(whole.run, w, lambda *a: None)  # read to the end: every file
    os.close(r)
    assert whole.stats.packets_read > 1000  # the packets of 12 files the index left open
    gone = pcap.prepare(req, None, 2.0)
    r, w = os.pipe()
    os.close(r)  # the client left before the first file was done
    done: list = []
    pcap._work(gone.run, w, lambda *a: done.append(a))
    assert done == [(0, 0, "the client stopped reading; result incomplete")]
    assert 0 < gone.stats.packets_read < whole.stats.packets_read / 4  # the first file's


def test_bad_and_costly_filters(sets):
    with pytest.raises(FilterError, match="bad filter"):
        pcap.prepare(Request([str(sets[0])], BEGIN, END, "tcp port"), None, 2.0)
    costly = " or ".join(f"host 10.{i // 250}.{i % 250}.1 and port {i}" for i in range(600))
    with pytest.raises(filtercheck.FilterTooCostly, match="CPU time"):
        filtercheck.check(costly, [1], 0.2)


def test_the_filter_limit_is_not_rounded_up():
    """RLIMIT_CPU counts whole seconds: a 0.1 s limit once let a filter run for 1 s."""
    costly = " or ".join(f"host 10.0.{i}.1 and port {i}" for i in range(100))  # ~0.5 s
    with pytest.raises(filtercheck.FilterTooCostly):
        filtercheck.check(costly, [1], 0.1)
    filtercheck.check(costly, [1], 30.0)  # and within a limit it has, it passes
