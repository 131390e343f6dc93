"""Opening a dump set for reading, with one clear message when this user may not, and for a
query, with the filter compiled for its link type (`open_query`).

Needs neither numpy nor the index decoder: both query strategies (the flow-table plan,
flowplan.py, and the address postings, postingsplan.py) and the decision to go through the
PAM-gated service start here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.errors import DumpSetError, PcapVaultError
from pcapvault.index.libpcap import Filter, compile_filter


class AccessError(PcapVaultError):
    """The dump set exists but this user may not read it."""


def open_dumpset(path: str) -> DumpSet:
    """Open a dump set for reading, turning permission problems into one clear message."""
    try:
        ds = DumpSet.open(Path(path))
    except PermissionError:
        raise AccessError(_no_access(path)) from None
    tl = ds.timeline
    if not os.access(ds.root, os.R_OK | os.X_OK) or (
        tl.exists() and not os.access(tl, os.R_OK | os.X_OK)
    ):
        raise AccessError(_no_access(path))
    if not tl.is_dir():
        raise DumpSetError(f"{path}: the dump set has no timeline at {tl}; run npcaprepair")
    return ds


@dataclass
class QueryTarget:
    """One dump set opened for a query: what both strategies plan from."""

    ds: DumpSet
    linktype: int
    snaplen: int
    nanosecond: bool
    interface: str  # the pcapng interface name
    filter: Filter  # compiled for the dump set's link type


def open_query(path: str, expr: str, ds: DumpSet | None = None) -> QueryTarget:
    """Open the dump set at `path` (or take `ds`, opened already) and compile `expr` for it."""
    ds = open_dumpset(path) if ds is None else ds
    meta = ds.meta
    linktype = int(meta.get("linktype", 1))
    snaplen = int(meta.get("snaplen", 262144))
    return QueryTarget(ds, linktype, snaplen, ds.nanosecond,
                       str(meta.get("interface") or Path(path).name),
                       compile_filter(expr, linktype, max(snaplen, 65535)))


def _no_access(path: str) -> str:
    return (
        f"no permission to read dump set {path}; run as its owner or a member of its group, "
        "or extract through the PAM-gated service (npcapextract --service)"
    )
