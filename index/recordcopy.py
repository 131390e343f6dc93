"""Writing a chosen subset of packets as the records of a pcap pcapvault writes.

Two tools rewrite packets: `npcapmanage delete` keeps the records of a stored file that were
not selected, and `npcapimport` turns other tools' captures (any byte order or precision,
pcapng) into the dump set's own pcaps. Both know where each packet's bytes are and what its
header says; this module moves the bytes with one vectorised copy per batch (index/bytecopy.py)
and writes the little-endian record headers in the precision asked for.
"""

from __future__ import annotations

import numpy as np

from .bytecopy import copy_pieces, window
from .pcaplayout import RECORD_HEADER_LEN

# Records per batch: bounds the temporary arrays (a few dozen bytes a record) on huge files.
_BATCH = 1 << 18


def record_sizes(caplen: np.ndarray) -> np.ndarray:
    """Bytes each record takes in a pcap (header and data), as int64."""
    return np.asarray(caplen, dtype=np.int64) + RECORD_HEADER_LEN


def build_pcap(
    head: bytes, src: np.ndarray, data_offset: np.ndarray, caplen: np.ndarray,
    wirelen: np.ndarray, ts_ns: np.ndarray, nanosecond: bool,
) -> np.ndarray:
    """A whole pcap: the global header `head`, then the records of the packets whose bytes are
    at `data_offset` of `src`, in one allocation (files are rewritten whole, in memory).

    Timestamps are written in nanoseconds or, when not `nanosecond`, truncated to
    microseconds.
    """
    sizes = record_sizes(caplen)
    out = np.empty(len(head) + int(sizes.sum()), dtype=np.uint8)
    out[: len(head)] = np.frombuffer(head, np.uint8)
    put_records(out, len(head) + np.cumsum(sizes) - sizes, src, data_offset, caplen, wirelen,
                ts_ns, nanosecond)
    return out


def put_records(
    out: np.ndarray, at: np.ndarray, src: np.ndarray, data_offset: np.ndarray,
    caplen: np.ndarray, wirelen: np.ndarray, ts_ns: np.ndarray, nanosecond: bool,
) -> None:
    """Write the records of the packets at `data_offset` of `src` at offsets `at` of `out`
    (packets of several buffers interleaved in one output take one call per buffer)."""
    at = np.asarray(at, dtype=np.int64)
    data_offset = np.asarray(data_offset, dtype=np.int64)
    caplen = np.asarray(caplen, dtype=np.int64)
    for lo in range(0, len(at), _BATCH):
        hi = min(lo + _BATCH, len(at))
        sec, frac = np.divmod(np.asarray(ts_ns[lo:hi], dtype=np.int64), 1_000_000_000)
        if not nanosecond:
            frac //= 1000
        hdr = np.empty((hi - lo, 4), dtype="<u4")
        hdr[:, 0] = sec
        hdr[:, 1] = frac
        hdr[:, 2] = caplen[lo:hi]
        hdr[:, 3] = wirelen[lo:hi]
        window(out, RECORD_HEADER_LEN)[at[lo:hi]] = hdr.view(
            np.dtype((np.void, RECORD_HEADER_LEN)))[:, 0]
        n = caplen[lo:hi]
        some = n > 0
        if some.any():
            copy_pieces(src, data_offset[lo:hi][some], out, (at[lo:hi] + RECORD_HEADER_LEN)[some],
                        n[some])
