"""The replay loop: admit frames, load them into the TX ring ahead of time, release them on
schedule, and account for what left and how late.

Top speed loads half the ring and releases it with one send(), over and over. Paced modes keep
up to half a ring of frames loaded ahead of their send times and release, at each wake-up,
every frame that is due (one send() for all of them), so a replay that falls behind catches up
in bursts instead of drifting. Loading happens between two sends when the next one is far
enough away (judged from how long loads have been taking), so reading and copying do not
delay the frames already due.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pcapvault.index.errors import PcapVaultError
from pcapvault.index.times import format_time

from .replay_pace import Pace, Schedule, TimingErrors, wait_until
from .replay_source import Frames
from .replay_tx import ETH_HLEN, ETH_P_8021Q, TxRing, max_frame_len

# Frames per load in paced modes, at least: small enough to fit between two sends at 10 kpps.
PACED_LOAD = 64
# ... and enough to cover this much of the schedule at higher rates.
LOAD_SPAN_NS = 1_000_000
# Minimum ring headroom, in units of the measured load time, before loading between sends.
LOAD_MARGIN = 2.0


class OversizeError(PcapVaultError):
    """A frame is longer than the interface accepts, and --oversize fail was given."""


@dataclass
class Counters:
    packets: int = 0
    bytes: int = 0
    oversize: int = 0
    runts: int = 0
    refused_bytes: int = 0  # released, but the kernel dropped them (PACKET_LOSS)
    first_ns: int = 0  # monotonic time of the first send (0: none yet)
    last_ns: int = 0  # monotonic time the latest send returned


@dataclass
class _Pending:
    """Frames loaded in the ring, waiting for their send times (ns after the start)."""

    deadline: list[int]
    sched: np.ndarray
    cum_bytes: list[int]  # bytes of frames [0, i) at index i
    sent: np.ndarray
    pos: int = 0


class Replayer:
    """Sends the frames of a source through `tx` with the timing of `pace`.

    `report(now)` is called at least every `interval_ns` while frames are being sent.
    """

    def __init__(
        self,
        tx: TxRing,
        pace: Pace,
        *,
        src_mac: bytes | None = None,
        dst_mac: bytes | None = None,
        fail_oversize: bool = False,
        report: Callable[[int], None] | None = None,
        interval_ns: int = 1_000_000_000,
    ):
        self.tx = tx
        self.pace = pace
        self.schedule = Schedule(pace)
        self.src_mac, self.dst_mac = src_mac, dst_mac
        self.fail_oversize = fail_oversize
        self.counters = Counters()
        self.errors = TimingErrors()
        self.stop = [False]
        self._report = report
        self._interval = interval_ns
        self._next_report = 0
        self._t0: int | None = None
        self._pending: deque[_Pending] = deque()
        self._load_ns = 50_000.0  # running estimate of one paced load
        self._load_size = PACED_LOAD
        self._limits = (max_frame_len(tx.mtu, False), max_frame_len(tx.mtu, True))

    # -- admission -------------------------------------------------------------------------

    def admit(self, fr: Frames) -> Frames:
        """Drop (and count) frames the interface would refuse: runts shorter than an Ethernet
        header, and frames over MTU + header (+4 for an 802.1Q tag)."""
        cap = fr.caplen
        runt = cap < ETH_HLEN
        at = np.where(runt, 0, fr.off + 12)
        tpid = fr.buf[at].astype(np.int64) << 8 | fr.buf[at + 1]
        limit = np.where((tpid == ETH_P_8021Q) & ~runt, self._limits[1], self._limits[0])
        over = cap > limit
        if over.any() and self.fail_oversize:
            i = int(np.argmax(over))
            raise OversizeError(
                f"{fr.origin}: the frame at {format_time(int(fr.ts_ns[i]))} is {int(cap[i])} "
                f"bytes, more than {self.tx.ifname} accepts ({int(limit[i])} with MTU "
                f"{self.tx.mtu}); raise the MTU or use --oversize skip"
            )
        bad = runt | over
        if not bad.any():
            return fr
        self.counters.runts += int(runt.sum())
        self.counters.oversize += int(over.sum())
        return fr.take(~bad)

    # -- the loop --------------------------------------------------------------------------

    def play(self, source: Iterable[Frames]) -> int:
        """One pass over `source`; returns how many frames it offered after admission."""
        offered = 0
        for fr in source:
            if self.stop[0]:
                break
            if fr.first:
                self.schedule.new_segment()
            fr = self.admit(fr)
            offered += len(fr)
            if not len(fr):
                continue
            if self.pace.topspeed:
                self._blast(fr)
            else:
                self._pace(fr)
        return offered

    def finish(self) -> None:
        """Send what is still waiting (unless stopped) and wait for the ring to empty."""
        if not self.pace.topspeed:
            self._serve(final=True)
            while self._pending:  # stopped: account for what did leave
                self._retire(self._pending.popleft())
        self.tx.drain()
        self.counters.refused_bytes = max(0, self.counters.bytes - self.tx.bytes_accepted)

    def _blast(self, fr: Frames) -> None:
        tx = self.tx
        step = tx.capacity // 2
        for i in range(0, len(fr), step):
            if self.stop[0]:
                return
            k = min(step, len(fr) - i)
            tx.load(fr.buf, fr.off[i : i + k], fr.caplen[i : i + k], self.src_mac, self.dst_mac)
            tx.release(k)
            self._sent(k, int(fr.caplen[i : i + k].sum()), time.monotonic_ns())

    def _pace(self, fr: Frames) -> None:
        tx = self.tx
        i = 0
        while i < len(fr):
            k = min(self._load_size, len(fr) - i)
            self._serve(final=False, room=k)
            if self.stop[0]:
                return
            t = time.monotonic_ns()
            part = fr.take(slice(i, i + k))
            sched = self.schedule.times(part.ts_ns, part.caplen)
            tx.load(part.buf, part.off, part.caplen, self.src_mac, self.dst_mac)
            cum = np.zeros(k + 1, np.int64)
            np.cumsum(part.caplen, out=cum[1:])
            self._pending.append(_Pending(sched.tolist(), sched, cum.tolist(),
                                          np.empty(k, np.int64)))
            self._load_ns = 0.8 * self._load_ns + 0.2 * (time.monotonic_ns() - t)
            # Size the next load to cover about LOAD_SPAN_NS of the schedule: small at low
            # rates (it must fit between two sends), large at high ones (fewer, cheaper
            # loads per frame).
            span = int(sched[-1] - sched[0])
            want = k * LOAD_SPAN_NS // span if span > 0 else tx.capacity
            self._load_size = min(max(PACED_LOAD, 1 << (want.bit_length() - 1) if want else 0),
                                  tx.capacity // 4)
            i += k

    def _serve(self, final: bool, room: int = 0) -> None:
        """Release frames as they fall due, all that are due with one send(). Unless `final`,
        return when it is time to load `room` more frames: before the start, until half the
        ring is loaded; then whenever the load fits and has time to finish before the next
        frame is due, or at once when few frames are left loaded ahead."""
        tx = self.tx
        clock = time.monotonic_ns
        ahead_max = tx.capacity // 2
        low = max(room, ahead_max // 8)
        if self._t0 is None:
            if not final and tx.loaded - tx.released + room <= ahead_max:
                return
            self._t0 = clock()
        t0 = self._t0
        pending = self._pending
        while pending and not self.stop[0]:
            p = pending[0]
            due = p.deadline[p.pos] + t0
            now = clock()
            if not final and tx.free() >= room:
                ahead = tx.loaded - tx.released
                if ahead < low or (
                    ahead + room <= ahead_max and due - now > LOAD_MARGIN * self._load_ns
                ):
                    return
            if now < due:
                wait_until(due, self.stop, self._tick)
                if self.stop[0]:
                    return
                now = clock()
            # Everything due by now, across loads.
            ends = []
            for q in pending:
                j = bisect_right(q.deadline, now - t0, q.pos)
                ends.append(j)
                if j < len(q.deadline):
                    break
            tx.release(sum(j - q.pos for q, j in zip(pending, ends, strict=False)))
            after = clock()
            n = nbytes = 0
            for j in ends:
                q = pending[0]
                q.sent[q.pos : j] = after - t0
                n += j - q.pos
                nbytes += q.cum_bytes[j] - q.cum_bytes[q.pos]
                q.pos = j
                if j == len(q.deadline):
                    self._retire(pending.popleft())
            self._sent(n, nbytes, after)

    def _retire(self, p: _Pending) -> None:
        self.errors.add(p.sent[: p.pos] - p.sched[: p.pos])

    def _sent(self, n: int, nbytes: int, now: int) -> None:
        c = self.counters
        if not c.first_ns:
            c.first_ns = now
            self._next_report = now + self._interval
        c.packets += n
        c.bytes += nbytes
        c.last_ns = now
        self._tick(now)

    def _tick(self, now: int) -> None:
        if self._report is not None and self._next_report and now >= self._next_report:
            self._next_report = now + self._interval
            self._report(now)
