"""The plan of a query: which records of which stored files to read, and what is known of them.

Two strategies make it: the flow-table plan (flowplan.py: the index's flow table and packet
columns, numpy) and the address-postings plan (postingsplan.py: the posting lists of the
filter's addresses, without numpy). One reader and one output take it (engine.py, or
records.py for a small result written without numpy), so a query is answered the same way
whichever strategy found its records. No numpy here: the postings strategy fills the
sequences with lists, the flow-table strategy with arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.libpcap import Filter

from .report import Stats

Warn = Callable[[str], None]


@dataclass
class FilePlan:
    """The candidate records of one pcap, in capture order.

    `sure`: the index alone proves the record matches (no filter to run). The flow-table
    strategy knows each record's wire length and timestamp from the index's packet columns,
    so its plan holds exactly the records inside the window; the postings strategy does not
    (`wirelen` and `ts_ns` None): the reader takes them from the stored record headers, and
    `edge` marks the records in a block of the index's time table that the window cuts, whose
    own timestamp decides."""

    file: StoredFile
    rec: Sequence[int]  # record-header offsets in the pcap
    caplen: Sequence[int]
    sure: Sequence[bool]
    wirelen: Sequence[int] | None = None
    ts_ns: Sequence[int] | None = None
    edge: Sequence[bool] | None = None
    indexed: bool = True  # False: no usable index, `rec` came from a sequential scan

    def __len__(self) -> int:
        return len(self.rec)


class Planner(Protocol):
    """A strategy: one dump set opened for a query, planning its files one at a time."""

    path: str
    number: int  # which dump set of the request (the pcapng interface)
    ds: DumpSet
    linktype: int
    snaplen: int
    nanosecond: bool
    interface: str
    filter: Filter

    def files(self, begin_ns: int, end_ns: int, stats: Stats) -> list[StoredFile]:
        """The files to plan, in stored order; counts the ones the strategy left out."""
        ...

    def candidates(self, sf: StoredFile, begin_ns: int, end_ns: int, stats: Stats,
                   warn: Warn) -> FilePlan | None:
        """`sf`'s plan, or None when none of its records can match."""
        ...

    def announce(self, sf: StoredFile) -> None:
        """Ask the kernel now for what planning and opening `sf` will read (a hint), before
        the engine queues any record of the files planned before it."""
        ...
