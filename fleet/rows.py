"""Conversations in the catalogue's canonical form, and the tables made from them.

A sensor names a conversation's ends A and B (A sent its first packet); the catalogue keeps
them as the lower and the higher end (address mapped to IPv6, then port), so that rows of
many files and sensors add up by key. `Merged` sums such rows, from the catalogue's SQL or
from sensors' /api/v1/conversations answers, and gives back the tables npcapflows and
npcapserve give (extract/conversations.py's FIELDS): A is again the end whose first packet
came first, the lower end when both came at once.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

BIG = (1 << 63) - 1
_MAPPED = 0xFFFF << 32  # ::ffff:0:0, the IPv4-mapped prefix


# Both conversions are cached: a sync or a merge meets the same hosts in thousands of rows,
# and parsing and printing addresses was most of its time (docs/BENCHMARKS.md, F3).
@lru_cache(maxsize=1 << 17)
def _parsed(text: str) -> tuple[ipaddress.IPv6Address, int, int]:
    """(the address as stored, its IP version, its value as stored); ValueError for text
    that is no address, TypeError for what is not text."""
    a = ipaddress.ip_address(text)
    if a.version == 4:
        value = _MAPPED | int(a)
        return ipaddress.IPv6Address(value), 4, value
    return a, 6, int(a)


def mapped(text: str) -> ipaddress.IPv6Address:
    """An address as the catalogue stores it (IPv4 mapped into IPv6)."""
    return _parsed(text)[0]


@lru_cache(maxsize=1 << 17)
def shown(a: ipaddress.IPv6Address, ipver: int) -> str:
    """The address a person reads: IPv4 again for an IPv4 packet's (an IPv6 packet's
    `::ffff:` address stays IPv6, as Wireshark shows it)."""
    return str(a.ipv4_mapped or a) if ipver == 4 else str(a)


@dataclass
class Row:
    """One conversation (of a file, or summed) with its ends in canonical order."""

    protocol: str
    ported: bool
    ipver: int
    lo: ipaddress.IPv6Address
    port_lo: int
    hi: ipaddress.IPv6Address
    port_hi: int
    packets_lo_hi: int
    bytes_lo_hi: int
    packets_hi_lo: int
    bytes_hi_lo: int
    first_ns: int
    last_ns: int
    first_lo_ns: int  # the lower end's first packet (BIG: not known to be earlier)
    first_hi_ns: int

    def key(self) -> tuple:
        return (self.protocol, self.ported, self.ipver, self.lo, self.port_lo, self.hi,
                self.port_hi)

    @property
    def a_is_lo(self) -> bool:
        return self.first_lo_ns <= self.first_hi_ns


# A sensor's conversations as columns (/api/v1/catalogue's), in this order, and the
# catalogue's canonical columns made from them (`canonical`). The sensor's side of the
# same names is extract/conversations.py's FILE_FIELDS; not imported from there, which
# would load numpy and the whole table code into every npcapfleet command (0.14 s), for a
# list of names the fleet's tests against real sensors hold to it.
SENSOR_COLUMNS = ("address_a", "port_a", "address_b", "port_b", "protocol", "packets_a_to_b",
                  "bytes_a_to_b", "packets_b_to_a", "bytes_b_to_a", "first_ns", "last_ns")
CANONICAL_COLUMNS = ("protocol", "ported", "ipver", "addr_lo", "port_lo", "addr_hi", "port_hi",
                     "packets_lo_hi", "bytes_lo_hi", "packets_hi_lo", "bytes_hi_lo",
                     "first_ns", "last_ns", "a_is_lo")


def canonical(c: dict[str, list]) -> dict[str, list]:
    """Conversations as a sensor names them (SENSOR_COLUMNS: lists of equal length; A sent
    the first packet; ports None without ports) as the catalogue keeps them
    (CANONICAL_COLUMNS). A column at a time: a catalogue page holds hundreds of thousands
    of rows. ValueError or TypeError for values no sensor sends."""
    cols = [c[k] for k in SENSOR_COLUMNS]
    n = len(cols[0])
    if any(len(col) != n for col in cols):
        raise ValueError("columns of different lengths")
    a_s, pa, b_s, pb, proto, *counts = cols
    for col in counts:
        if not all(type(v) is int and 0 <= v < 1 << 63 for v in col):
            raise ValueError("a count or time that is no number")
    if not all(type(p) is str for p in proto):
        raise TypeError("a protocol that is not text")
    a = [_parsed(t) for t in a_s]
    b = [_parsed(t) for t in b_s]
    ported = [p is not None for p in pa]
    if ported != [p is not None for p in pb] or not all(
            type(p) is int and 0 <= p <= 0xFFFF for p in (*pa, *pb) if p is not None):
        raise ValueError("a port that is none")
    pa = [p or 0 for p in pa]
    pb = [p or 0 for p in pb]
    a_lo = [(x[2], p) <= (y[2], q) for x, p, y, q in zip(a, pa, b, pb, strict=True)]

    def pick(x: list, y: list) -> list:
        return [u if lo else v for u, v, lo in zip(x, y, a_lo, strict=True)]

    ab, ba = counts[0:2], counts[2:4]
    return {
        "protocol": proto, "ported": ported, "ipver": [x[1] for x in a],
        "addr_lo": pick([x[0] for x in a], [y[0] for y in b]), "port_lo": pick(pa, pb),
        "addr_hi": pick([y[0] for y in b], [x[0] for x in a]), "port_hi": pick(pb, pa),
        "packets_lo_hi": pick(ab[0], ba[0]), "bytes_lo_hi": pick(ab[1], ba[1]),
        "packets_hi_lo": pick(ba[0], ab[0]), "bytes_hi_lo": pick(ba[1], ab[1]),
        "first_ns": counts[4], "last_ns": counts[5], "a_is_lo": a_lo,
    }


def rows_of(c: dict[str, list]) -> list[Row]:
    """Canonical columns as Rows (to be summed by Merged)."""
    return [Row(p, pt, v, lo, plo, hi, phi, n1, b1, n2, b2, first, last,
                first if alo else BIG, BIG if alo else first)
            for p, pt, v, lo, plo, hi, phi, n1, b1, n2, b2, first, last, alo
            in zip(*(c[k] for k in CANONICAL_COLUMNS), strict=True)]


def table_columns(rows: list[dict]) -> dict[str, list]:
    """Rows of npcapserve's /api/v1/conversations as SENSOR_COLUMNS (KeyError, TypeError
    for rows no sensor sends)."""
    c: dict[str, list] = {k: [r[k] for r in rows] for k in SENSOR_COLUMNS[:-2]}
    c["first_ns"] = [r["start_ns"] for r in rows]
    c["last_ns"] = [r["start_ns"] + round(r["duration_s"] * 1e9) for r in rows]
    return c


class Merged:
    """Conversations summed by key."""

    def __init__(self) -> None:
        self.rows: dict[tuple, Row] = {}

    def add(self, r: Row) -> None:
        old = self.rows.get(r.key())
        if old is None:
            self.rows[r.key()] = r
            return
        old.packets_lo_hi += r.packets_lo_hi
        old.bytes_lo_hi += r.bytes_lo_hi
        old.packets_hi_lo += r.packets_hi_lo
        old.bytes_hi_lo += r.bytes_hi_lo
        old.first_ns = min(old.first_ns, r.first_ns)
        old.last_ns = max(old.last_ns, r.last_ns)
        old.first_lo_ns = min(old.first_lo_ns, r.first_lo_ns)
        old.first_hi_ns = min(old.first_hi_ns, r.first_hi_ns)

    def conversations(self) -> list[dict]:
        """Rows of extract/conversations.py's FIELDS["conversation"], unsorted."""
        out = []
        for r in self.rows.values():
            ends = [(shown(r.lo, r.ipver), r.port_lo), (shown(r.hi, r.ipver), r.port_hi)]
            there = (r.packets_lo_hi, r.bytes_lo_hi)
            back = (r.packets_hi_lo, r.bytes_hi_lo)
            if not r.a_is_lo:
                ends.reverse()
                there, back = back, there
            out.append({
                "address_a": ends[0][0], "port_a": ends[0][1] if r.ported else None,
                "address_b": ends[1][0], "port_b": ends[1][1] if r.ported else None,
                "protocol": r.protocol,
                "packets_a_to_b": there[0], "bytes_a_to_b": there[1],
                "packets_b_to_a": back[0], "bytes_b_to_a": back[1],
                "packets": there[0] + back[0], "bytes": there[1] + back[1],
                "start_ns": r.first_ns, "duration_s": (r.last_ns - r.first_ns) / 1e9})
        return out


def table(conversations: list[dict], by: str) -> list[dict]:
    """The conversations as the `by` table (conversation, endpoint or port), unsorted; the
    endpoints and ports as extract/conversations.py counts them from the same packets."""
    if by == "conversation":
        return conversations
    if by == "endpoint":
        ends: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        for c in conversations:
            for src, dst, p, b in ((c["address_a"], c["address_b"], c["packets_a_to_b"],
                                    c["bytes_a_to_b"]),
                                   (c["address_b"], c["address_a"], c["packets_b_to_a"],
                                    c["bytes_b_to_a"])):
                if p:
                    ends[src][0] += p
                    ends[src][1] += b
                    ends[dst][2] += p
                    ends[dst][3] += b
        return [{"address": a, "packets": v[0] + v[2], "bytes": v[1] + v[3], "tx_packets": v[0],
                 "tx_bytes": v[1], "rx_packets": v[2], "rx_bytes": v[3]}
                for a, v in ends.items()]
    ports: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
    for c in conversations:
        if c["port_a"] is None:
            continue
        v = ports[(c["protocol"], min(c["port_a"], c["port_b"]))]
        v[0] += c["packets"]
        v[1] += c["bytes"]
        v[2] += 1
    return [{"protocol": p, "port": n, "packets": v[0], "bytes": v[1], "conversations": v[2]}
            for (p, n), v in ports.items()]


def top(rows: list[dict], sort: str, limit: int | None) -> list[dict]:
    """The first `limit` rows by `sort` descending (ties in a fixed order: by the row)."""
    ordered = sorted(rows, key=lambda r: (-r[sort], tuple(str(v) for v in r.values())))
    return ordered[:limit] if limit else ordered
