"""Legal holds: time windows of a dump set whose files nothing may delete.

During an incident the evidence must not rotate away while the disk keeps filling, so the
disk budget, `recorder --max-age` and `npcapmanage delete` all ask `HoldSet.holds` before
deleting a file. The holds live in one small JSON file at the dump set's root (docs/FORMAT.md,
"Holds"), replaced atomically, and changed only under the dump set's links lock, which the
deleting side also holds: a hold placed while the budget deletes is seen before the next
deletion. A damaged holds file is an error, never "no holds": reading it as empty would let
held data go.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomicfile import atomic_write, read_small_file
from .dumpset import NAME_SLACK_NS, DumpSet, StoredFile
from .errors import FormatError, PcapVaultError
from .jsonvalues import whole
from .postings import HEADER_LEN, parse_header
from .times import MAX_NS

HOLDS_FILE = "holds"
FORMAT = "pcapvault-holds"
VERSION = 1
FILE_MODE = 0o640
# A reason is a case number or a sentence: one line of printable characters (a newline or an
# escape sequence would forge rows in `npcapmanage holds` and lines in the audit's readers).
MAX_REASON = 1000


class HoldError(PcapVaultError):
    """A hold cannot be placed or released as asked (empty window, unknown id)."""


@dataclass(frozen=True)
class Hold:
    id: str  # short, printable, unique in the dump set (never reused)
    begin_ns: int
    end_ns: int
    reason: str
    user: str  # who placed it (the login name of the caller)
    created_ns: int
    files: tuple[str, ...]  # the pcap names (relative to the dump set root) it held when placed


def holds_path(ds: DumpSet) -> Path:
    return ds.root / HOLDS_FILE


def _key(name: str) -> str:
    """A file's name as holds compare it: compression (`.pcap` to `.pcap.zst`) keeps it held."""
    return name.removesuffix(".zst")


def last_packet_ns(sf: StoredFile) -> int | None:
    """Time of the last packet of `sf`: from its index header, else (not yet indexed) the pcap's
    modification time, which is no earlier for a recorded file. None when the file is gone.
    """
    try:
        with open(sf.index, "rb") as f:
            return parse_header(f.read(HEADER_LEN), str(sf.index)).last_ns
    except (OSError, FormatError):
        pass
    try:
        return sf.pcap.stat().st_mtime_ns
    except OSError:
        return None


class HoldSet:
    """The holds of one dump set, as read from its holds file."""

    def __init__(self, root: Path, holds: list[Hold], next_id: int = 1):
        self.root = root
        self._holds = holds
        self.next_id = next_id
        self._named = {_key(n) for h in holds for n in h.files}

    def __bool__(self) -> bool:
        return bool(self._holds)

    def list(self) -> list[Hold]:
        return list(self._holds)

    def holds(self, sf: StoredFile, last_ns: int | None = None) -> bool:
        """Whether any hold covers `sf`: it was named when the hold was placed, or its packets
        overlap a hold's window (a file still being written then, or imported later).

        `last_ns`, the file's last packet time, is read from its index when not given.
        """
        if not self._holds:
            return False
        try:
            rel = sf.pcap.relative_to(self.root).as_posix()
        except ValueError:
            rel = sf.pcap.as_posix()
        if _key(rel) in self._named:
            return True
        # A name may be up to NAME_SLACK_NS later than the file's first packet.
        later = [h for h in self._holds if sf.first_ns - NAME_SLACK_NS < h.end_ns]
        if not later:
            return False
        last = last_packet_ns(sf) if last_ns is None else last_ns
        return last is None or any(last >= h.begin_ns for h in later)


def _int(doc: dict, key: str, low: int = 0) -> int:
    return whole(doc[key], key, low, MAX_NS)


def _str(doc: dict, key: str) -> str:
    v = doc[key]
    if not isinstance(v, str):
        raise ValueError(f"{key} is not a string")
    return v


def _hold(h: dict) -> Hold:
    files = h["files"]
    if not isinstance(files, list) or not all(isinstance(n, str) for n in files):
        raise ValueError("files is not a list of names")
    return Hold(_str(h, "id"), _int(h, "begin_ns"), _int(h, "end_ns"), _str(h, "reason"),
                _str(h, "user"), _int(h, "created_ns"), tuple(files))


def _decode(path: Path, data: bytes) -> HoldSet:
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a pcapvault holds file")
        if doc.get("version") != VERSION:
            raise FormatError(
                f"{path}: holds format version {str(doc.get('version'))[:20]} is unknown to "
                f"this pcapvault, which reads version {VERSION}; use the pcapvault that wrote it"
            )
        if not isinstance(doc["holds"], list):
            raise ValueError("holds is not a list")
        holds = [_hold(h) for h in doc["holds"]]
        return HoldSet(path.parent, holds, _int(doc, "next_id", 1))
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        # RecursionError: a deeply nested array. Every damage is a FormatError, which the
        # recorder's budget answers by deleting nothing (recorder/budget.py).
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise FormatError(
            f"{path} is damaged ({why}); nothing is deleted from the dump set while it is: "
            "restore it from a backup, or remove it to drop every hold"
        ) from None


def load_holds(ds: DumpSet) -> HoldSet:
    """The dump set's holds (none when it has no holds file); a damaged file raises
    FormatError."""
    path = holds_path(ds)
    try:
        data = read_small_file(path)
    except FileNotFoundError:
        return HoldSet(ds.root, [])
    except OSError as e:
        raise FormatError(f"cannot read the holds file {path}: {e.strerror}; nothing is "
                          "deleted from the dump set until it can be read") from None
    return _decode(path, data)


def _store(ds: DumpSet, hs: HoldSet) -> None:
    """Replace the holds file; owned like the dump set, so the recorder's account reads it."""
    doc = {"format": FORMAT, "version": VERSION, "next_id": hs.next_id,
           "holds": [asdict(h) | {"files": list(h.files)} for h in hs.list()]}
    st = os.stat(ds.root)
    with atomic_write(holds_path(ds), mode=FILE_MODE) as f:
        if os.geteuid() == 0:
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
        f.write(json.dumps(doc, indent=1).encode() + b"\n")


def files_overlapping(ds: DumpSet, begin_ns: int, end_ns: int) -> list[StoredFile]:
    """The dump set's files with packets in [begin_ns, end_ns), oldest first.

    A file's packets end before the next file's first one (up to a second of clock steps
    between CPUs), so only the files near the window's start need their index read.
    """
    files = [sf for sf in ds.files() if sf.first_ns - NAME_SLACK_NS < end_ns]
    out = []
    for i, sf in enumerate(files):
        nxt = files[i + 1].first_ns if i + 1 < len(files) else None
        if nxt is not None and nxt + 1_000_000_000 < begin_ns:
            continue
        last = last_packet_ns(sf)
        if last is None or last >= begin_ns:
            out.append(sf)
    return out


def place_hold(ds: DumpSet, begin_ns: int, end_ns: int, reason: str, user: str) -> Hold:
    """Hold every file with packets in [begin_ns, end_ns); files recorded into the window later
    are held too (HoldSet.holds)."""
    if begin_ns >= end_ns:
        raise HoldError("the hold's window is empty: give an END after BEGIN")
    if not reason.strip():
        raise HoldError("give a --reason: a hold must say why it is there")
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise HoldError(f"the --reason must be at most {MAX_REASON} printable characters, on "
                        "one line (no control characters)")
    with ds.links_locked():
        hs = load_holds(ds)
        files = tuple(sf.pcap.relative_to(ds.root).as_posix()
                      for sf in files_overlapping(ds, begin_ns, end_ns))
        hold = Hold(f"h{hs.next_id}", begin_ns, end_ns, reason.strip(), user, time.time_ns(),
                    files)
        _store(ds, HoldSet(ds.root, [*hs.list(), hold], hs.next_id + 1))
    return hold


def release_hold(ds: DumpSet, hold_id: str) -> Hold:
    """Remove a hold; its files may be deleted again (unless another hold covers them)."""
    with ds.links_locked():
        hs = load_holds(ds)
        found = [h for h in hs.list() if h.id == hold_id]
        if not found:
            known = ", ".join(h.id for h in hs.list()) or "none"
            raise HoldError(f"no hold {hold_id!r} in {ds.root} (holds: {known}); "
                            "list them with npcapmanage holds")
        _store(ds, HoldSet(ds.root, [h for h in hs.list() if h.id != hold_id], hs.next_id))
    return found[0]


class HoldWatcher:
    """A dump set's holds, re-read only when the holds file changes (one stat per look), so a
    long-running recorder sees `npcapmanage hold` and `release` without a restart."""

    def __init__(self, ds: DumpSet):
        self.ds = ds
        self._seen: tuple[int, int, int] | None = None
        self._current = HoldSet(ds.root, [])

    def current(self) -> HoldSet:
        """The holds now; FormatError while the file is damaged (then nothing may be deleted)."""
        try:
            st = os.stat(holds_path(self.ds))
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._current = load_holds(self.ds)
            self._seen = seen
        return self._current
