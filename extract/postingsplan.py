"""The address-postings plan (a strategy of plan.py): the candidates of a filter whose every
match names an address, from the indexes' posting lists, without numpy.

Why a second strategy: the analyst's everyday question is one host's packets in a short
window. The flow-table plan (flowplan.py) answers it by decoding the window's flow tables and
packet columns with numpy, whose import alone takes a good part of the time such a query
should take when it is a command of its own (docs/BENCHMARKS.md, "Extraction"), and reads
every packet column of the window. Here libpcap compiles the filter, hostkeys.py reads the
posting lists it needs off the compiled program, and each index file gives those lists from a
small directory and one compressed frame (index/postings.py): a FilePlan per file whose
records are proven by their postings (`sure`), to be confirmed by libpcap, or decided by their
own timestamp (`edge`, a block of the index's time table that the window cuts).

The plan is made for the whole window at once (each step's reads announced for every file
before the first is waited for), and only where it is exact: None (the flow-table plan takes
over, and reports what it finds) for link types other than Ethernet, compressed pcaps,
indexes without postings (versions 1 and 2), damaged or missing indexes, another file's
index, torn pcaps, filters without an address on every accepting path, and more than
MAX_PACKETS or MAX_BYTES of candidates (held as lists, and by records.py in memory).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from dataclasses import dataclass

from pcapvault.index.compressed import is_compressed
from pcapvault.index.dumpset import StoredFile
from pcapvault.index.errors import FormatError
from pcapvault.index.libpcap import Filter
from pcapvault.index.pcaplayout import RECORD_HEADER_LEN
from pcapvault.index.postings import READ_AHEAD, Postings

from .access import QueryTarget
from .hostkeys import MAYBE, NO, YES, decide, posting_keys
from .plan import FilePlan, Warn
from .readahead import PCAP_HEAD, will_need
from .report import Stats
from .request import Request

MAX_PACKETS = 250_000
MAX_BYTES = 128 << 20
_UNKNOWN = bytes(16)


@dataclass
class PostingsPlan:
    """The plans of one dump set's files in the window, in stored order."""

    target: QueryTarget
    files: list[FilePlan]
    considered: int  # files of the window
    skipped: int  # files the postings exclude


def applies(req: Request) -> bool:
    """Whether a request may be answered without numpy (records.py), before any file is
    looked at: one dump set and plain pcap output, without slicing, splitting or caps (the
    engine's Output does those). Whether the postings can plan it is for `plan` to say."""
    return len(req.dumpsets) == 1 and not (
        req.pcapng or req.snaplen or req.split_bytes or req.split_packets or req.max_bytes
        or req.max_packets
    )


class _NotHere(Exception):
    """The flow-table plan must answer this query."""


def plan(t: QueryTarget, begin_ns: int, end_ns: int) -> PostingsPlan | None:
    """The candidates of [begin_ns, end_ns) in `t`, or None when the postings cannot plan
    them exactly (the flow-table plan must)."""
    keys = posting_keys(t.filter.program) if t.linktype == 1 else None
    if not keys:
        return None
    flt = t.filter
    files = t.ds.files_in_window(begin_ns, end_ns)
    out = PostingsPlan(t, [], len(files), 0)
    # Each step's reads are announced for every file before the first is waited for: cold,
    # the files' directories, then their frames, come in one round trip each.
    for sf in files:
        will_need(str(sf.index), 0, READ_AHEAD)  # what Postings.read reads first
    opened: list[tuple[StoredFile, Postings, list]] = []
    try:
        for sf in files:
            found = _lists(sf, begin_ns, end_ns, keys, t.nanosecond)
            if found is None:
                out.skipped += 1
            else:
                opened.append((sf, *found))
        for sf, p, lists in opened:
            for _, _, k in lists:
                will_need(p.path, *p.frame_span(k))
            will_need(sf.pcap, 0, PCAP_HEAD)  # opening it for its records reads its header
        decisions: dict[tuple[bytes, int, int], int] = {}
        total = nbytes = 0
        for sf, p, lists in opened:
            fp = _candidates(sf, p, lists, begin_ns, end_ns, flt, decisions)
            if fp is None:
                out.skipped += 1
                continue
            out.files.append(fp)
            total += len(fp.rec)
            nbytes += sum(fp.caplen) + RECORD_HEADER_LEN * len(fp.rec)
            if total > MAX_PACKETS or nbytes > MAX_BYTES:
                raise _NotHere
    except (_NotHere, FormatError, OSError):
        return None
    finally:
        for _, p, _ in opened:
            p.close()
    return out


class PostingsSource:
    """A dump set planned from its postings, for the engine: the same planner interface as the
    flow-table plan's Source (plan.Planner), over a plan made for the whole window."""

    def __init__(self, path: str, number: int, pp: PostingsPlan):
        t = pp.target
        self.path, self.number = path, number
        self.ds, self.linktype, self.snaplen = t.ds, t.linktype, t.snaplen
        self.nanosecond, self.interface, self.filter = t.nanosecond, t.interface, t.filter
        self._plan = pp
        self._files = {fp.file.index: fp for fp in pp.files}

    def files(self, begin_ns: int, end_ns: int, stats: Stats) -> list[StoredFile]:
        stats.count_files(self.ds, self._plan.considered)
        stats.skipped_summary += self._plan.skipped
        return [fp.file for fp in self._plan.files]

    def candidates(self, sf: StoredFile, begin_ns: int, end_ns: int, stats: Stats,
                   warn: Warn) -> FilePlan | None:
        return self._files.get(sf.index)

    def announce(self, sf: StoredFile) -> None:
        """Nothing: the plan has read the indexes it uses and announced the pcaps' headers
        (the indexes' other sections would only delay the records' reads)."""


def _lists(sf: StoredFile, begin_ns: int, end_ns: int, keys: set[tuple[bytes, int]],
           nanosecond: bool) -> tuple[Postings, list] | None:
    """`sf`'s index opened and the posting lists of `keys` (with the "address unknown" lists
    of their types) found in its directory; None if the file lies outside the window."""
    if is_compressed(sf.pcap):
        raise _NotHere
    p = Postings.read(str(sf.index))  # NoPostings and damage: FormatError
    try:
        if p.linktype != 1 or p.nanosecond != nanosecond:
            raise _NotHere
        if p.count and not sf.named_for(p.first_ns, p.last_ns):
            raise _NotHere  # another file's index (flowplan.py's check): the engine scans
        if p.count == 0 or p.last_ns < begin_ns or p.first_ns >= end_ns:
            p.close()
            return None
        if os.stat(sf.pcap).st_size < p.pcap_size:
            raise _NotHere  # torn: the engine extracts what is complete and warns
        lists = []
        for addr, etype in sorted(keys):
            k = p.find(addr, etype)
            if k is not None:
                lists.append((addr, etype, k))
        for etype in sorted({e for _, e in keys}):
            k = p.find(_UNKNOWN, etype, unknown=True)
            if k is not None:
                lists.append((None, etype, k))
        if sum(p.size(k) for _, _, k in lists) > MAX_PACKETS:
            raise _NotHere
    except BaseException:
        p.close()
        raise
    return p, lists


def _candidates(sf: StoredFile, p: Postings, lists: list, begin_ns: int, end_ns: int,
                flt: Filter, decisions: dict[tuple[bytes, int, int], int]) -> FilePlan | None:
    """The postings of `lists` that can match inside the window, in capture order.

    A posting is dropped when one of its lists proves libpcap rejects it (NO), taken without
    libpcap when one proves it accepts it (YES); both are facts about the packet, so they
    never disagree. Postings in blocks the window cuts are read and their timestamps
    checked (`edge`). A list's records share at most three verdicts (source, destination,
    both), so they are combined as sets, not one by one."""
    length: dict[int, int] = {}
    state: dict[int, int] = {}  # offset -> YES/NO/MAYBE, combined over the lists
    given: set[int] = set()  # the verdicts combined
    for addr, etype, k in lists:
        pl = p.entries(k)
        length.update(zip(pl.offset, pl.length, strict=True))
        src, dst = set(pl.offset[:pl.sources]), set(pl.offset[pl.sources:])
        both = src & dst
        for role, offs in ((1, src - both), (2, dst - both), (3, both)):
            if not offs:
                continue
            if addr is None:
                dec = MAYBE
            else:
                dec = decisions.get((addr, etype, role))
                if dec is None:
                    dec = decisions[(addr, etype, role)] = decide(flt.program, addr, etype, role)
            _combine(state, offs, dec)
            given.add(dec)
    kept = sorted(o for o, v in state.items() if v != NO) if NO in given else sorted(state)
    order, edge = _in_window(p, begin_ns, end_ns, kept)
    if not order:
        return None
    caplen = [n - RECORD_HEADER_LEN for n in map(length.__getitem__, order)]
    if given <= {YES, NO} or given <= {MAYBE, NO}:  # one answer for all of them
        sure = [YES in given] * len(order)
    else:
        sure = [v == YES for v in map(state.__getitem__, order)]
    return FilePlan(sf, order, caplen, sure, edge=edge)


def _combine(state: dict[int, int], offs: set[int], dec: int) -> None:
    """One list's verdict `dec` on the records at `offs`: the first list that decides (YES or
    NO) wins over MAYBE."""
    seen = offs & state.keys()
    if dec != MAYBE:
        for off in seen:
            if state[off] == MAYBE:
                state[off] = dec
    state.update(dict.fromkeys(offs - seen if seen else offs, dec))


def _in_window(p: Postings, begin_ns: int, end_ns: int, offs: list[int]
               ) -> tuple[list[int], list[bool]]:
    """The records at the sorted `offs` the window may hold, and for each whether only its
    timestamp can tell (a block of the index's time table that the window cuts); the
    others are surely inside. Cut by blocks, not looked up one record at a time."""
    if begin_ns <= p.first_ns and p.last_ns < end_ns:
        return offs, [False] * len(offs)
    blocks = p.blocks()
    starts = [b[0] for b in blocks]
    # Records before the first block (none in a sound index) are checked by their time.
    lo = bisect_left(offs, starts[0]) if starts else len(offs)
    kept, edge = offs[:lo], [True] * lo
    for i, (_, first, last) in enumerate(blocks):
        hi = bisect_left(offs, starts[i + 1]) if i + 1 < len(starts) else len(offs)
        if hi > lo and not (last < begin_ns or first >= end_ns):
            kept += offs[lo:hi]
            edge += [not (begin_ns <= first and last < end_ns)] * (hi - lo)
        lo = hi
    return kept, edge
