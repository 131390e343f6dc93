"""Index files for the tests: a sample index, other format versions, checksums and postings
sections."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from pcapvault.index.indexfile import (
    FLAG_ADDRS,
    ZSTD_LEVEL,
    PacketIndex,
    address_array,
    empty_flows,
    summary_size,
)
from pcapvault.index.postings import (
    HEADER_LEN,
    HEADER_LEN_V2,
    parse_header,
)
from pcapvault.index.zstdlib import zstd

T0 = 1_763_737_200_000_000_000


def sample_index(n: int = 1000, seed: int = 1) -> PacketIndex:
    """A consistent index with irregular gaps, snapped lengths and a few flows."""
    rng = np.random.default_rng(seed)
    caplen = rng.integers(0, 1600, n).astype(np.uint32)
    gaps = np.where(rng.random(n) < 0.1, rng.integers(1, 100, n), 0)
    offset = 24 + np.cumsum(np.concatenate(([0], caplen[:-1].astype(np.int64) + 16)) + gaps)
    flows = empty_flows(5)
    flows["ethertype"] = [0x0800, 0x0800, 0x86DD, 0x0806, 0x8100]
    flows["ipver"][:3] = [4, 4, 6]
    flows["proto"][:3] = [6, 17, 58]
    flows["flags"][:3] = FLAG_ADDRS
    flows["src"][0] = address_array("10.0.0.1")
    flows["dst"][2] = address_array("2001:db8::7")
    flow = rng.integers(0, 5, n).astype(np.uint32)
    ts = T0 + np.cumsum(rng.integers(-50, 10_000, n))
    return PacketIndex(
        nanosecond=True, linktype=1, count=n, first_ns=int(ts.min()), last_ns=int(ts.max()),
        pcap_size=int(offset[-1]) + 16 + int(caplen[-1]) if n else 24, flows=flows,
        flow_packets=np.bincount(flow, minlength=5).astype(np.uint32),
        ts_ns=ts, offset=offset.astype(np.uint64), caplen=caplen,
        wirelen=caplen + rng.integers(0, 3, n).astype(np.uint32) * 100, flow=flow,
    )


def crc_end(data: bytes) -> int:
    """Where the header's checksum ends: at the postings frames of a version 3 to 5 file (taken
    from the raw header fields, whatever the version says), at the end of an older one."""
    if struct.unpack_from("<H", data, 8)[0] < 3 or len(data) < 80:
        return len(data)
    (summary, packets), (directory,) = struct.unpack_from("<II", data, 52), struct.unpack_from(
        "<I", data, 64)
    return 80 + directory + summary + packets


def with_crc(data: bytes) -> bytes:
    """Recompute the checksum after a deliberate change, to reach the checks behind it."""
    crc = zlib.crc32(data[64 : crc_end(data)], zlib.crc32(data[:60]))
    return data[:60] + struct.pack("<I", crc) + data[64:]


def as_version(data: bytes, version: int) -> bytes:
    """A version 5 file as the same index written by version 4 (no time bins in the
    directory), 3 (also the summary without the per-flow totals), or 1 or 2 (also a 64-byte
    header and no postings)."""
    h = parse_header(data, "x")
    summary = zstd.decompress(data[h.summary_offset : h.packets_offset])
    summary = zstd.compress(summary[: summary_size(h.nflows, version)], ZSTD_LEVEL)
    packets = data[h.packets_offset : h.frames_offset]
    head = bytearray(data[: HEADER_LEN if version >= 3 else HEADER_LEN_V2])
    struct.pack_into("<H", head, 8, version)
    struct.pack_into("<I", head, 52, len(summary))
    if version < 3:
        return with_crc(bytes(head) + summary + packets)
    directory = data[h.header_len : h.summary_offset]
    if version < 5:
        directory = directory[: len(directory) - h.bins_len]
        struct.pack_into("<I", head, 64, len(directory))
        struct.pack_into("<I", head, 76, zlib.crc32(directory))
    return with_crc(bytes(head) + directory + summary + packets + data[h.frames_offset :])


def with_postings(data: bytes, directory: bytes, keys: int, frames: bytes) -> bytes:
    """`data` (a version 3 to 5 file) with other postings, header fields and checksums made to
    match them: to reach the checks behind the checksums."""
    h = parse_header(data, "x")
    head = bytearray(data[:80])
    struct.pack_into("<IIII", head, 64, len(directory), keys, len(frames), zlib.crc32(directory))
    return with_crc(bytes(head) + directory + data[h.summary_offset : h.frames_offset] + frames)
