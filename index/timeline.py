"""The timeline: 10-minute UTC slot directories holding relative links to pcaps and indexes.

It follows n2disk's `YYYY/MM/DD/HH/MM/` tree so that operators' scripts keep working, but in
UTC (see docs/FORMAT.md for why). A reader finds the files of a window by listing a handful of
slot directories; the link names carry each file's first-packet time, so no file is opened.
"""

from __future__ import annotations

import calendar
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .atomicfile import read_small_file, temp_path, write_atomic
from .errors import DumpSetError

SLOT_SECONDS = 600
PCAP_SUFFIXES = (".pcap", ".pcap.zst")
MARKER = ".pcapvault-timeline"
MARKER_LIMIT = 1 << 20  # markers are a few hundred bytes: a larger one is not ours
FORMAT_VERSION = 1


def is_pcap_name(name: str) -> bool:
    """A finished pcap, plain or compressed (hidden names are files being written)."""
    return name.endswith(PCAP_SUFFIXES) and not name.startswith(".")


def slot_of(sec: int) -> int:
    """Start (epoch seconds) of the slot holding `sec`."""
    return sec - sec % SLOT_SECONDS


def slot_dir(root: Path, slot_sec: int) -> Path:
    t = time.gmtime(slot_sec)
    return root / (
        f"{t.tm_year:04d}/{t.tm_mon:02d}/{t.tm_mday:02d}/{t.tm_hour:02d}/{t.tm_min:02d}"
    )


def _prefix_range(parts: list[int]) -> tuple[int, int]:
    """[start, end) in epoch seconds of a YYYY[/MM[/DD[/HH[/MM]]]] directory."""
    y, mo, d, h, mi = (parts + [1, 1, 0, 0][len(parts) - 1 :])[:5]
    start = calendar.timegm((y, mo, d, h, mi, 0))
    if len(parts) == 1:
        return start, calendar.timegm((y + 1, 1, 1, 0, 0, 0))
    if len(parts) == 2:
        return start, calendar.timegm((y + mo // 12, mo % 12 + 1, 1, 0, 0, 0))
    return start, start + (86400, 3600, SLOT_SECONDS)[len(parts) - 3]


def existing_slots(root: Path, begin_sec: int, end_sec: int) -> Iterator[int]:
    """Slot starts of the slot directories that exist and overlap [begin_sec, end_sec].

    Walks the tree and prunes whole years, months, days and hours outside the range, so an
    open-ended query costs what the dump set holds, not what the calendar holds.
    """

    def walk(d: Path, parts: list[int]) -> Iterator[int]:
        try:
            # ASCII digits only: str.isdigit() takes "²" too, which int() refuses
            names = sorted(n for n in os.listdir(d) if n.isascii() and n.isdigit())
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in names:
            p = parts + [int(name)]
            try:
                start, end = _prefix_range(p)
            except (ValueError, OverflowError):
                continue
            if end <= begin_sec or start > end_sec:
                continue
            if len(p) == 5:
                yield start
            else:
                yield from walk(d / name, p)

    return walk(root, [])


def write_json_atomic(path: Path, obj: dict) -> None:
    """Markers are read by other processes at any moment, so they appear whole or not at all."""
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json_marker(path: Path, kind: str, missing: str) -> dict:
    """Read a `{"format": "pcapvault-KIND", "version": N}` marker, refusing other versions."""
    try:
        meta = json.loads(read_small_file(path, MARKER_LIMIT))
    except FileNotFoundError:
        raise DumpSetError(missing) from None
    except PermissionError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        raise DumpSetError(f"{path} is unreadable or damaged ({e}); run npcaprepair") from None
    if not isinstance(meta, dict) or meta.get("format") != f"pcapvault-{kind}":
        raise DumpSetError(f"{path} is not a pcapvault {kind} marker")
    if meta.get("version") != FORMAT_VERSION:
        raise DumpSetError(
            f"{path}: {kind} version {meta.get('version')} is not supported "
            f"(this release reads version {FORMAT_VERSION})"
        )
    return meta


def read_marker(root: Path) -> dict:
    meta = read_json_marker(
        root / MARKER, "timeline", f"{root} is not a pcapvault timeline (no {MARKER})"
    )
    if not isinstance(meta.get("dumpset"), str) or not meta["dumpset"]:
        raise DumpSetError(f"{root / MARKER} is damaged (its dumpset is "
                           f"{meta.get('dumpset')!r}, not a path); run npcaprepair")
    return meta


def ensure_marker(root: Path, dumpset_root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if (root / MARKER).exists():
        read_marker(root)
        return
    write_json_atomic(
        root / MARKER,
        {
            "format": "pcapvault-timeline",
            "version": FORMAT_VERSION,
            "slot_seconds": SLOT_SECONDS,
            "dumpset": os.path.relpath(dumpset_root, root),
        },
    )


def link(root: Path, slot_sec: int, target: Path) -> Path:
    """Link `target` into its slot under the target's own name, replacing a stale link.

    The link is made under a temporary name and renamed, so a reader never sees a half state.
    A symlink has no content to write or sync, so atomic_write does not apply; the name is
    its convention's.
    """
    d = slot_dir(root, slot_sec)
    d.mkdir(parents=True, exist_ok=True)
    dest = d / target.name
    tmp = temp_path(dest)
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(os.path.relpath(target, d), tmp)
    os.replace(tmp, dest)
    return dest


def unlink(root: Path, slot_sec: int, name: str) -> int:
    """Remove the links named `name` and `name.idx` from a slot; return the bytes freed."""
    d = slot_dir(root, slot_sec)
    freed = 0
    for n in (name, name + ".idx"):
        p = d / n
        try:
            freed += p.lstat().st_size
            p.unlink()
        except FileNotFoundError:
            pass
    prune_empty(root, d)
    return freed


def prune_empty(root: Path, d: Path) -> None:
    """Remove `d` and its empty parents up to (not including) the timeline root."""
    root = root.resolve()
    d = d.resolve() if d.exists() else d
    while d != root and root in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def slot_entries(root: Path, slot_sec: int) -> list[str]:
    """Link names of finished pcaps in one slot (hidden in-progress names excluded)."""
    try:
        names = os.listdir(slot_dir(root, slot_sec))
    except FileNotFoundError:
        return []
    return [n for n in names if is_pcap_name(n)]


def link_size(root: Path) -> int:
    """Bytes used by the timeline's links and directories, for the disk budget."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total
