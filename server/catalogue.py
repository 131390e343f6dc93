"""What a fleet's flow catalogue pulls from a sensor: /api/v1/catalogue (docs/API.md).

`npcapfleet sync` (fleet/, docs/FLEET.md) asks each sensor for the files indexed since its
last sync, each with its per-file conversation summaries, and for the names of every file the
dump set still holds (so the catalogue drops the deleted ones). A file's identity is its dump
set and name; its index's modification time orders the files (a file indexed again, after
`npcapmanage delete` or `npcaprepair`, comes again and replaces its rows).

The cursor is the last (index mtime, name) a page holds. A page that ends the list hands back
at most "a minute ago" instead: an index written just before a sync may be linked into the
timeline only after it, so the last minute is always asked again (the catalogue replaces a
file's rows, so a file sent twice counts once).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

from pcapvault.extract.access import open_dumpset
from pcapvault.extract.conversations import FILE_FIELDS, file_conversations
from pcapvault.index.builder import IPV6_EXTENSIONS
from pcapvault.index.dumpset import StoredFile
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.indexfile import index_bytes, parse_header

SETTLE_NS = 60 * 10**9  # what a finished page's cursor leaves to be asked again
WORK_S = 10.0  # an answer stops taking files after this much work (clients time out)
PAGE_ROWS = 500_000  # ... or once it holds this many conversations (the client's memory)
# The three views libpcap's primitives take of a row's packets (docs/FLEET.md): untagged
# IPv4, and IPv6 with the transport header first, where the row's addresses, ports and
# protocol decide every primitive; IPv6 with extension headers first, where only the
# addresses do (libpcap's port and protocol tests do not walk them); and IP inside VLAN or
# other tags, where no primitive without `vlan` looks.
_EXT = " or ".join(f"ip6[6] == {n}" for n in IPV6_EXTENSIONS)
VIEWS = {"ip": f"ip or (ip6 and not ({_EXT}))", "ip6ext": f"ip6 and ({_EXT})",
         "tagged": "not (ip or ip6)"}
_CURSOR = re.compile(r"^(\d{1,20})/(.{0,255})$")


class CursorError(ValueError):
    """A cursor this server did not give."""


@dataclass(frozen=True, order=True)
class Cursor:
    """The last file a page held, by (index mtime, name); files after it come next."""

    mtime_ns: int = -1
    name: str = ""

    def __str__(self) -> str:
        return f"{self.mtime_ns}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        if not text:
            return cls()
        m = _CURSOR.match(text)
        if not m:
            raise CursorError(f"bad cursor {text[:40]!r}: give the cursor of the previous "
                              "answer, or none to start from the oldest file")
        return cls(int(m.group(1)), m.group(2))


def page(path: str, since: Cursor, limit: int, now_ns: int, work_s: float = WORK_S,
         max_rows: int = PAGE_ROWS) -> dict:
    """The files of the dump set at `path` indexed after `since` (oldest index first, at
    most `limit`, and no more once `work_s` seconds went into them or they hold `max_rows`
    conversations: at least one) with their conversations, the names of all its files, the
    next cursor and whether more files wait."""
    t0 = time.monotonic()
    ds = open_dumpset(path)
    files = ds.files_in_window(0, 1 << 62)  # the timeline's: what extraction sees
    after: list[tuple[Cursor, StoredFile]] = []
    for sf in files:
        try:
            key = Cursor(os.stat(sf.index).st_mtime_ns, sf.name)
        except FileNotFoundError:
            continue  # not indexed yet: its index comes with a later mtime
        if key > since:
            after.append((key, sf))
    after.sort(key=lambda pair: pair[0])
    described: list[tuple[Cursor, dict]] = []
    rows = 0
    for key, sf in after[:limit]:
        if described and (time.monotonic() - t0 > work_s or rows >= max_rows):
            break
        described.append((key, describe(path, sf, key.mtime_ns)))
        rows += len(described[-1][1]["conversations"]["first_ns"])
    more = len(after) > len(described)
    cursor = described[-1][0] if described else since
    if not more:
        cursor = max(since, min(cursor, Cursor(now_ns - SETTLE_NS, "")))
    meta = ds.meta
    return {
        "dumpset": path,
        "interface": str(meta.get("interface") or os.path.basename(path)),
        "linktype": int(meta.get("linktype", 1)),
        "snaplen": int(meta.get("snaplen", 262144)),
        "nanosecond": ds.nanosecond,
        "files": [d for _, d in described],
        "names": [sf.name for sf in files],
        "cursor": str(cursor),
        "more": more,
    }


def describe(path: str, sf: StoredFile, mtime_ns: int) -> dict:
    """One file: its span, packets and conversations as columns (FILE_FIELDS and `view`,
    which of VIEWS each row is in)."""
    warnings: list[str] = []
    parts = [(view, file_conversations(path, sf, expr, warnings.append))
             for view, expr in VIEWS.items()]
    columns = {k: [v for _, t in parts for v in t.columns[k]] for k in FILE_FIELDS}
    columns["view"] = [view for view, t in parts for _ in t.columns["first_ns"]]
    try:
        h = parse_header(index_bytes(sf.index)[0], str(sf.index))
        first, last, packets = h.first_ns, h.last_ns, h.count
    except (PcapVaultError, ValueError):  # read from the pcap: the rows' span
        first = min(columns["first_ns"], default=sf.first_ns)
        last = max(columns["last_ns"], default=sf.first_ns)
        # (a record cut before its link header's end matches neither filter)
        packets = sum(t.packets for _, t in parts)
    return {"name": sf.name, "first_ns": first, "last_ns": last, "index_mtime_ns": mtime_ns,
            "packets": packets, "conversations": columns, "warnings": sorted(set(warnings))}
