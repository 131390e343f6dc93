"""Compressed pcaps the fuzzer (tests/fuzzdumpset.py) found read wrong: a damaged frame read
partway, a seek table that lies about a frame's size. Each a test that failed before."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from fuzzdumpset import limit_memory
from recorderproc import tool

from pcapvault.index.compressed import FRAME_SIZE, CompressedReader, compress_file
from pcapvault.index.errors import FormatError
from pcapvault.index.pcapfile import PcapReader, pcap_bytes

T0 = 1_763_737_200_000_000_000


@pytest.fixture
def zst(tmp_path) -> tuple[Path, bytes]:
    """A compressed pcap of two frames of barely compressible packets, and its content."""
    rnd = random.Random(1)
    pcap = tmp_path / "x.pcap"
    pcap.write_bytes(pcap_bytes((T0 + i, rnd.randbytes(300)) for i in range(380)))
    z = tmp_path / "x.pcap.zst"
    compress_file(pcap, z)
    content = pcap.read_bytes()
    assert FRAME_SIZE < len(content) < 2 * FRAME_SIZE
    return z, content


def seek_table_entry(data: bytes, frame: int) -> int:
    """Where frame `frame`'s entry (compressed size, decompressed size) of the seek table is."""
    frames, desc = struct.unpack_from("<IB", data, len(data) - 9)
    entry = 12 if desc & 0x80 else 8
    return len(data) - 9 - frames * entry + frame * entry


def test_a_damaged_frame_is_never_read_as_good(zst):
    """zstd checks a frame's checksum at its end: a reader that stops before it (a record in
    the first half of the frame) got the damaged bytes as they came, silently."""
    z, content = zst
    data = bytearray(z.read_bytes())
    first_frame = struct.unpack_from("<I", data, seek_table_entry(data, 0))[0]
    data[first_frame // 2] ^= 0x10
    z.write_bytes(bytes(data))
    failed = 0
    with CompressedReader(z) as r:
        for at in range(0, FRAME_SIZE, 1024):
            try:
                assert r.pread(at, 1024) == content[at : at + 1024], at
            except FormatError as e:
                assert "damaged compressed data" in str(e)
                failed += 1
    assert failed


@pytest.mark.parametrize("frame, delta", [(0, -1), (0, 1), (1, -1), (1, -300)])
def test_a_seek_table_that_lies_about_a_frame_size(zst, frame, delta):
    """Positions come from the seek table: one byte less for the last frame dropped the last
    record as if the file were cut there, silently. A frame is now read only when it holds
    what its entry says (positions after a lying entry are shifted: the engine's check of
    every record header against the index skips and reports those records)."""
    z, content = zst
    data = bytearray(z.read_bytes())
    at = seek_table_entry(data, frame) + 4
    struct.pack_into("<I", data, at, struct.unpack_from("<I", data, at)[0] + delta)
    z.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="damaged compressed data"), PcapReader(z) as r:
        r.scan()
    with CompressedReader(z) as r, pytest.raises(FormatError, match="damaged compressed data"):
        r.pread(r.size - 100 if frame else 100, 100)


@pytest.mark.parametrize("tool_args", [["npcapindex", "-i", "{z}", "-o", "{z}.idx"],
                                       ["npcapdecompress", "-i", "{z}", "-o", "{z}.pcap"]])
def test_a_seek_table_claiming_gigabytes(zst, tool_args):
    """A frame said to hold 4 GiB: reading the whole file allocated that much up front
    (MemoryError and a traceback under a limit). Now one line naming the damage."""
    z, _ = zst
    data = bytearray(z.read_bytes())
    struct.pack_into("<I", data, seek_table_entry(data, 0) + 4, (1 << 32) - 1)
    z.write_bytes(bytes(data))
    argv = [tool(tool_args[0]), *(a.format(z=z) for a in tool_args[1:])]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, preexec_fn=limit_memory)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged seek table" in lines[0], r.stderr
    assert not os.path.exists(f"{z}.pcap")
