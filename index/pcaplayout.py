"""The byte layout of the classic pcaps pcapvault writes: constants and header builders.

Apart from index/pcapfile.py (numpy, for reading and indexing whole files) so that the
host-query fast path (extract/records.py) writes its output header without importing numpy.
"""

from __future__ import annotations

import struct

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D

GLOBAL_HEADER_LEN = 24
RECORD_HEADER_LEN = 16
# Largest caplen any libpcap accepts (MAXIMUM_SNAPLEN); a larger value can only be garbage.
MAX_CAPLEN = 262144

_HEADER = struct.Struct("<IHHiIII")
# Linktype field: the low 26 bits are the link type, the rest FCS information (pcap spec).
LINKTYPE_MASK = 0x03FFFFFF


def global_header(linktype: int, snaplen: int, nanosecond: bool) -> bytes:
    """The 24-byte header of the little-endian version 2.4 pcaps pcapvault writes."""
    magic = MAGIC_NS if nanosecond else MAGIC_US
    return _HEADER.pack(magic, 2, 4, 0, 0, snaplen, linktype)


def record_header(ts_ns: int, caplen: int, wirelen: int, nanosecond: bool) -> bytes:
    """The 16-byte little-endian record header for one packet."""
    sec, frac = divmod(ts_ns, 1_000_000_000)
    if not nanosecond:
        frac //= 1000
    return struct.pack("<IIII", sec, frac, caplen, wirelen)


def snapshot(snaplen: int) -> int:
    """The longest record libpcap reads whole from a pcap whose header gives `snaplen` (0, or
    more than the largest, stands for the largest); it cuts a longer one to this length."""
    return snaplen if 0 < snaplen <= MAX_CAPLEN else MAX_CAPLEN


def is_own_header(head: bytes, linktype: int, nanosecond: bool, longest: int = 0) -> bool:
    """Whether `head` starts a pcap whose records read as the little-endian ones of this
    precision and link type, records of up to `longest` bytes whole: what the readers of an
    index's records without numpy check before trusting them (a damaged header makes
    libpcap refuse the file, or read it otherwise)."""
    if len(head) < GLOBAL_HEADER_LEN:
        return False
    magic, major, minor, _, _, snaplen, link = _HEADER.unpack_from(head)
    return (magic == (MAGIC_NS if nanosecond else MAGIC_US) and major == 2 and minor <= 4
            and link & LINKTYPE_MASK == linktype and longest <= snapshot(snaplen))
