"""Dense spans handed to the extraction client through shared buffers (extract/service/shared.py).

The service's engine reads the middle chunks of a dense, unfiltered, contiguous selection with
O_DIRECT into a sealed memfd that the client maps read-only, and sends references instead of
bytes. These tests run the engine's service output and the real client receiver on a socket
pair, with real O_DIRECT reads of files dropped from the page cache, and check that the result
is byte for byte the direct extraction's and tcpdump's, that the shared path was taken, and
that no read into the shared region ever covered a byte outside the selected records."""

from __future__ import annotations

import mmap
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from extract_helpers import (
    NS,
    build_dumpset,
    engine_extract,
    read_pcap_records,
    synthetic_traffic,
    tcpdump_select,
)

from pcapvault.extract import direct, engine
from pcapvault.extract.output import Output
from pcapvault.extract.service import client, wire
from pcapvault.extract.service.framed import ConnectionOutput
from pcapvault.extract.service.shared import SharedSlots
from pcapvault.index.pcapfile import RECORD_HEADER_LEN, PcapReader

START = 1763737200 * NS + 123_456_789
CHUNK = 8192  # several O_DIRECT chunks per test file


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared") / "ds"
    d = build_dumpset(root, synthetic_traffic(4000, START, seed=11, span_s=3000), per_file=900)
    return root, [sf.pcap for sf in d.files()]


@pytest.fixture
def cold(monkeypatch):
    """Every file is read with O_DIRECT in small chunks, as a cold dense file is."""
    monkeypatch.setattr(engine, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(engine, "DENSE_SHARE", 1 << 40)
    monkeypatch.setattr(engine, "cached", lambda *a: False)
    monkeypatch.setattr(engine, "CHUNK_BYTES", CHUNK)


@pytest.fixture
def shared_reads(monkeypatch) -> list[tuple[Path, int, int]]:
    """(file, first byte, end) of every O_DIRECT read that went into a shared slot, widened
    to the alignment as the device writes it."""
    seen: list[tuple[Path, int, int]] = []
    real = direct.DirectReader.read

    def spy(self, fd, path, start, end, share=False):
        span = real(self, fd, path, start, end, share)
        if span.slot is not None:
            seen.append((path, span.base, span.base + len(span.buf)))
        return span

    monkeypatch.setattr(direct.DirectReader, "read", spy)
    return seen


def window(b_ns: int, e_ns: int) -> engine.Query:
    return engine.Query(b_ns, e_ns)


def through_service(root: Path, expr: str, q: engine.Query, out_path: Path,
                    **caps: int) -> dict:
    """The service's output on one end of a socket pair, the real client on the other."""
    ours, theirs = socket.socketpair()
    result: dict = {}

    def receive() -> None:
        try:
            result["trailer"], rx = client._receive(theirs, str(out_path))
            result["region"] = bytes(rx.shared) if rx.shared is not None else None
            rx.close()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    t = threading.Thread(target=receive)
    t.start()
    try:
        shared = SharedSlots(ours, CHUNK)
        shared.offer()
        out = engine_extract([root], expr, q,
                             lambda ifaces: ConnectionOutput(ours, ifaces, shared, **caps))
        wire.send_json(ours, wire.TRAILER, {"packets": out.packets})
        shared.close()
    finally:
        t.join()
        ours.close()
        theirs.close()
    if "error" in result:
        raise result["error"]
    return result


def direct_file(root: Path, expr: str, q: engine.Query, path: Path, **caps: int) -> bytes:
    engine_extract([root], expr, q, lambda ifaces: Output(str(path), ifaces, **caps))
    return path.read_bytes() if path.is_file() else b""


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def selected_span(path: Path, b_ns: int, e_ns: int) -> tuple[int, int]:
    """File bytes from the first record in the window to the end of the last one."""
    with PcapReader(path) as r:
        t = r.scan()
    inside = (t.ts_ns >= b_ns) & (t.ts_ns < e_ns)
    off, cap = t.offset[inside], t.caplen[inside]
    if not len(off):
        return 0, 0
    return int(off[0]), int(off[-1] + RECORD_HEADER_LEN + cap[-1])


def test_unfiltered_dense_window_goes_by_reference(ds, tmp_path, cold, shared_reads):
    """A window that cuts files at both ends, unaligned: the same bytes as a direct
    extraction and as tcpdump, most of them passed by reference, none outside the window."""
    root, files = ds
    b, e = START + 130 * NS + 17, START + 2700 * NS + 3
    q = window(b, e)
    evict(files)
    res = through_service(root, "", q, tmp_path / "svc.pcap")
    got = (tmp_path / "svc.pcap").read_bytes()
    assert got == direct_file(root, "", q, tmp_path / "direct.pcap")
    assert read_pcap_records(got) == [p for p in tcpdump_select(files, "") if b <= p[0] < e]
    assert res["trailer"]["packets"] == len(read_pcap_records(got))
    assert len(shared_reads) > len(files), "the middle chunks of every file go by reference"
    referenced = sum(z - a for _, a, z in shared_reads)
    assert referenced > len(got) // 2
    for path, a, z in shared_reads:
        lo, hi = selected_span(path, b, e)
        z = min(z, path.stat().st_size)  # the device writes nothing past the end of the file
        assert lo <= a and z <= hi, f"{path.name}: shared read {a}..{z} outside {lo}..{hi}"
    # What the client could see of the region: only bytes of its own result.
    region = res["region"]
    for k in range(0, len(region), 4096):
        page = region[k : k + 4096]
        if page.strip(b"\0"):
            assert page.strip(b"\0") in got


@pytest.mark.parametrize("expr",
                         ["tcp", "host 10.0.1.3", "not udp", "len > 500", "tcp[13] & 2 != 0"])
def test_filtered_selections_never_enter_the_region(ds, tmp_path, cold, shared_reads, expr):
    """A filter leaves unselected records between and around the selected ones: where the
    index decides every row the candidates are not adjacent, and where it cannot (`len > 500`)
    the filter still has to reject some of them. Such chunks are read privately and sent as
    bytes."""
    root, files = ds
    q = window(START - NS, START + 3600 * NS)
    evict(files)
    through_service(root, expr, q, tmp_path / "svc.pcap")
    got = (tmp_path / "svc.pcap").read_bytes()
    assert read_pcap_records(got) == tcpdump_select(files, expr)
    assert shared_reads == []


def test_caps_and_splits_by_reference(ds, tmp_path, cold, shared_reads):
    """-P/-N files and --max-bytes: references land in the right files and stop at the cap."""
    root, files = ds
    q = window(START - NS, START + 3600 * NS)
    evict(files)
    through_service(root, "", q, tmp_path / "split", split_bytes=300_000)
    direct_file(root, "", q, tmp_path / "dsplit", split_bytes=300_000)
    names = sorted(os.listdir(tmp_path / "dsplit"))
    assert sorted(os.listdir(tmp_path / "split")) == names and len(names) > 2
    for n in names:
        assert (tmp_path / "split" / n).read_bytes() == (tmp_path / "dsplit" / n).read_bytes()
    assert shared_reads
    evict(files)
    shared_reads.clear()
    through_service(root, "", q, tmp_path / "capped.pcap", max_bytes=500_000)
    want = direct_file(root, "", q, tmp_path / "dcapped.pcap", max_bytes=500_000)
    assert (tmp_path / "capped.pcap").read_bytes() == want and 0 < len(want) <= 500_000
    assert shared_reads


def test_region_is_sealed_against_the_client():
    """The client can neither write into the region nor resize it under the service."""
    a, b = socket.socketpair()
    with a, b:
        slots = SharedSlots(a, 1 << 20)
        slots.offer()
        size = slots.size
        head = wire.recv_header(b, "frame")
        assert head == (wire.SHARED, 8)
        _, fd = wire.recv_fd(b, 8, "frame")
        try:
            with pytest.raises(PermissionError):
                mmap.mmap(fd, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            mmap.mmap(fd, size, prot=mmap.PROT_READ).close()
        finally:
            os.close(fd)
            slots.close()


def test_reference_outside_the_region_is_refused(tmp_path):
    """A reference beyond the mapping is a protocol error, never a read out of bounds."""
    a, b = socket.socketpair()
    with a, b:
        slots = SharedSlots(a, 1 << 20)
        slots.offer()
        past = slots.size - 4095  # the last page, and one byte beyond
        wire.send(a, wire.REFS, past.to_bytes(8, "little") + (4096).to_bytes(8, "little"))
        wire.send_json(a, wire.TRAILER, {"packets": 0})
        with pytest.raises(wire.ProtocolError, match="outside the shared buffers"):
            client._receive(b, str(tmp_path / "o.pcap"))
        slots.close()


def test_free_now_takes_arrived_acknowledgements_without_waiting():
    """The engine reads ahead only into slots free at once: with every slot sent and none
    acknowledged it must not wait, and an acknowledgement already there frees one."""
    a, b = socket.socketpair()
    with a, b:
        slots = SharedSlots(a, 1 << 20, slots=2)
        for _ in range(2):
            k, whole = slots.acquire(4096)
            iov = np.array([[whole.ctypes.data, 4096]], np.uint64)
            assert slots.references(iov) is not None
            slots.release(k)
        a.settimeout(5)  # a wait for an acknowledgement would fail the test, not hang it
        assert not slots.free_now()
        wire.send(b, wire.ACK)
        assert slots.free_now()
        assert slots.free_now()  # still free; nothing more was read from the socket
        assert slots.acquire(4096) is not None
        slots.close()
