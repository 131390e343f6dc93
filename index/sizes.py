"""Sizes on command lines and in configuration files: one meaning for every command.

A size is a number of bytes, with an optional unit K, M, G or T (powers of 1024; `B` or `iB`
may follow, any case): `1500`, `64K`, `256M`, `1.5GiB`. A number without a unit is bytes, as
for npcapextract --max-bytes, dd and split; the recorder once read it as MB (n2disk's `-p`),
so its options refuse a size too small to be meant (see `parse_size`'s `minimum`).
"""

from __future__ import annotations

import re

from .errors import PcapVaultError

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


class SizeError(PcapVaultError):
    """Not a size, or one below what the option can use."""


def format_size(n: int) -> str:
    """The shortest exact spelling of `n` bytes in the units parse_size reads (`16K`)."""
    for unit in "TGMK":
        if n and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)


def human_size(n: int) -> str:
    """`n` bytes rounded for people, in the same binary units (`12.3 MiB`, which parse_size
    reads back): a progress line must not say MB for 10**6 where an option says 2**20."""
    for unit in "TGMK":
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:.1f} {unit}iB"
    return f"{n} B"


def parse_size(text: str, what: str = "size", minimum: int = 1) -> int:
    """`text` in bytes; below `minimum` is refused, naming the unit a bare number lacks."""
    m = _SIZE.match(text)
    if not m:
        raise SizeError(
            f"bad {what} {text!r}: give a number with an optional unit, e.g. 500MB, 2GB"
        )
    n = int(float(m.group(1)) * UNITS[m.group(2).upper()])
    if n <= 0:
        raise SizeError(f"bad {what} {text!r}: it must be above zero")
    if n < minimum:
        hint = f" (a number without a unit is bytes: write e.g. {text.strip()}M)" if (
            not m.group(2)) else ""
        raise SizeError(f"bad {what} {text!r}: it must be at least {format_size(minimum)}{hint}")
    return n
