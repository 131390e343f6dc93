"""The processes below a process (a server's workers and helpers), from /proc."""

from __future__ import annotations

from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, children before their own (those alive when asked)."""
    found: list[int] = []
    try:
        kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir()
                for k in (t / "children").read_text().split()]
    except OSError:
        return found
    for k in kids:
        found += [k, *descendants(k)]
    return found
