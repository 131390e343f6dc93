"""What -v reports: the counters both extraction paths keep, and the summary line.

One place for the line's wording, so that the engine and the numpy-free reader of small
results (records.py) report alike; no numpy here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet

EXIT_INCOMPLETE = 3  # documented in docs/EXTRACTION.md and npcapextract --help


@dataclass
class Stats:
    """What -v reports."""

    files_total: int = 0
    files_considered: int = 0
    skipped_timeline: int = 0
    skipped_summary: int = 0
    scanned_without_index: int = 0
    packets_read: int = 0
    bytes_read: int = 0
    packets_matched: int = 0
    # Records skipped because their stored header disagrees with the index, and files
    # skipped as unreadable: the result is incomplete (exit status 3).
    damaged_records: int = 0
    damaged_files: int = 0
    warnings: list[str] = field(default_factory=list)
    # Counting the files outside the window walks the whole timeline (months of slot
    # directories on a long-lived sensor): only when the count is shown.
    count_timeline: bool = True

    @classmethod
    def from_counts(cls, counts: dict) -> Stats:
        """The counters the extraction service sends in its trailer (unknown keys ignored:
        the service may be newer than this client)."""
        names = {f.name for f in fields(cls)} - {"warnings"}
        return cls(**{k: v for k, v in counts.items() if k in names})

    def exit_status(self, written: int) -> int:
        """npcapextract's exit status: 3 when damage left packets out (whatever was written,
        an operator must not take the result for complete), else 0 written, 1 nothing."""
        if self.damaged_records or self.damaged_files:
            return EXIT_INCOMPLETE
        return 0 if written else 1

    def count_files(self, ds: DumpSet, considered: int) -> None:
        """Count `considered` files of the window and, when shown, the timeline's others."""
        self.files_considered += considered
        if self.count_timeline:
            self.add_timeline(ds, considered)

    def add_timeline(self, ds: DumpSet, considered: int) -> None:
        """Count the timeline's files outside the window (walks the whole timeline)."""
        try:
            total = sum(
                1
                for _dirpath, _dirs, names in os.walk(ds.timeline)
                for n in names
                if timeline.is_pcap_name(n)
            )
        except OSError:
            total = considered
        self.files_total += total
        self.skipped_timeline += max(0, total - considered)

    def line(self, written: int, bytes_out: int, elapsed: float) -> str:
        """The -v summary on stderr."""
        return (
            f"files considered {self.files_considered}, skipped by timeline "
            f"{self.skipped_timeline}, skipped by summary {self.skipped_summary}, scanned "
            f"without index {self.scanned_without_index}; packets read {self.packets_read}, "
            f"matched {self.packets_matched}, written {written}; bytes read {self.bytes_read}, "
            f"bytes out {bytes_out}; elapsed {elapsed:.3f} s"
            + (f"; skipped as damaged: {self.damaged_records} records, {self.damaged_files} "
               "files" if self.damaged_records or self.damaged_files else "")
        )
