"""Times on the npcapextract command line, to integer nanoseconds since the epoch.

Integer nanoseconds all the way: a float cannot hold a nanosecond timestamp of today exactly, and
BEGIN/END must cut between two packets a nanosecond apart. Plain dates are local time because
n2disk's npcapextract reads them so and operators' scripts pass them that way; the stored
timeline is UTC (docs/FORMAT.md), which only this module needs to know about. A local time
that daylight saving skips or repeats is refused (see _local), as is a time outside int64
nanoseconds since the epoch.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta

from pcapvault.index.errors import PcapVaultError

NS = 1_000_000_000

HELP = (
    "use 'YYYY-MM-DD hh:mm:ss[.fraction]' (local time), ISO 8601 with Z or an offset "
    "(2025-11-21T15:00:00Z), epoch seconds (1763737200.5), or a relative time "
    "(now, -15m, -2h, -30s, -1d)"
)

_DAY = 86400
# Nanoseconds since the epoch are int64 in the index and the engine: 1970 to 2262.
MAX_NS = (1 << 63) - 1
RANGE = "1970-01-01 to 2262-04-11 (UTC)"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
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


def _duration_ns(m: re.Match[str]) -> int:
    whole, _, frac = m.group(1).partition(".")
    return (int(whole) * NS + _frac_ns(frac)) * _UNITS[m.group(2)]


def parse_duration(text: str, what: str = "duration") -> int:
    """A duration such as `30d`, `12h`, `90m`, `45s`, `2w` (a number, then one unit) in ns.

    The one parser for durations: relative times (`-15m`) are a minus sign and a duration.
    """
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise TimeError(f"bad {what} {text!r}: give a number and a unit s, m, h, d or w "
                        "(30d, 12h, 90m)")
    ns = _duration_ns(m)
    if not 0 < ns <= MAX_NS:
        raise TimeError(f"bad {what} {text!r}: give one above 0 and below 290 years")
    return ns


def parse_time(text: str, now_ns: int | None = None) -> int:
    """Parse one BEGIN/END value; `now_ns` anchors relative forms (default: the clock)."""
    s = text.strip()
    now = time.time_ns() if now_ns is None else now_ns
    low = s.lower()
    m = _DURATION.match(low[1:]) if low.startswith("-") else None
    if low == "now":
        ns = now
    elif m:
        ns = now - _duration_ns(m)
    elif (m := _EPOCH.match(s)) and len(m.group(1)) > 4:
        ns = int(m.group(1)) * NS + _frac_ns(m.group(2))
    elif m := _DATE.match(s):
        ns = _date_ns(text, *m.groups())
    else:
        raise TimeError(f"cannot parse time {text!r}; {HELP}")
    if not 0 <= ns <= MAX_NS:
        raise TimeError(f"time {text!r} is out of range: give a time from {RANGE}")
    return ns


def _date_ns(text: str, y: str, mo: str, d: str, hh: str | None, mm: str | None,
             ss: str | None, frac: str | None, tz: str | None) -> int:
    try:
        base = datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(ss or 0))
    except ValueError as e:
        raise TimeError(f"cannot parse time {text!r}: {e}") from None
    # The clock fields as seconds since the epoch, as if they were UTC.
    wall = (base - datetime(1970, 1, 1)) // timedelta(seconds=1)
    if not -_DAY <= wall <= MAX_NS // NS + _DAY:
        raise TimeError(f"time {text!r} is out of range: give a time from {RANGE}")
    if tz is None:
        secs = _local(wall, text)  # naive means local time, as in n2disk
    elif tz.upper() == "Z":
        secs = wall
    else:
        hours, minutes = int(tz[1:3]), int(tz[3:].lstrip(":") or 0)
        if hours > 23 or minutes > 59:
            raise TimeError(f"bad UTC offset {tz!r} in {text!r}: give one from -23:59 to +23:59")
        secs = wall - (-1 if tz[0] == "-" else 1) * (hours * 3600 + minutes * 60)
    return secs * NS + _frac_ns(frac)


def _local(wall: int, text: str) -> int:
    """The one instant (epoch seconds) whose local clock reads `wall`.

    Around a daylight-saving change a clock reading exists never (the hour skipped in spring)
    or twice (the hour repeated in autumn). Guessing would move the window by an hour without
    a word, so both are refused, naming the instants the user may have meant; an explicit UTC
    offset (`2025-10-26 02:30:00+01:00`) says which.
    """
    offsets = {_gmtoff(wall + d) for d in (-_DAY, 0, _DAY)}  # every offset in force nearby
    found = sorted(wall - off for off in offsets if _gmtoff(wall - off) == off)
    if len(found) == 1:
        return found[0]
    clock = text.strip()
    if found:
        first, second = (f"{_offset_form(clock, t)!r} ({_zone(t)}, the {nth})"
                         for t, nth in zip(found, ("first", "second"), strict=False))
        raise TimeError(
            f"local time {clock!r} happens twice (the clocks went back from {_zone(found[0])} "
            f"to {_zone(found[-1])}); give {first} or {second}"
        )
    # In a gap: what the reading means under each offset, shown as the clock then reads.
    meant = sorted({wall - off for off in offsets})
    choices = [f"{_clock_form(clock, t)!r} ({_zone(t)})" for t in meant]
    raise TimeError(
        f"local time {clock!r} does not exist (the clocks jumped forward from "
        f"{_zone(meant[0])} to {_zone(meant[-1])}); give {' or '.join(choices)}"
    )


def _gmtoff(secs: int) -> int:
    return time.localtime(secs).tm_gmtoff


def _zone(secs: int) -> str:
    """`CEST +02:00`: the local zone's name and UTC offset at `secs` (the offset alone where
    the name is one too)."""
    name, off = time.localtime(secs).tm_zone, _offset_text(_gmtoff(secs))
    return off if name[:1] in "+-" else f"{name} {off}"


def _offset_text(off: int) -> str:
    h, rest = divmod(abs(off), 3600)
    text = f"{'-' if off < 0 else '+'}{h:02d}:{rest // 60:02d}"
    return text + (f":{rest % 60:02d}" if rest % 60 else "")


def _clock_form(text: str, secs: int) -> str:
    """`text` rewritten to the local clock reading of `secs` (keeping any fraction)."""
    frac = _DATE.match(text).group(7)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(secs)) + (f".{frac}" if frac else "")


def _offset_form(text: str, secs: int) -> str:
    """`text` with the UTC offset in force at `secs` appended, which makes it unambiguous."""
    return text + _offset_text(_gmtoff(secs))


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
