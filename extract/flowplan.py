"""The flow-table plan (a strategy of plan.py): which packets of a dump set are worth reading,
from the timeline, then the index summary, then the index rows.

Three levels, cheapest first, each never opening more than the one before needed:

1. the timeline names the files whose time span overlaps the window (no file is opened);
2. a file's index header and distinct-flow table (a few KB) skip files that lie outside the
   window or have no flow row that can match (see flowmatch);
3. the per-packet columns keep the packets inside the window whose flow row can match; only
   those are read from the pcap, and libpcap confirms each of them.

A file without a usable index is scanned sequentially instead, with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pcapvault.index.compressed import is_compressed
from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.libpcap import Filter
from pcapvault.index.pcaplayout import GLOBAL_HEADER_LEN, RECORD_HEADER_LEN

from .access import AccessError, open_dumpset, open_query
from .flowmatch import MAYBE, NO, YES, FlowMatcher
from .plan import FilePlan, Warn
from .readahead import PCAP_HEAD, will_need, will_need_index
from .report import Stats

if TYPE_CHECKING:
    from concurrent.futures import Future

    from pcapvault.index.indexfile import PacketIndex




class _LoadedIndex:
    """An index file's bytes and their decoding, or the error either raised (re-raised where
    the caller can handle it, as if it had loaded the file itself)."""

    def __init__(self, sf: StoredFile, packets: bool):
        from pcapvault.index.indexfile import decode_index, index_bytes

        self._data: bytes | None = None
        self._size = 0
        self._idx: PacketIndex | None = None
        self._data_error: BaseException | None = None
        self._index_error: BaseException | None = None
        try:
            # Up to the postings frames only: the engine never uses them.
            self._data, self._size = index_bytes(sf.index)
        except PcapVaultError as e:
            try:
                os.stat(sf.index)
            except OSError as missing:
                self._data_error = missing
            else:
                self._data, self._index_error = b"", e
            return
        try:
            # The packet columns right away when the last file had candidates (see Source).
            self._idx = decode_index(self._data, str(sf.index), packets=packets,
                                     file_size=self._size)
        except (PcapVaultError, ValueError) as e:
            self._index_error = e

    def data(self) -> tuple[bytes, int]:
        """The index's bytes up to its postings frames, and the file's size."""
        if self._data_error is not None:
            raise self._data_error
        assert self._data is not None
        return self._data, self._size

    def index(self) -> PacketIndex:
        if self._index_error is not None:
            raise self._index_error
        assert self._idx is not None
        return self._idx


class _IndexAhead:
    """The window's index files read and decoded on a thread, a couple of files ahead.

    Reading a file's index (cold: a disk read) and decoding its packet columns (zstd, then
    numpy) take about as long as deciding its flow rows; file reads, zstd and numpy's large
    operations release the GIL, so with a second core the next index is ready when the
    current file's decisions are done. Bounded to AHEAD files, so a query over months of
    files holds a few decoded indexes, not all of them.
    """

    AHEAD = 2

    def __init__(self, files: list[StoredFile], packets: Callable[[], bool]):
        from concurrent.futures import ThreadPoolExecutor

        self._files = files
        self._next = 0
        self._packets = packets
        self._pending: dict[Path, Future[_LoadedIndex]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="index-ahead")
        self._fill()

    def _fill(self) -> None:
        while self._next < len(self._files) and len(self._pending) < self.AHEAD:
            sf = self._files[self._next]
            self._next += 1
            self._pending[sf.index] = self._pool.submit(_LoadedIndex, sf, self._packets())

    def take(self, sf: StoredFile) -> _LoadedIndex | None:
        """`sf`'s loaded index, waiting for it if needed; None if it was never announced."""
        fut = self._pending.pop(sf.index, None)
        self._fill()
        return None if fut is None else fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pending.clear()


class Source:
    """One dump set (one interface) prepared for a query, planned from its flow tables."""

    def __init__(self, path: str, number: int, expr: str, ds: DumpSet | None = None):
        self.path = path
        self.number = number
        self.target = t = open_query(path, expr, ds)
        self.ds = t.ds
        self.linktype = t.linktype
        self.snaplen = t.snaplen
        self.nanosecond = t.nanosecond
        self.interface = t.interface
        self.filter: Filter = t.filter
        self.matcher = FlowMatcher(self.filter)
        # Whether the last file had candidates: then the next one probably has too, and its
        # summary is not decoded on its own first (a file skipped by its summary saves the
        # packet columns, one with matches pays for the summary twice).
        self._last_matched: bool | None = None  # None: no file decided yet
        self._ahead: _IndexAhead | None = None

    def files(self, begin_ns: int, end_ns: int, stats: Stats) -> list[StoredFile]:
        """Files of the window, from the timeline only; counts the ones left out.

        Their indexes start loading on a thread at once, in this order (see _IndexAhead)."""
        found = self.ds.files_in_window(begin_ns, end_ns)
        if self._ahead is not None:
            self._ahead.close()
        self._ahead = _IndexAhead(found, lambda: self._last_matched is not False)
        stats.count_files(self.ds, len(found))
        return found

    def announce(self, sf: StoredFile) -> None:
        """The index's decoded sections and the pcap's header page."""
        will_need_index(sf.index)
        will_need(sf.pcap, 0, PCAP_HEAD)

    def candidates(
        self, sf: StoredFile, begin_ns: int, end_ns: int, stats: Stats, warn: Warn
    ) -> FilePlan | None:
        """The packets of `sf` to read, or None when the index proves none can match."""
        from pcapvault.index.indexfile import decode_index

        name = str(sf.index)
        loaded = self._ahead.take(sf) if self._ahead is not None else None
        if loaded is None:  # not announced by files(): load it now
            loaded = _LoadedIndex(sf, bool(self._last_matched))
        try:
            data, index_size = loaded.data()  # once: the summary, then the packet columns
        except FileNotFoundError:
            warn(f"{sf.pcap}: no index; scanning the pcap sequentially")
            return self._scan(sf, begin_ns, end_ns, stats, warn)
        except OSError as e:
            warn(f"{sf.pcap}: index unusable ({name}: {e.strerror}); scanning the pcap "
                 "sequentially")
            return self._scan(sf, begin_ns, end_ns, stats, warn)
        try:
            idx = summary = loaded.index()
            if summary.count and not covers_name(summary, sf):
                raise PcapVaultError(
                    f"another file's: its packets span {summary.first_ns}..{summary.last_ns} "
                    f"ns, this file starts at {sf.first_ns} ns"
                )
            if summary.count == 0 or summary.last_ns < begin_ns or summary.first_ns >= end_ns:
                stats.skipped_summary += 1
                return None
            inside = begin_ns <= summary.first_ns and summary.last_ns < end_ns
            if inside:
                # Every row has packets in the window: decide them all first, and skip the
                # packet columns when none can match.
                dec = self.matcher.decide(summary.flows)
                self._last_matched = bool((dec != NO).any())
                if not self._last_matched:
                    stats.skipped_summary += 1
                    return None
            if not idx.has_packets:
                idx = decode_index(data, name, packets=True, file_size=index_size)
        except (PcapVaultError, ValueError) as e:
            warn(f"{sf.pcap}: index unusable ({e}); scanning the pcap sequentially")
            return self._scan(sf, begin_ns, end_ns, stats, warn)
        if not is_compressed(sf.pcap):
            try:
                size = os.stat(sf.pcap).st_size
            except OSError as e:
                warn(f"{sf.pcap}: unreadable, skipped ({e.strerror})")
                stats.damaged_files += 1
                return None
            if size < idx.pcap_size:
                warn(
                    f"{sf.pcap}: truncated at byte {size} (its index describes "
                    f"{idx.pcap_size}); extracting the complete records before it"
                )
        ts = idx.ts_ns
        flow = idx.flow
        if inside:
            pdec = dec[flow]
            keep = pdec != NO
        else:
            # A file the window cuts: decide only the rows of its packets inside the window.
            keep = (ts >= begin_ns) & (ts < end_ns)
            present = np.zeros(len(summary.flows), bool)
            present[flow[keep]] = True
            rows = np.flatnonzero(present)
            dec = np.full(len(summary.flows), NO, np.int8)
            dec[rows] = self.matcher.decide(summary.flows[rows])
            pdec = dec[flow]
            keep &= pdec != NO
        sel = np.flatnonzero(keep)
        self._last_matched = bool(len(sel))
        if not len(sel):
            stats.skipped_summary += 1
            return None
        rec = idx.offset[sel].astype(np.int64)
        caplen = idx.caplen[sel].astype(np.int64)
        ends = rec[:-1] + RECORD_HEADER_LEN + caplen[:-1]
        if rec[0] < GLOBAL_HEADER_LEN or (rec[1:] < ends).any():
            # Only a damaged index (checksums recomputed) has them; reading would fail.
            warn(f"{sf.pcap}: index unusable (entries overlap or lie before the first record); "
                 "scanning the pcap sequentially")
            return self._scan(sf, begin_ns, end_ns, stats, warn)
        return FilePlan(sf, rec, caplen, pdec[sel] == YES,
                        wirelen=idx.wirelen[sel].astype(np.int64), ts_ns=ts[sel])

    def _scan(
        self, sf: StoredFile, begin_ns: int, end_ns: int, stats: Stats, warn: Warn
    ) -> FilePlan | None:
        from pcapvault.index.pcapfile import PcapReader

        stats.scanned_without_index += 1
        try:
            with PcapReader(sf.pcap) as r:
                table = r.scan()
        except (PcapVaultError, OSError) as e:
            warn(f"{sf.pcap}: unreadable, skipped ({e})")
            stats.damaged_files += 1
            return None
        if table.torn:
            warn(
                f"{sf.pcap}: truncated after byte {table.complete_end}; "
                "extracting what is complete"
            )
        ts = table.ts_ns.astype(np.int64)
        sel = np.flatnonzero((ts >= begin_ns) & (ts < end_ns))
        if not len(sel):
            return None
        return FilePlan(
            sf,
            table.offset.astype(np.int64)[sel],
            table.caplen.astype(np.int64)[sel],
            np.zeros(len(sel), dtype=bool) | self.filter.matches_everything,
            wirelen=table.wirelen.astype(np.int64)[sel],
            ts_ns=ts[sel],
            indexed=False,
        )


def covers_name(idx: PacketIndex, sf: StoredFile) -> bool:
    """Whether the index's time span fits the file's name (StoredFile.named_for)."""
    return sf.named_for(idx.first_ns, idx.last_ns)


__all__ = [
    "MAYBE", "NO", "YES", "AccessError", "FilePlan", "Source", "Stats", "Warn", "open_dumpset",
]
