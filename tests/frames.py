"""Frames built field by field, the tcpdump test corpus, and tcpdump as the oracle, for the
index builder's and the postings' tests."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pcapvault.index.indexfile import (
    address_bytes,
)
from pcapvault.index.pcapfile import parse_global_header, scan_records

CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus/tcpdump-tests"


needs_corpus = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"tcpdump test corpus not found at {CORPUS}"
)


needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not found")


MAC = bytes.fromhex("020000000001020000000002")


def eth(ethertype: int, payload: bytes, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    head = MAC
    for tpid, vid in tags:
        head += struct.pack(">HH", tpid, vid)
    return head + struct.pack(">H", ethertype) + payload


def ipv4(proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "192.168.1.2",
         frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    return (
        struct.pack(">BBHHHBBH", 0x40 | ihl, 0, 20 + len(options) + len(payload), 1, frag, 64,
                    proto, 0)
        + address_bytes(src)[12:] + address_bytes(dst)[12:] + options + payload
    )


def ipv6(nh: int, payload: bytes, src: str = "2001:db8::1", dst: str = "2001:db8::2") -> bytes:
    return (struct.pack(">IHBB", 0x60000000, len(payload), nh, 64) + address_bytes(src)
            + address_bytes(dst) + payload)


def ports(sport: int, dport: int, rest: int = 16) -> bytes:
    return struct.pack(">HH", sport, dport) + bytes(rest)


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.pcap"))


def tcpdump_select(pcap: Path, expr: str) -> np.ndarray:
    """Record numbers tcpdump selects with `expr` (records are stamped with their number)."""
    out = subprocess.run(
        ["tcpdump", "-n", "-r", str(pcap), "-w", "-", expr],
        capture_output=True, check=True, timeout=60,
    ).stdout
    t = scan_records(out, parse_global_header(out, "tcpdump output"))
    return (t.ts_ns // 1_000_000_000).astype(np.int64)
