"""The disk budget: the whole dump set stays under a size or a share of its filesystem.

Room is made *before* a file is opened, for the largest file the recorder may write plus its
index, so the limit holds at every moment, not only after a clean-up pass. Closed files the
indexer has not finished get room for their index (and compressed copy) too, but only as many
as a keeping-up indexer has in hand: a backlog beyond that (a slow or dead indexer) is
reported, never paid for by deleting recorded files. Deletion is oldest first; the file
being written is never in the candidate list because it still has its temporary name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.sizes import parse_size

log = logging.getLogger("pcapvault.recorder")

# An index is at most this share of its pcap; measured well below it (docs/BENCHMARKS.md, I1).
INDEX_RESERVE = 0.5
# Closed files a keeping-up indexer has in hand: the one it works on and the one just closed.
INDEXER_IN_HAND = 2
# Directories that exist whatever is deleted: a slot path and a storage directory.
FIXED_OVERHEAD = 8 * 4096
# The smallest --disk-limit: under it no dump set works, and a bare number meant as MB is caught.
MIN_LIMIT = 1 << 20


class BudgetError(PcapVaultError):
    """A bad limit, or one too small for the dump set to work."""


@dataclass(frozen=True)
class Limit:
    text: str
    bytes: int | None = None
    percent: float | None = None

    def resolve(self, path: os.PathLike | str) -> int:
        """The limit in bytes; a percentage is of the size of the filesystem holding `path`."""
        if self.bytes is not None:
            return self.bytes
        st = os.statvfs(path)
        return int(st.f_blocks * st.f_frsize * self.percent / 100)


def parse_limit(text: str) -> Limit:
    """A size (index/sizes.py) or a percentage of the filesystem, e.g. `80%`."""
    t = text.strip()
    if t.endswith("%"):
        try:
            pct = float(t[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise BudgetError(
                f"bad --disk-limit {text!r}: a percentage must be above 0% and at most 100%"
            )
        return Limit(text, percent=pct)
    return Limit(text, bytes=parse_size(t, "--disk-limit", MIN_LIMIT))


class DiskBudget:
    """Keeps `dumpset` under `limit`, given the largest file the recorder writes."""

    def __init__(self, dumpset: DumpSet, limit: Limit, max_file_bytes: int, copies: int = 1):
        """`copies` is 2 when a compressed copy of a file exists beside it for a while."""
        self.dumpset = dumpset
        self.limit = limit
        self.limit_bytes = limit.resolve(dumpset.root)
        self.reserve = int(max_file_bytes * (copies + INDEX_RESERVE))
        # What a closed, not yet indexed byte will still add: its index, and its compressed
        # copy while that exists beside it.
        self.pending_share = INDEX_RESERVE + copies - 1
        self.in_hand_bytes = INDEXER_IN_HAND * max_file_bytes
        if self.reserve + FIXED_OVERHEAD > self.limit_bytes:
            raise BudgetError(
                f"--disk-limit {limit.text} ({self.limit_bytes} bytes) cannot hold even one "
                f"{max_file_bytes}-byte file with its index; raise the limit or lower -p"
            )
        self.deleted_files = 0

    def usage(self) -> int:
        return self.dumpset.usage()

    def backlog(self, pending: int) -> int:
        """Bytes of closed files waiting for the indexer beyond what it normally has in hand."""
        return max(0, pending - self.in_hand_bytes)

    def make_room(self, pending: int = 0) -> int:
        """Delete oldest files until a new file of the reserved size fits; return usage.

        `pending` is the size of the closed files not yet indexed; room is kept for what they
        will add, up to what a keeping-up indexer has in hand (see the module docstring).
        """
        extra = int(min(pending, self.in_hand_bytes) * self.pending_share)
        used = self.usage()
        files = None
        while used + self.reserve + extra + FIXED_OVERHEAD > self.limit_bytes:
            if files is None:
                files = self.dumpset.files()
            if not files:
                break
            victim = files.pop(0)
            used -= self.dumpset.delete(victim)
            self.deleted_files += 1
            log.info("disk budget: deleted %s", victim.name)
        return used

    def free_oldest(self) -> bool:
        """On disk full: delete the oldest finished file. False when there is none."""
        files = self.dumpset.files()
        if not files:
            return False
        self.dumpset.delete(files[0])
        self.deleted_files += 1
        log.warning("disk full: deleted the oldest file %s to go on", files[0].name)
        return True
