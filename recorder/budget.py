"""The disk budget: the whole dump set stays under a size or a share of its filesystem.

Room is made *before* a file is opened, for the largest file the recorder may write plus its
index, so the limit holds at every moment, not only after a clean-up pass. Closed files the
indexer has not finished get room for their index (and compressed copy) too, but only as many
as a keeping-up indexer has in hand: a backlog beyond that (a slow or dead indexer) is
reported, never paid for by deleting recorded files. Deletion is oldest first; the file
being written is never in the candidate list because it still has its temporary name.

`--max-age` deletes, on top of the budget, the files whose last packet is older than the age.
Neither ever deletes a file under a legal hold (index/holds.py): when held files leave no room
for the next file, `held_full` says so and the recorder stops writing until room appears.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import FormatError, PcapVaultError
from pcapvault.index.holds import HoldWatcher, last_packet_ns
from pcapvault.index.sizes import parse_size
from pcapvault.index.times import format_time

log = logging.getLogger("pcapvault.recorder")

# An index is at most this share of its pcap; measured well below it (docs/BENCHMARKS.md).
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

    def __init__(self, dumpset: DumpSet, limit: Limit, max_file_bytes: int, copies: int = 1,
                 max_age_ns: int | None = None):
        """`copies` is 2 when a compressed copy of a file exists beside it for a while;
        `max_age_ns` is --max-age (None: files go only for room)."""
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
        self.max_age_ns = max_age_ns
        self.deleted_files = 0  # by the budget (and on disk full)
        self.expired_files = 0  # by --max-age
        self.held_full = False  # held files leave no room for the next file
        self.holds = HoldWatcher(dumpset)
        self.holds_damaged = False

    def keep(self) -> Callable[[StoredFile], bool]:
        """What may not be deleted now: the held files, or every file while the holds file
        cannot be read (said once, loudly: reading it as "no holds" could lose held data)."""
        try:
            hs = self.holds.current()
        except FormatError as e:
            if not self.holds_damaged:
                log.error("error: %s; deleting nothing until it is fixed", e)
            self.holds_damaged = True
            return lambda sf: True
        if self.holds_damaged:
            log.info("the holds file is readable again")
        self.holds_damaged = False
        return hs.holds

    def held_count(self) -> int:
        """Active holds (0 while the holds file is damaged)."""
        try:
            return len(self.holds.current().list())
        except FormatError:
            return 0

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
        held = 0
        while used + self.reserve + extra + FIXED_OVERHEAD > self.limit_bytes:
            if files is None:
                files, keep = self.dumpset.files(), self.keep()
            if not files:
                break
            victim = files.pop(0)
            # Asked first without the lock (cheap, while held files fill the budget), then
            # again under it by delete, for a hold placed meanwhile.
            freed = None if keep(victim) else self.dumpset.delete(victim, keep)
            if freed is None:
                held += 1
                continue
            used -= freed
            self.deleted_files += 1
            log.info("disk budget: deleted %s", victim.name)
        self.held_full = held > 0 and bool(
            used + self.reserve + extra + FIXED_OVERHEAD > self.limit_bytes)
        return used

    def expire(self, now_ns: int | None = None) -> int:
        """--max-age: delete, oldest first, the unheld files whose last packet is older than
        the age; return how many went. Only files named before the cut-off are looked at."""
        if self.max_age_ns is None:
            return 0
        cutoff = (time.time_ns() if now_ns is None else now_ns) - self.max_age_ns
        keep = self.keep()
        gone = 0
        for sf in self.dumpset.files():
            if sf.first_ns >= cutoff:
                break
            last = last_packet_ns(sf)
            if last is None or last >= cutoff:
                continue
            if self.dumpset.delete(sf, keep) is not None:
                gone += 1
                log.info("max age: deleted %s (last packet %s, older than the age)",
                         sf.name, format_time(last))
        self.expired_files += gone
        return gone

    def free_oldest(self) -> bool:
        """On disk full: delete the oldest unheld finished file. False when there is none."""
        keep = self.keep()
        for sf in self.dumpset.files():
            if self.dumpset.delete(sf, keep) is not None:
                self.deleted_files += 1
                log.warning("disk full: deleted the oldest file %s to go on", sf.name)
                return True
        return False
