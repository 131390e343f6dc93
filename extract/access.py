"""Opening a dump set for reading, with one clear message when this user may not.

Needs neither numpy nor the index decoder: both extraction paths (engine and hostquery.py)
and the decision to go through the PAM-gated service start here.
"""

from __future__ import annotations

import os
from pathlib import Path

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.errors import DumpSetError, PcapVaultError


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


def _no_access(path: str) -> str:
    return (
        f"no permission to read dump set {path}; run as its owner or a member of its group, "
        "or extract through the PAM-gated service (npcapextract --service)"
    )
