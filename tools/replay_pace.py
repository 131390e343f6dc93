"""When each replayed frame is due, how to wait for it, and how far off the sends were.

Send times are computed a chunk at a time with numpy (never per frame in Python) and are
integer nanoseconds after the start of the replay, so a long replay does not drift through
float rounding. Waiting sleeps while the deadline is far and spins the last stretch: a sleep
overshoots by tens of microseconds even with the timer slack lowered, which is the whole
budget between two frames at 10 kpps.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

NS = 1_000_000_000
# Closer to the deadline than this, spin instead of sleeping: about a sleep's overshoot with
# 1 ns timer slack. Spinning whole gaps instead cost far more CPU and, on a busy machine, did
# not shorten the stalls that make the tail (docs/BENCHMARKS.md, "Replay").
SPIN_NS = 50_000
# Sleep in slices at most this long, so periodic reports are served during long gaps of the
# original traffic, and SIGINT/SIGTERM end a pause within the 0.1 s disk2n promises: Python
# resumes an interrupted sleep after running the handler, so only the slice bounds the delay.
# 100 wake-ups a second cost nothing measurable.
SLICE_NS = 10_000_000
PR_SET_TIMERSLACK = 29


def prepare_for_timing() -> None:
    """Process settings for on-time sends: 1 ns timer slack (the default 50 us would be added
    to every sleep), and no cyclic garbage collection, whose full passes stall the loop for
    milliseconds; the replay loop creates no reference cycles."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    gc.collect()
    gc.freeze()
    gc.disable()


@dataclass(frozen=True)
class Pace:
    """The timing the user asked for; exactly one mode applies."""

    speed: float = 1.0  # original timing divided by this
    pps: float | None = None
    mbps: float | None = None
    topspeed: bool = False
    max_gap_ns: int | None = None  # original timing: longer pauses are shortened to this

    def describe(self) -> str:
        if self.topspeed:
            return "top speed"
        if self.pps:
            return f"{self.pps:g} pps"
        if self.mbps:
            return f"{self.mbps:g} Mbps"
        return "original timing" + (f" x{self.speed:g}" if self.speed != 1 else "")


class Schedule:
    """Send times, in ns after the start, of the frames of a replay, chunk after chunk.

    Original timing keeps the gaps between a frame and the latest one before it (kernel
    timestamps can step back slightly: such a frame goes right after its predecessor). A new
    segment (the next file, the next loop) starts right after the last frame of the previous
    one: the pause between two unrelated captures means nothing. Rate modes space frames by
    count (pps) or by their bytes (mbps, frame bytes without preamble and FCS, as tcpreplay).
    """

    def __init__(self, pace: Pace):
        self.pace = pace
        self.elapsed = 0  # original-time ns covered so far (original timing)
        self.prev_ts: int | None = None
        self.count = 0  # frames scheduled so far (pps)
        self.bits = 0  # bits scheduled so far (mbps)

    def new_segment(self) -> None:
        self.prev_ts = None

    def times(self, ts_ns: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Send times (int64 ns after the start) of the next frames, in order."""
        n = len(ts_ns)
        p = self.pace
        if p.pps:
            idx = np.arange(self.count, self.count + n, dtype=np.float64)
            self.count += n
            return np.rint(idx * (NS / p.pps)).astype(np.int64)
        if p.mbps:
            bits = np.cumsum(lengths.astype(np.int64) * 8)
            before = self.bits + bits - lengths * 8
            self.bits += int(bits[-1]) if n else 0
            return np.rint(before * (1e3 / p.mbps)).astype(np.int64)
        if not n:
            return np.zeros(0, np.int64)
        prev = int(ts_ns[0]) if self.prev_ts is None else self.prev_ts
        run = np.maximum.accumulate(np.maximum(ts_ns, prev))
        gaps = np.diff(run, prepend=prev)
        if p.max_gap_ns is not None:
            np.minimum(gaps, p.max_gap_ns, out=gaps)
        cum = np.cumsum(gaps) + self.elapsed
        self.elapsed = int(cum[-1])
        self.prev_ts = int(run[-1])
        if p.speed == 1:
            return cum
        return np.rint(cum / p.speed).astype(np.int64)


def wait_until(deadline_ns: int, stop: list[bool], tick: Callable[[int], None]) -> None:
    """Return at `deadline_ns` (CLOCK_MONOTONIC), or within a sleep slice of `stop[0]`
    becoming true; only the last SPIN_NS before the deadline are spun.

    `tick(now)` runs after every sleep slice, so a long pause still reports progress.
    """
    clock = time.monotonic_ns
    rest = deadline_ns - clock()
    while rest > SPIN_NS and not stop[0]:
        time.sleep(min(rest - SPIN_NS, SLICE_NS) / NS)
        now = clock()
        tick(now)
        rest = deadline_ns - now
    while not stop[0] and clock() < deadline_ns:
        pass


class TimingErrors:
    """How late frames left against their schedule, with constant memory.

    A log-bucketed histogram (64 buckets per power of two: quantiles within 1%) instead of a
    list of errors, so `--loop 0` can run for weeks; the maximum is kept exactly.
    """

    SUB = 64

    def __init__(self) -> None:
        self.counts = np.zeros(64 * self.SUB, np.int64)
        self.n = 0
        self.max = 0

    def add(self, err_ns: np.ndarray) -> None:
        if not len(err_ns):
            return
        a = np.abs(err_ns.astype(np.int64))
        m, e = np.frexp(a.astype(np.float64))
        idx = np.where(a > 0, e * self.SUB + ((m - 0.5) * 2 * self.SUB).astype(np.int64), 0)
        self.counts += np.bincount(idx, minlength=len(self.counts))
        self.n += len(a)
        self.max = max(self.max, int(a.max()))

    def quantile(self, q: float) -> int:
        """The q-quantile in ns (the middle of its bucket), 0 without data."""
        if not self.n:
            return 0
        j = int(np.searchsorted(np.cumsum(self.counts), max(1, int(np.ceil(q * self.n)))))
        if j == 0:
            return 0
        e, k = divmod(j, self.SUB)
        value = (0.5 + (k + 0.5) / (2 * self.SUB)) * 2.0**e
        return min(int(value), self.max)

    def summary(self) -> str:
        if not self.n:
            return "timing error n/a"
        return (
            f"timing error median {_us(self.quantile(0.5))} p99 {_us(self.quantile(0.99))} "
            f"max {_us(self.max)}"
        )


def _us(ns: int) -> str:
    if ns >= 10_000_000:
        return f"{ns / 1e6:.0f} ms"
    return f"{ns / 1e3:.1f} us"
