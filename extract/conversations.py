"""Who talked to whom, on which ports, how much, when: tables and traffic volume of a window,
computed from the indexes (docs/EXTRACTION.md, "Conversations and volume").

Every file's index holds each packet's time, wire length and flow row, so a table needs no
pcap byte when the filter is decided by the flow rows alone (flowmatch: YES or NO). The
packets of YES rows in the window are summed per flow row, per file, with numpy; the rows of
all files are then grouped into conversations, endpoints or service ports. A file the window
holds whole needs not even its packet columns when its index (version 4) carries each flow
row's totals and the filter decides every row: its YES rows' totals are the sums.

Rows the index cannot decide (MAYBE: a filter on TCP flags or payload bytes) are read through
the one extraction pipeline (engine.extract, libpcap confirming every packet), and the matched
packets are keyed by the index builder's own parser, so they land on the same flow rows.
Only those rows' candidates are read; the table then says so (`read_packets`). A file whose
index is unusable is read whole, as npcapextract reads it, with a warning.

The result is exactly what tshark's Conversations and Endpoints tables give over the packets
npcapextract writes for the same window and filter (tests/extract/test_conversations.py).
"""

from __future__ import annotations

import functools
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcapvault.index.builder import distinct_rows, hash_groups, hash_rows, index_records
from pcapvault.index.compressed import is_compressed
from pcapvault.index.dumpset import DumpSet, StoredFile
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.indexfile import (
    FIRST_TOTALS_VERSION,
    FLAG_ADDRS,
    FLAG_PORTS,
    FLOW_DTYPE,
    IndexHeader,
    PacketIndex,
    TimeBins,
    address_text,
    decode_index,
    decode_times,
    flow_totals,
    index_bytes,
    parse_header,
    read_bins,
    take_flows,
)
from pcapvault.index.pcapfile import PcapHeader, RecordTable
from pcapvault.index.pcaplayout import RECORD_HEADER_LEN
from pcapvault.index.times import NS, TimeError

from . import engine
from .access import QueryTarget, open_query
from .flowmatch import MAYBE, NO, YES, FlowMatcher
from .flowplan import Source, Stats, covers_name
from .output import Batch
from .plan import FilePlan
from .readahead import warm_indexes
from .request import Request

Warn = Callable[[str], None]

BY = ("conversation", "endpoint", "port")  # the tables: FIELDS below
SORT = ("bytes", "packets")
MAX_STEPS = 100_000  # volume bins of one request: a day at one-second steps fits
# The longest volume step (about 146 years): a step's start, begin + k * step in int64 ns,
# must not overflow, and a window of one longer step would
MAX_STEP_NS = 1 << 62
PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 51: "ah",
             58: "icmpv6", 132: "sctp", 136: "udplite"}
# The fields of each table's rows, in order (CSV columns, docs/EXTRACTION.md).
FIELDS = {
    "conversation": ["address_a", "port_a", "address_b", "port_b", "protocol",
                     "packets_a_to_b", "bytes_a_to_b", "packets_b_to_a", "bytes_b_to_a",
                     "packets", "bytes", "start_ns", "duration_s"],
    "endpoint": ["address", "packets", "bytes", "tx_packets", "tx_bytes", "rx_packets",
                 "rx_bytes"],
    "port": ["protocol", "port", "packets", "bytes", "conversations"],
}
_BIG = np.iinfo(np.int64).max
_SMALL = np.iinfo(np.int64).min


class TableError(PcapVaultError):
    """A table or volume request the caller got wrong (unknown `by` or `sort`, bad limit or
    step): the server answers it with 400."""


def _no_warning(message: str) -> None:
    """The default `warn`: a caller that wants the warnings passes its own."""


@dataclass
class Table:
    """One table of `conversations`: JSON-ready as it is (npcapflows --json, the server)."""

    by: str  # "conversation" | "endpoint" | "port"
    rows: list[dict]  # JSON-ready, sorted by `sort` descending, at most `limit`
    total_rows: int  # before the limit
    packets: int  # totals of the matching traffic in the window
    bytes: int
    read_packets: bool  # the filter needed packet bytes: candidates were read (say so)
    sort: str = "bytes"
    begin_ns: int = 0
    end_ns: int = 0
    warnings: list[str] = field(default_factory=list)


# One file's conversations as the fleet's catalogue takes them (FileTable.columns).
FILE_FIELDS = ["address_a", "port_a", "address_b", "port_b", "protocol", "packets_a_to_b",
               "bytes_a_to_b", "packets_b_to_a", "bytes_b_to_a", "first_ns", "last_ns"]


@dataclass
class FileTable:
    """One file's conversations as columns (FILE_FIELDS, lists of equal length: a page of
    the catalogue holds tens of thousands of rows, and a dict per row was most of its cost),
    with the totals of its matching traffic."""

    columns: dict[str, list]
    packets: int
    bytes: int


@dataclass
class Volume:
    """Traffic per step of a window: step i covers [begin_ns + i step_ns, + step_ns)."""

    begin_ns: int
    step_ns: int
    packets: list[int]
    bytes: list[int]  # wire lengths (frame lengths on the wire)
    read_packets: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Packets:
    """Matching packets of one file (or one read batch) and the flow rows they belong to."""

    flows: np.ndarray  # FLOW_DTYPE table
    flow: np.ndarray | None  # per packet: its row in `flows` (None: a count's lean read)
    ts_ns: np.ndarray
    wirelen: np.ndarray
    keyed: _Keys | None = None  # of `flows`, when made ahead

    def totals(self) -> tuple[int, int]:
        return len(self.ts_ns), int(self.wirelen.sum())

    def rows(self) -> _Rows:
        assert self.flow is not None  # tables never read lean
        return _Rows(self.flows, *flow_totals(self.flow, len(self.flows), self.ts_ns,
                                              self.wirelen), keyed=self.keyed)


@dataclass
class _Rows:
    """Matching traffic of one file summed per flow row: from its packets, or from its index's
    per-flow totals when the window holds the file whole (see _Matches)."""

    flows: np.ndarray  # FLOW_DTYPE table
    packets: np.ndarray  # per row of `flows`, int64
    bytes: np.ndarray
    first: np.ndarray  # earliest and latest timestamp
    last: np.ndarray
    keyed: _Keys | None = None  # of `flows`, when made ahead

    def totals(self) -> tuple[int, int]:
        return int(self.packets.sum()), int(self.bytes.sum())


@dataclass
class _Binned:
    """Every packet of one file, as its index's time bins (version 5): for a count whose
    steps the bins fit (see _Want.bins)."""

    bins: TimeBins

    def totals(self) -> tuple[int, int]:
        return int(self.bins.packets.sum()), int(self.bins.bytes.sum())


@dataclass
class _Keys:
    """The flow rows of a table that count (IP packets with addresses), each as its six
    words with what a direction of a conversation leaves out masked (VLAN tags, ethertype,
    flags but the ports'; ports unless known), and their hashes: rows of one direction
    have equal words (_direction_keys makes the grouped rows' keys). Made on the decoding
    threads, so the calling thread only selects and groups."""

    rows: np.ndarray  # the rows that count, ascending
    keys: np.ndarray  # (len(rows), 6) uint64: the masked words
    hashes: np.ndarray
    size: int  # rows in the table

    @classmethod
    def of(cls, flows: np.ndarray) -> _Keys:
        words = np.ascontiguousarray(flows).view("<u8").reshape(-1, 6)
        ipver = words[:, 0] >> np.uint64(48) & np.uint64(0xFF)
        ip = (ipver == 4) | (ipver == 6)
        ip &= words[:, 1] & np.uint64(FLAG_ADDRS) != 0
        rows = np.flatnonzero(ip)
        keys = words.copy() if len(rows) == len(words) else words[rows]  # often all of them
        keys[:, 0] &= np.uint64(0xFFFF << 48)  # ipver, proto
        keys[:, 1] &= np.uint64(0xFFFF_FFFF_0000 | FLAG_PORTS)  # sport, dport, ports known
        keys[:, 1] *= keys[:, 1] & np.uint64(FLAG_PORTS)  # FLAG_PORTS is 1: ports or none
        return cls(rows, keys, hash_rows(keys.T), len(flows))

    def take(self, sel: np.ndarray) -> _Keys:
        """The keys of the table flows[sel] (sel ascending)."""
        at = np.searchsorted(self.rows, sel)
        at[at == len(self.rows)] = 0
        mine = self.rows[at] == sel if len(self.rows) else np.zeros(len(sel), bool)
        return _Keys(np.flatnonzero(mine), self.keys[at[mine]], self.hashes[at[mine]],
                     len(sel))

    def used(self, packets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, keys, hashes) of the counting rows with packets."""
        some = packets[self.rows] > 0
        if some.all():
            return self.rows, self.keys, self.hashes
        return self.rows[some], self.keys[some], self.hashes[some]


_Part = _Packets | _Rows | _Binned
_Sink = Callable[[_Part], None]


@dataclass(frozen=True)
class _Want:
    """What a table or a count needs of each file's index."""

    whole: Callable[[int, int], bool]  # a file inside the window with this span: its totals
    keyed: bool = False  # its flow rows' _Keys, made on the decoding threads (tables)
    lean: bool = False  # the filter takes every packet: times and lengths alone (volume)
    # lean too: whether a file's time bins of this width (ns) each fall inside one step
    # (volume), so that a file the window holds whole is counted from its index's directory
    bins: Callable[[int], bool] | None = None


def conversations(req: Request, by: str = "conversation", sort: str = "bytes",
                  limit: int | None = None, warn: Warn = _no_warning,
                  sets: list[DumpSet] | None = None) -> Table:
    """The conversations (Wireshark's Conversations table), endpoints or service ports of
    the traffic of `req`'s window that matches its filter, summed over its dump sets (or
    `sets`, the same dump sets opened already: the extraction service's, resolved once)."""
    if by not in BY:
        raise TableError(f"unknown table {by!r}: choose one of {', '.join(BY)}")
    if sort not in SORT:
        raise TableError(f"unknown sort {sort!r}: choose bytes or packets")
    if limit is not None and limit < 0:
        raise TableError(f"bad limit {limit}: give a number of rows, 0 or more")
    return _table(req, by, sort, limit, warn, sets)


def _table(req: Request, by: str, sort: str, limit: int | None, warn: Warn,
           sets: list[DumpSet] | None = None) -> Table:
    warnings: list[str] = []
    flows, scan = _flows(req, _keeping(warnings, warn), sets)
    table, total = {"conversation": _conversation_rows, "endpoint": _endpoint_rows,
                    "port": _port_rows}[by](flows, sort, limit)
    return Table(by, table, total, scan.packets, scan.bytes, scan.read_packets, sort,
                 req.begin_ns, req.end_ns, warnings)


def _flows(req: Request, warn: Warn, sets: list[DumpSet] | None = None,
           only: str | None = None) -> tuple[_Flows, _Matches]:
    """Every flow row of the window's matching traffic with its totals, and the scan that
    found them (its packets, bytes and whether it read packets)."""
    scan = _Matches(req, warn, _Want(lambda first, last: True, keyed=True), sets, only)
    rows = _RowTotals()
    scan.run(rows.add)
    return rows.finish(), scan


def volume(req: Request, step_ns: int, warn: Warn = _no_warning) -> Volume:
    """Packets and wire bytes of the matching traffic per step of `req`'s window, the first
    step starting at its begin (the last one may reach past its end)."""
    if not 0 < step_ns <= MAX_STEP_NS:
        raise TableError(f"bad step {step_ns} ns: give a step above zero and at most "
                         f"{MAX_STEP_NS} ns")
    span = max(req.end_ns - req.begin_ns, 0)
    steps = -(-span // step_ns)
    if steps > MAX_STEPS:
        raise TableError(f"a step of {step_ns / 1e9:g} s cuts the window into {steps} steps; "
                         f"give a longer step (at most {MAX_STEPS} steps)")
    packets = np.zeros(steps, np.int64)
    wire = np.zeros(steps, np.int64)

    def step(ts_ns: np.ndarray | int) -> np.ndarray | int:
        return (ts_ns - req.begin_ns) // step_ns

    def add(p: _Part) -> None:
        if isinstance(p, _Binned):  # its bins fit the steps (_Want.bins)
            t = p.bins
            k = step(t.start_ns + t.width_ns * np.arange(len(t.packets), dtype=np.int64))
            np.add.at(packets, k, t.packets.astype(np.int64))
            np.add.at(wire, k, t.bytes.astype(np.int64))
            return
        if isinstance(p, _Rows):  # a file inside one step: its rows' totals
            k, n, w = step(p.first), p.packets, p.bytes
        else:
            ts, n, w = p.ts_ns, None, p.wirelen
            if len(ts) and (ts[1:] >= ts[:-1]).all():  # in time order: cut at the steps
                k0, k1 = step(int(ts[0])), step(int(ts[-1]))
                cuts = np.searchsorted(ts, req.begin_ns + step_ns * np.arange(k0 + 1, k1 + 1))
                starts = np.concatenate(([0], cuts))
                count = np.diff(starts, append=len(ts))
                sums = np.add.reduceat(w, starts, dtype=np.int64)
                sums[count == 0] = 0  # reduceat gives an empty step its next packet
                packets[k0 : k1 + 1] += count
                wire[k0 : k1 + 1] += sums
                return
            k = step(ts)
        packets[:] += np.bincount(k, weights=n, minlength=steps).astype(np.int64)
        wire[:] += np.bincount(k, weights=w, minlength=steps).astype(np.int64)

    warnings: list[str] = []
    lean = not req.filter.strip()
    # Bins are whole seconds (or powers of two of them): off the seconds none can fit, and
    # no directory is read for them.
    fits = lean and req.begin_ns % NS == 0 and step_ns % NS == 0
    scan = _Matches(req, _keeping(warnings, warn),
                    _Want(lambda first, last: step(first) == step(last), lean=lean,
                          bins=(lambda width: req.begin_ns % width == 0 and step_ns % width == 0)
                          if fits else None))
    scan.run(add)
    return Volume(req.begin_ns, step_ns, packets.tolist(), wire.tolist(), scan.read_packets,
                  warnings)


def _keeping(warnings: list[str], warn: Warn) -> Warn:
    """`warn`, also keeping each message for the result (the server returns them)."""

    def both(message: str) -> None:
        warnings.append(message)
        warn(message)

    return both


# ---------------------------------------------------------------------------------------------
# The matching packets, from the index where it decides them, else read


class _Matches:
    """The packets of a request's window that match its filter, handed to a sink per file
    (decided by the index) or per read batch (MAYBE rows, files without a usable index).

    A file the window holds whole whose packets' span [first, last] `whole` accepts is
    handed over as its rows' totals instead, when its index has them (version 4) and decides
    every row: its packet columns are never decoded.

    Every dump set is opened and the filter compiled for it before any file is looked at, so
    a bad filter or an unreadable dump set fails at once."""

    def __init__(self, req: Request, warn: Warn, want: _Want, sets: list[DumpSet] | None = None,
                 only: str | None = None):
        if req.begin_ns > req.end_ns:
            raise TimeError("the window's begin is after its end")
        self.req = req
        self.warn = warn
        self.want = want
        self.only = only  # the name of the one pcap to look at (a file's own table)
        self.targets: list[QueryTarget] = [
            open_query(p, req.filter, ds)
            for p, ds in zip(req.dumpsets, sets or [None] * len(req.dumpsets), strict=True)]
        self.read_packets = False
        self.packets = 0
        self.bytes = 0

    def run(self, sink: _Sink) -> None:
        def counted(p: _Part) -> None:
            packets, wire = p.totals()
            self.packets += packets
            self.bytes += wire
            sink(p)

        b, e = self.req.begin_ns, self.req.end_ns
        warm_indexes(self.req.dumpsets, b, e)  # the disk reads every index while we decode
        for number, (path, t) in enumerate(zip(self.req.dumpsets, self.targets, strict=True)):
            matcher = FlowMatcher(t.filter)
            unsure: dict[Path, bool] = {}  # pcap -> read it whole (True) or its MAYBE rows
            files = [sf for sf in t.ds.files_in_window(b, e)
                     if self.only is None or sf.pcap.name == self.only]
            for sf, loaded in _indexes(files, b, e, self.want):
                if isinstance(loaded, PcapVaultError):
                    self.warn(f"{sf.pcap}: index unusable ({loaded}); reading the pcap")
                    unsure[sf.pcap] = True
                    continue
                try:
                    p, maybe = self._decided(sf, loaded, matcher)
                except (PcapVaultError, ValueError) as err:  # its packet section, read late
                    self.warn(f"{sf.pcap}: index unusable ({err}); reading the pcap")
                    unsure[sf.pcap] = True
                    continue
                if maybe:
                    unsure[sf.pcap] = False
                if p is not None and p.totals()[0]:
                    counted(p)
            if unsure:
                self.read_packets = True
                _read(_Unsure(path, number, self.req.filter, t, unsure), b, e, counted,
                      self.warn)

    def _decided(self, sf: StoredFile, loaded: _Loaded, matcher: FlowMatcher
                 ) -> tuple[_Part | None, bool]:
        """The packets of `sf` in the window whose rows the index decides YES (or their
        rows' totals), and whether some of the window's packets are MAYBE (to be read)."""
        b, e = self.req.begin_ns, self.req.end_ns
        idx = loaded.idx
        if idx.count == 0 or idx.last_ns < b or idx.first_ns >= e:
            return None, False
        if not covers_name(idx, sf):
            # npcapextract scans such a file (flowplan.Source.candidates): so do we.
            self.warn(f"{sf.pcap}: index unusable (another file's); reading the pcap")
            return None, True
        inside = b <= idx.first_ns and idx.last_ns < e
        if loaded.lean:  # every packet counts: only the window and a pcap cut short matter
            end = self._pcap_end(sf, idx)
            if end is None and loaded.bins is not None:
                return _Binned(loaded.bins), False
            if end is None:
                ts = idx.ts_ns
                sel = slice(None) if inside else np.flatnonzero((ts >= b) & (ts < e))
                return _Packets(idx.flows, None, ts[sel], idx.wirelen[sel]), False
            idx = loaded.with_packets()
        keep = None
        if inside:
            dec = matcher.decide(idx.flows)
        else:
            keep = (idx.ts_ns >= b) & (idx.ts_ns < e)
            present = np.zeros(len(idx.flows), bool)
            present[idx.flow[keep]] = True
            rows = np.flatnonzero(present)
            dec = np.full(len(idx.flows), NO, np.int8)
            dec[rows] = matcher.decide(idx.flows[rows])
        if not (dec != NO).any():
            return None, False
        end = self._pcap_end(sf, idx)
        if not idx.has_packets:  # inside, with totals (see _load)
            if end is None and not (dec == MAYBE).any():
                if (dec == YES).all():
                    return _Rows(idx.flows, idx.flow_packets.astype(np.int64),
                                 idx.flow_bytes.astype(np.int64), idx.flow_first_ns,
                                 idx.flow_last_ns, loaded.keyed), False
                yes = np.flatnonzero(dec == YES)
                return _Rows(take_flows(idx.flows, yes), idx.flow_packets[yes].astype(np.int64),
                             idx.flow_bytes[yes].astype(np.int64), idx.flow_first_ns[yes],
                             idx.flow_last_ns[yes], loaded.keyed and loaded.keyed.take(yes)
                             ), False
            idx = loaded.with_packets()
        ts, flow = idx.ts_ns, idx.flow
        pdec = dec[flow]
        yes = pdec == YES
        maybe = pdec == MAYBE
        if keep is not None:
            yes &= keep
            maybe &= keep
        if end is not None:
            whole = idx.offset.astype(np.int64) + RECORD_HEADER_LEN + idx.caplen <= end
            yes &= whole
            maybe &= whole
        if yes.all():  # every packet, as for an empty filter over a file inside the window
            return _Packets(idx.flows, flow, ts, idx.wirelen, loaded.keyed), bool(maybe.any())
        sel = np.flatnonzero(yes)
        return (_Packets(idx.flows, flow[sel], ts[sel], idx.wirelen[sel], loaded.keyed),
                bool(maybe.any()))

    def _pcap_end(self, sf: StoredFile, idx: PacketIndex) -> int | None:
        """Where a pcap cut short ends (its complete records are counted, as npcapextract
        writes them), None for a whole one; a missing pcap counts nothing, as there."""
        if is_compressed(sf.pcap):
            return None
        try:
            size = os.stat(sf.pcap).st_size
        except OSError as e:
            self.warn(f"{sf.pcap}: unreadable, skipped ({e.strerror})")
            return 0
        if size >= idx.pcap_size:
            return None
        self.warn(f"{sf.pcap}: truncated at byte {size} (its index describes {idx.pcap_size}); "
                  "counting the complete records before it")
        return size


@dataclass
class _Loaded:
    """A file's decoded index; without its packet columns when its totals may do, then with
    the bytes to decode them from if the filter or the pcap asks for them after all."""

    idx: PacketIndex
    name: str
    keyed: _Keys | None
    data: bytes | None = None
    size: int = 0
    lean: bool = False  # idx has its header's fields and the times and lengths alone
    bins: TimeBins | None = None  # lean, from the directory: idx has no times either

    def with_packets(self) -> PacketIndex:
        if self.data is None:  # only the directory was read (bins)
            self.data, self.size = index_bytes(self.name)
        return decode_index(self.data, self.name, packets=True, file_size=self.size)


def _load(sf: StoredFile, begin_ns: int, end_ns: int, want: _Want) -> _Loaded | PcapVaultError:
    """`sf`'s index, checksum verified: its summary, and its packet columns unless the
    window holds the file whole, `want.whole` accepts its span and its index has the
    per-flow totals (version 4), which may then answer for it (the filter is decided later,
    on the calling thread: FlowMatcher's cache is not for threads). When every packet counts
    (`want.lean`), the packets' times and lengths alone, not even the flow table."""
    name = str(sf.index)
    try:
        if want.bins is not None:
            got = read_bins(sf.index)
            if got is not None:
                h, bins = got
                if (h.count and begin_ns <= h.first_ns and h.last_ns < end_ns
                        and want.bins(bins.width_ns)):
                    return _Loaded(_header_only(h), name, None, lean=True, bins=bins)
        data, size = index_bytes(sf.index)
        h = parse_header(data, name)
        if (h.version >= FIRST_TOTALS_VERSION and h.count and begin_ns <= h.first_ns
                and h.last_ns < end_ns and want.whole(h.first_ns, h.last_ns)):
            idx = decode_index(data, name, packets=False, file_size=size)
            return _Loaded(idx, name, _Keys.of(idx.flows) if want.keyed else None, data, size)
        if want.lean:
            idx = _header_only(h)
            idx.ts_ns, idx.wirelen = decode_times(data, name, size)
            return _Loaded(idx, name, None, data, size, lean=True)
        idx = decode_index(data, name, file_size=size)
        return _Loaded(idx, name, _Keys.of(idx.flows) if want.keyed else None)
    except (PcapVaultError, ValueError) as e:
        return PcapVaultError(str(e))


def _header_only(h: IndexHeader) -> PacketIndex:
    """An index with its header's fields alone (no flow table, no packet columns)."""
    return PacketIndex(h.nanosecond, h.linktype, h.count, h.first_ns, h.last_ns, h.pcap_size,
                       np.zeros(0, FLOW_DTYPE), np.zeros(0, np.uint32), version=h.version)


def _indexes(files: list[StoredFile], begin_ns: int, end_ns: int,
             want: _Want, ahead: int = 3
             ) -> Iterator[tuple[StoredFile, _Loaded | PcapVaultError]]:
    """Each file with its decoded index (or why it is unusable), decoded on a thread a couple
    of files ahead: zstd and numpy release the GIL, so the next index decodes while this one's
    packets are summed (bounded, so months of files hold a few indexes, not all)."""
    with ThreadPoolExecutor(2, thread_name_prefix="flows-index") as pool:
        pending: deque[tuple[StoredFile, Future]] = deque()
        rest = iter(files)
        for sf in rest:
            pending.append((sf, pool.submit(_load, sf, begin_ns, end_ns, want)))
            if len(pending) >= ahead:
                break
        while pending:
            sf, fut = pending.popleft()
            nxt = next(rest, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_load, nxt, begin_ns, end_ns, want)))
            yield sf, fut.result()


class _Unsure(Source):
    """A dump set as the extraction engine sees it, narrowed to what the index left open:
    the files named in `unsure`, each whole (True: its index is unusable) or only its
    candidates the index could not prove (the YES ones were counted from the index)."""

    def __init__(self, path: str, number: int, expr: str, t: QueryTarget,
                 unsure: dict[Path, bool]):
        super().__init__(path, number, expr, t.ds)
        self._unsure = unsure

    def files(self, begin_ns: int, end_ns: int, stats: Stats) -> list[StoredFile]:
        return [sf for sf in self.ds.files_in_window(begin_ns, end_ns)
                if sf.pcap in self._unsure]

    def candidates(self, sf: StoredFile, begin_ns: int, end_ns: int, stats: Stats,
                   warn: Warn) -> FilePlan | None:
        c = super().candidates(sf, begin_ns, end_ns, stats, warn)
        if c is None or self._unsure[sf.pcap] or not c.indexed:
            return c
        keep = ~c.sure
        if not keep.any():
            return None
        return FilePlan(c.file, c.rec[keep], c.caplen[keep], c.sure[keep],
                        wirelen=c.wirelen[keep], ts_ns=c.ts_ns[keep], indexed=c.indexed)


class _Keyed:
    """The extraction engine's consumer: every confirmed packet keyed by the index builder's
    parser (the flow rows an index of these packets would hold)."""

    full = False
    takes_file_runs = None
    shared = None

    def __init__(self, linktype: int, snaplen: int, sink: _Sink):
        self.header = PcapHeader(True, linktype, snaplen)
        self.sink = sink

    def reader_gone(self) -> bool:
        return False  # the caller reads what it asked for

    def write(self, b: Batch) -> None:
        assert b.buf is not None  # takes_file_runs is None: the engine reads every record
        records = RecordTable(b.rec.astype(np.uint64), b.ts_ns, b.caplen.astype(np.uint32),
                              b.wirelen.astype(np.uint32), len(b.buf), False)
        idx = index_records(b.buf, self.header, records)
        self.sink(_Packets(idx.flows, idx.flow, b.ts_ns.copy(), b.wirelen.copy()))


def _read(src: _Unsure, begin_ns: int, end_ns: int, sink: _Sink, warn: Warn) -> None:
    out = _Keyed(src.linktype, src.snaplen, sink)
    engine.extract([src], engine.Query(begin_ns, end_ns), out, Stats(), warn)


# ---------------------------------------------------------------------------------------------
# Grouping


class _RowTotals:
    """Packets, bytes, first and last time per directed IP flow, summed file by file (the
    rows of one file at a time, never a Python step per packet).

    The files' rows are grouped together half a million at a time (one grouping of their
    hashes, made on the decoding threads: faster than merging file by file), folded into
    the sums so far while the next indexes decode; so a long window holds its distinct
    flows and one batch of rows, not every file's rows."""

    FOLD = 1 << 19  # rows held before they are grouped (1 << 21, all the hour's: no faster)

    def __init__(self) -> None:
        # parts: (keys, hashes, packets, bytes, first, last); after a fold, the first one is
        # the sums so far
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.held = 0
        self.folded = False

    def add(self, p: _Packets | _Rows) -> None:
        r = p if isinstance(p, _Rows) else p.rows()
        used, keys, hashes = (r.keyed or _Keys.of(r.flows)).used(r.packets)
        self.parts.append((keys, hashes, r.packets[used], r.bytes[used], r.first[used],
                           r.last[used]))
        self.held += len(used)
        if self.held >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        if len(self.parts) <= self.folded:  # nothing new
            return
        keys = [p[0] for p in self.parts]
        invs, k = _group_parts(keys, [p[1] for p in self.parts], ordered=False)
        n = len(k)
        sums = [np.zeros(n, np.int64) for _ in range(2)]
        sums += [np.full(n, _BIG, np.int64), np.full(n, _SMALL, np.int64)]
        for inv, part in zip(invs, self.parts, strict=True):
            for ufunc, out, values in zip((np.add, np.add, np.minimum, np.maximum), sums,
                                          part[2:], strict=True):
                ufunc.at(out, inv, values)
        self.parts = [(k, hash_rows(k.T), *sums)]
        self.held = 0
        self.folded = True

    def finish(self) -> _Flows:
        self._fold()
        if not self.parts:
            return _Flows.of(np.zeros((0, 6), np.uint64), *(np.zeros(0, np.int64),) * 4)
        k, _, *sums = self.parts[0]
        return _Flows.of(_direction_keys(k), *sums)


def _direction_keys(words: np.ndarray) -> np.ndarray:
    """Per flow row of an IP packet (FLOW_DTYPE as six little-endian words), six uint64
    words naming its direction of a conversation, VLAN tags left out: IP version, protocol
    and whether the ports are known; source and destination address as big-endian halves
    (they compare as the bytes do); the ports."""
    w0, w1 = words[:, 0], words[:, 1]
    ports = (w1 & np.uint64(FLAG_PORTS)) != 0
    key = np.empty((len(words), 6), np.uint64)
    # ipver (byte 6 of the row) and proto (byte 7) to bits 8-15 and 0-7
    key[:, 0] = (w0 >> np.uint64(40) & np.uint64(0xFF00)) | (w0 >> np.uint64(56))
    key[:, 0] |= ports.astype(np.uint64) << np.uint64(16)
    key[:, 1:5] = words[:, 2:6].byteswap()
    sport = w1 >> np.uint64(16) & np.uint64(0xFFFF)  # row bytes 10-11 and 12-13
    dport = w1 >> np.uint64(32) & np.uint64(0xFFFF)
    key[:, 5] = np.where(ports, sport << np.uint64(16) | dport, np.uint64(0))
    return key


@dataclass
class _Flows:
    """Directed IP flows summed over every file: addresses as big-endian 64-bit halves,
    ports, totals."""

    ipver: np.ndarray
    proto: np.ndarray
    ports: np.ndarray  # bool: sport and dport are known
    src: np.ndarray  # (n, 2) uint64
    dst: np.ndarray
    sport: np.ndarray
    dport: np.ndarray
    packets: np.ndarray
    bytes: np.ndarray
    first: np.ndarray
    last: np.ndarray

    @classmethod
    def of(cls, k: np.ndarray, packets: np.ndarray, wire: np.ndarray, first: np.ndarray,
           last: np.ndarray) -> _Flows:
        """The flows with `_direction_keys` k and their totals."""
        return cls(
            (k[:, 0] >> np.uint64(8) & np.uint64(0xFF)).astype(np.int64),
            (k[:, 0] & np.uint64(0xFF)).astype(np.int64),
            (k[:, 0] >> np.uint64(16)).astype(bool),
            k[:, 1:3], k[:, 3:5],
            (k[:, 5] >> np.uint64(16)).astype(np.int64),
            (k[:, 5] & np.uint64(0xFFFF)).astype(np.int64),
            packets, wire, first, last,
        )


def _groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group of each row, the groups' keys in word order) of an (n, 6) uint64 key matrix."""
    invs, k = _group_parts([key], [hash_rows(key.T)])
    return invs[0], k


def _group_parts(keys: list[np.ndarray], hashes: list[np.ndarray], ordered: bool = True
                 ) -> tuple[list[np.ndarray], np.ndarray]:
    """(per part, the group of each of its rows; the groups' keys, in word order if
    `ordered`) of key rows given in parts ((n, 6) uint64) with their hashes
    (index.builder.hash_rows).

    The hashes are grouped (a sort of 64-bit values, much faster than a sort of the rows),
    then every row is compared with its group's first: a collision (accidental or crafted)
    costs time, never correctness. The groups are put in key order, so that tables do not
    depend on the hash."""
    bounds = np.cumsum([0] + [len(k) for k in keys])
    h = np.concatenate(hashes)
    for full in (False, True):
        inv, first = hash_groups(h, full)
        reps = np.empty((len(first), 6), np.uint64)
        by_row = np.argsort(first)  # each part's first rows, then taken from it at once
        cuts = np.searchsorted(first[by_row], bounds)
        for j, k in enumerate(keys):
            mine = by_row[cuts[j] : cuts[j + 1]]
            reps[mine] = k[first[mine] - bounds[j]]
        # numpy's takes and comparisons let go of the interpreter: two threads compare
        with ThreadPoolExecutor(2, thread_name_prefix="flows-check") as pool:
            if all(pool.map(_agree, [reps] * len(keys),
                            [inv[bounds[j]:bounds[j + 1]] for j in range(len(keys))], keys)):
                break
    else:
        cols, inv, _ = distinct_rows(np.ascontiguousarray(np.concatenate(keys).T))
        reps = cols.T
    if not ordered:
        return [inv[bounds[j]:bounds[j + 1]] for j in range(len(keys))], reps
    order = np.lexsort(reps.T[::-1])
    rank = np.empty(len(order), np.intp)
    rank[order] = np.arange(len(order))
    inv = rank[inv]
    return ([inv[bounds[j]:bounds[j + 1]] for j in range(len(keys))],
            np.ascontiguousarray(reps[order]))


def _agree(reps: np.ndarray, inv: np.ndarray, keys: np.ndarray) -> bool:
    """Whether every row of `keys` is its group's key `reps[inv]`."""
    return np.array_equal(reps[inv], keys)


def _reduce(ufunc: np.ufunc, inv: np.ndarray, values: np.ndarray, n: int, start: int
            ) -> np.ndarray:
    out = np.full(n, start, np.int64)
    ufunc.at(out, inv, values)
    return out


def _before(a: np.ndarray, ap: np.ndarray, b: np.ndarray, bp: np.ndarray) -> np.ndarray:
    """Whether endpoint (a, port ap) sorts before (b, bp): address halves, then port."""
    return (a[:, 0] < b[:, 0]) | (a[:, 0] == b[:, 0]) & (
        (a[:, 1] < b[:, 1]) | (a[:, 1] == b[:, 1]) & (ap < bp))


@functools.lru_cache(maxsize=1 << 16)
def _address(hi: int, lo: int, ipver: int) -> str:
    """An address's text (cached: a table names a few thousand hosts many times)."""
    return address_text(struct.pack(">QQ", hi, lo), ipver)


def _protocol(proto: int) -> str:
    return PROTOCOLS.get(proto, str(proto))


def _top(values: np.ndarray, limit: int | None) -> np.ndarray:
    """The first `limit` rows by `values` descending, ties in the groups' order."""
    return np.argsort(-values, kind="stable")[:limit]


@dataclass
class _Conversations:
    """Both directions of each conversation: A is the source of its first packet."""

    ipver: np.ndarray
    proto: np.ndarray
    ports: np.ndarray
    a: np.ndarray  # (n, 2) address halves
    pa: np.ndarray
    b: np.ndarray
    pb: np.ndarray
    ab: tuple[np.ndarray, np.ndarray]  # packets, bytes A -> B
    ba: tuple[np.ndarray, np.ndarray]
    first: np.ndarray
    last: np.ndarray


def _pairs(f: _Flows) -> _Conversations:
    """The flows of both directions of a conversation summed: its key is the lower end
    (address, then port) and the higher end; A is the end whose first packet came first
    (the lower end when both came at once)."""
    lo_src = ~_before(f.dst, f.dport, f.src, f.sport)  # the source is the lower end
    lo = np.where(lo_src[:, None], f.src, f.dst)
    hi = np.where(lo_src[:, None], f.dst, f.src)
    plo = np.where(lo_src, f.sport, f.dport).astype(np.uint64)
    phi = np.where(lo_src, f.dport, f.sport).astype(np.uint64)
    key = np.zeros((len(lo), 6), np.uint64)
    key[:, 0] = (f.ipver << 9 | f.proto << 1 | f.ports).astype(np.uint64)
    key[:, 0] |= plo << np.uint64(17) | phi << np.uint64(33)
    key[:, 1:3] = lo
    key[:, 3:5] = hi
    inv, k = _groups(key)
    n = len(k)

    def side(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pk = np.bincount(inv[mask], weights=f.packets[mask], minlength=n).astype(np.int64)
        by = np.bincount(inv[mask], weights=f.bytes[mask], minlength=n).astype(np.int64)
        return pk, by, _reduce(np.minimum, inv[mask], f.first[mask], n, _BIG)

    up, down = side(lo_src), side(~lo_src)
    a_lo = up[2] <= down[2]
    port_lo = (k[:, 0] >> np.uint64(17) & np.uint64(0xFFFF)).astype(np.int64)
    port_hi = (k[:, 0] >> np.uint64(33) & np.uint64(0xFFFF)).astype(np.int64)
    lo_k, hi_k = k[:, 1:3], k[:, 3:5]
    return _Conversations(
        (k[:, 0] >> np.uint64(9) & np.uint64(0xFF)).astype(np.int64),
        (k[:, 0] >> np.uint64(1) & np.uint64(0xFF)).astype(np.int64),
        (k[:, 0] & np.uint64(1)).astype(bool),
        np.where(a_lo[:, None], lo_k, hi_k), np.where(a_lo, port_lo, port_hi),
        np.where(a_lo[:, None], hi_k, lo_k), np.where(a_lo, port_hi, port_lo),
        (np.where(a_lo, up[0], down[0]), np.where(a_lo, up[1], down[1])),
        (np.where(a_lo, down[0], up[0]), np.where(a_lo, down[1], up[1])),
        np.minimum(up[2], down[2]),
        _reduce(np.maximum, inv, f.last, n, _SMALL),
    )


def _conversation_columns(f: _Flows, sort: str | None, limit: int | None
                          ) -> tuple[dict[str, list], int]:
    """The columns of FIELDS["conversation"] and the last packet's time (`last_ns`), the
    first `limit` rows by `sort` (None: unsorted); ports are None where the protocol has
    none. And the number of rows before the limit."""
    c = _pairs(f)
    packets = c.ab[0] + c.ba[0]
    wire = c.ab[1] + c.ba[1]
    top = slice(None) if sort is None else _top(wire if sort == "bytes" else packets, limit)
    ported = c.ports[top].tolist()

    def ports(p: np.ndarray) -> list[int | None]:
        return [v if k else None for v, k in zip(p[top].tolist(), ported, strict=True)]

    columns = dict(zip(FIELDS["conversation"], [
        _addresses(c.a[top], c.ipver[top]),
        ports(c.pa),
        _addresses(c.b[top], c.ipver[top]),
        ports(c.pb),
        [_protocol(p) for p in c.proto[top].tolist()],
        *(x[top].tolist() for x in (*c.ab, *c.ba, packets, wire, c.first)),
        ((c.last[top] - c.first[top]) / 1e9).tolist(),
    ], strict=True))
    columns["last_ns"] = c.last[top].tolist()
    return columns, len(packets)


def _conversation_rows(f: _Flows, sort: str, limit: int | None) -> tuple[list[dict], int]:
    columns, total = _conversation_columns(f, sort, limit)
    return _records("conversation", [columns[k] for k in FIELDS["conversation"]]), total


def _records(by: str, columns: list[list]) -> list[dict]:
    """Rows as dicts of FIELDS[by] from their columns (lists: a dict per row, not a numpy
    scalar per field)."""
    return [dict(zip(FIELDS[by], values, strict=True)) for values in zip(*columns, strict=True)]


def _addresses(halves: np.ndarray, ipver: np.ndarray) -> list[str]:
    return [_address(hi, lo, v) for (hi, lo), v in zip(halves.tolist(), ipver.tolist(),
                                                         strict=True)]


def _endpoint_rows(f: _Flows, sort: str, limit: int | None) -> tuple[list[dict], int]:
    """Per address: what it sent (tx) and received (rx); a packet to itself counts as both,
    as in Wireshark's Endpoints."""
    m = len(f.ipver)
    key = np.zeros((2 * m, 6), np.uint64)
    key[:, 0] = np.concatenate([f.ipver, f.ipver])
    key[:, 1:3] = np.concatenate([f.src, f.dst])
    inv, k = _groups(key)
    n = len(k)

    def sums(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.bincount(part, weights=f.packets, minlength=n).astype(np.int64),
                np.bincount(part, weights=f.bytes, minlength=n).astype(np.int64))

    tx, rx = sums(inv[:m]), sums(inv[m:])
    packets, wire = tx[0] + rx[0], tx[1] + rx[1]
    top = _top(wire if sort == "bytes" else packets, limit)
    columns = [_addresses(k[top, 1:3], k[top, 0]),
               *(x[top].tolist() for x in (packets, wire, *tx, *rx))]
    return _records("endpoint", columns), n


def _port_rows(f: _Flows, sort: str, limit: int | None) -> tuple[list[dict], int]:
    """Per service port: each conversation with ports counts once, under the lower of its
    two ports (the well-known side of a client's ephemeral port)."""
    c = _pairs(f)
    ported = np.flatnonzero(c.ports)
    key = np.zeros((len(ported), 6), np.uint64)
    key[:, 0] = c.proto[ported]
    key[:, 1] = np.minimum(c.pa, c.pb)[ported]
    inv, k = _groups(key)
    n = len(k)
    packets = np.bincount(inv, weights=(c.ab[0] + c.ba[0])[ported], minlength=n).astype(
        np.int64)
    wire = np.bincount(inv, weights=(c.ab[1] + c.ba[1])[ported], minlength=n).astype(np.int64)
    convs = np.bincount(inv, minlength=n)
    top = _top(wire if sort == "bytes" else packets, limit)
    columns = [[_protocol(p) for p in k[top, 0].tolist()],
               *(x[top].tolist() for x in (k[:, 1], packets, wire, convs))]
    return _records("port", columns), n


# ---------------------------------------------------------------------------------------------
# One file's conversations (npcapserve's /api/v1/catalogue)


def file_conversations(path: str, sf: StoredFile, expr: str = "",
                       warn: Warn = _no_warning) -> FileTable:
    """The conversations of every packet of one file `sf` of the dump set at `path` that
    matches `expr`, and only of that file.

    A window over the file's own span is not enough: a neighbouring file may hold packets
    stamped inside it (timestamps step back slightly across CPUs). So the scan runs over a
    window wider than any file (its 10-minute slot with a second of slack each side, or the
    index's span if wider) with the dump set narrowed to this one file: the index, or the
    pcap when the index cannot decide, of `sf` alone is read. Every row, unsorted."""
    from pcapvault.index import timeline

    begin = sf.first_ns - 1_000_000_000
    end = (sf.slot + timeline.SLOT_SECONDS + 1) * 1_000_000_000
    try:
        h = parse_header(index_bytes(sf.index)[0], str(sf.index))
        begin, end = min(begin, h.first_ns), max(end, h.last_ns + 1)
    except (PcapVaultError, ValueError):
        pass  # read the pcap: _Matches says so
    flows, scan = _flows(Request([path], begin, end, expr), warn, only=sf.pcap.name)
    cols, _ = _conversation_columns(flows, None, None)
    columns = {k: cols[k] for k in FILE_FIELDS[:-2]}
    columns["first_ns"], columns["last_ns"] = cols["start_ns"], cols["last_ns"]
    return FileTable(columns, scan.packets, scan.bytes)
