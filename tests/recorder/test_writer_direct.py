"""recorder/writer.py on real filesystems: O_DIRECT writes, alignment, the tail, a filesystem
that refuses O_DIRECT, and a full disk (loop-mounted ext4 the test creates and removes)."""

from __future__ import annotations

import logging
import os
import struct
import subprocess

import pytest
from fsutil import fill

from pcapvault.index.pcapfile import global_header
from pcapvault.recorder.writer import ALIGN, CHUNK, DiskFullError, PcapFileWriter

HEADER = global_header(1, 65535, True)


@pytest.fixture(autouse=True)
def fresh_direct_state(monkeypatch):
    """O_DIRECT refusal is remembered per process; every test starts without it."""
    monkeypatch.setattr(PcapFileWriter, "direct_refused", False)


def records(total: int, seed: int = 1) -> list[bytes]:
    """Pcap records of varied odd sizes adding up to about `total` bytes."""
    out, n, i = [], 0, 0
    while n < total:
        size = 60 + (i * 7919 + seed) % 1455
        rec = struct.pack("<IIII", i, 0, size, size) + bytes([i % 251]) * size
        out.append(rec)
        n += len(rec)
        i += 1
    return out


def opened_direct(fd: int) -> bool:
    flags = next(line for line in open(f"/proc/self/fdinfo/{fd}") if line.startswith("flags"))
    return bool(int(flags.split()[1], 8) & os.O_DIRECT)


def test_direct_writes_and_an_unaligned_tail(small_ext4):
    path = small_ext4 / "a.pcap"
    recs = records(2 * CHUNK + 12345)
    w = PcapFileWriter(path, HEADER)
    assert w.direct and opened_direct(w.fd)
    for r in recs:
        w.write(r)
    want = HEADER + b"".join(recs)
    assert len(want) % ALIGN  # the tail goes through the page cache at close
    assert w.close() == len(want)
    assert path.read_bytes() == want
    assert not PcapFileWriter.direct_refused


def test_flush_aligned_writes_only_whole_pages(small_ext4):
    path = small_ext4 / "b.pcap"
    w = PcapFileWriter(path, HEADER)
    recs = records(3 * ALIGN + 100)
    for r in recs:
        w.write(r)
    staged = w.size
    w.flush_aligned()
    w.idle.wait()
    assert os.stat(path).st_size == staged - staged % ALIGN
    assert w.fill == staged % ALIGN
    more = records(5000, seed=2)
    for r in more:
        w.write(r)
    w.close()
    assert path.read_bytes() == HEADER + b"".join(recs + more)


def test_a_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path, caplog):
    d = tmp_path / "ramfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(d)], check=True)
    try:
        recs = records(CHUNK + 999)
        with caplog.at_level(logging.WARNING, "pcapvault.recorder"):
            for name in ("c1.pcap", "c2.pcap"):
                w = PcapFileWriter(d / name, HEADER)
                assert not w.direct
                for r in recs:
                    w.write(r)
                w.close()
                assert (d / name).read_bytes() == HEADER + b"".join(recs)
        assert len([m for m in caplog.messages if "refuses O_DIRECT" in m]) == 1
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_disk_full_keeps_only_complete_records(small_ext4):
    room = small_ext4 / "room"
    room.write_bytes(b"\0" * (CHUNK + (512 << 10)))
    fill(small_ext4)
    room.unlink()  # room for the first staging buffer, not for the second
    path = small_ext4 / "d.pcap"
    recs = records(2 * CHUNK + 5000)
    calls = []
    w = PcapFileWriter(path, HEADER, on_full=lambda: calls.append(1) and False)
    with pytest.raises(DiskFullError, match="disk full while writing d.pcap"):
        for r in recs:
            w.write(r)
        w.close()
    if w.thread.is_alive():  # raised by a write: close cuts the file back and says so again
        with pytest.raises(DiskFullError):
            w.close()
    assert calls
    data = path.read_bytes()
    want = HEADER + b"".join(recs)
    ends = {len(HEADER)}
    for r in recs:
        ends.add(max(ends) + len(r))
    # Cut back to the last record wholly inside the first buffer written.
    assert len(data) == max(e for e in ends if e <= CHUNK)
    assert data == want[: len(data)]


def test_disk_full_goes_on_once_space_is_freed(small_ext4):
    filler = fill(small_ext4)
    path = small_ext4 / "e.pcap"
    recs = records(CHUNK + 5000)
    freed = []

    def on_full() -> bool:
        if filler.exists():
            filler.unlink()
            freed.append(1)
            return True
        return False

    w = PcapFileWriter(path, HEADER, on_full=on_full)
    for r in recs:
        w.write(r)
    w.close()
    assert freed == [1]
    assert path.read_bytes() == HEADER + b"".join(recs)
