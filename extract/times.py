"""Times on the npcapextract command line, to integer nanoseconds since the epoch.

Integer nanoseconds all the way: a float cannot hold a nanosecond timestamp of today exactly, and
BEGIN/END must cut between two packets a nanosecond apart. Plain dates are local time because
n2disk's npcapextract reads them so and operators' scripts pass them that way; the stored
timeline is UTC (docs/FORMAT.md), which only this module needs to know about.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone

from pcapvault.index.errors import PcapVaultError

NS = 1_000_000_000

HELP = (
    "use 'YYYY-MM-DD hh:mm:ss[.fraction]' (local time), ISO 8601 with Z or an offset "
    "(2025-11-21T15:00:00Z), epoch seconds (1763737200.5), or a relative time "
    "(now, -15m, -2h, -30s, -1d)"
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_REL = re.compile(r"^-(\d+(?:\.\d+)?)\s*([smhdw])$")
_EPOCH = re.compile(r"^(\d+)(?:\.(\d{1,9}))?$")
_DATE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?$",
    re.IGNORECASE,
)


class TimeError(PcapVaultError):
    """A time the command line gave cannot be understood."""


def _frac_ns(frac: str | None) -> int:
    return int((frac or "").ljust(9, "0")[:9] or 0)


def parse_time(text: str, now_ns: int | None = None) -> int:
    """Parse one BEGIN/END value; `now_ns` anchors relative forms (default: the clock)."""
    s = text.strip()
    now = time.time_ns() if now_ns is None else now_ns
    low = s.lower()
    if low == "now":
        return now
    m = _REL.match(low)
    if m:
        whole, _, frac = m.group(1).partition(".")
        secs_ns = int(whole) * NS + _frac_ns(frac)
        return now - secs_ns * _UNITS[m.group(2)]
    m = _EPOCH.match(s)
    if m and len(m.group(1)) > 4:
        return int(m.group(1)) * NS + _frac_ns(m.group(2))
    m = _DATE.match(s)
    if m:
        y, mo, d, hh, mm, ss, frac, tz = m.groups()
        try:
            base = datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(ss or 0))
        except ValueError as e:
            raise TimeError(f"cannot parse time {text!r}: {e}") from None
        if tz is None:
            aware = base.astimezone()  # naive means local time, as in n2disk
        elif tz.upper() == "Z":
            aware = base.replace(tzinfo=UTC)
        else:
            sign = -1 if tz[0] == "-" else 1
            digits = tz[1:].replace(":", "")
            off = timedelta(hours=int(digits[:2]), minutes=int(digits[2:4] or 0))
            aware = base.replace(tzinfo=timezone(sign * off))
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        delta = aware - epoch
        secs = delta.days * 86400 + delta.seconds
        return secs * NS + _frac_ns(frac)
    raise TimeError(f"cannot parse time {text!r}; {HELP}")


def format_time(ns: int) -> str:
    """UTC ISO 8601 with nanoseconds, for messages."""
    sec, frac = divmod(ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


def parse_window(begin: str, end: str, now_ns: int | None = None) -> tuple[int, int]:
    """[BEGIN, END) in ns; BEGIN after END is an error (an empty window is allowed)."""
    now = time.time_ns() if now_ns is None else now_ns
    b = parse_time(begin, now)
    e = parse_time(end, now)
    if b > e:
        raise TimeError(
            f"BEGIN {begin!r} ({format_time(b)}) is after END {end!r} ({format_time(e)})"
        )
    return b, e
