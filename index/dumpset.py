"""The dump set: where finished pcaps, their indexes and the timeline live on disk.

The recorder, the extractor and the repair tool all go through this one module, so the layout
in docs/FORMAT.md has a single implementation. Files are named by the epoch of their first
packet (n2disk's `<epoch.usec>` convention) and grouped in storage directories named the same
way.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import timeline
from .errors import DumpSetError

log = logging.getLogger("pcapvault.dumpset")
MARKER = ".pcapvault"
FORMAT_VERSION = timeline.FORMAT_VERSION
TEMP_PREFIX = ".rec-"
LINKS_LOCK = ".links.lock"
TEMP_SUFFIX = ".pcap.part"
# How much later than its first packet a file's name may be (see DumpSet.place).
NAME_SLACK_NS = 1_000_000


def file_name(first_ns: int) -> str:
    """`epoch.usec` name of a file whose first packet is at `first_ns`."""
    sec, ns = divmod(first_ns, 1_000_000_000)
    return f"{sec}.{ns // 1000:06d}"


def parse_name(name: str) -> int | None:
    """First-packet time (ns, microsecond resolution) from an `epoch.usec[.pcap]` name."""
    stem = name.removesuffix(".idx").removesuffix(".zst").removesuffix(".pcap")
    sec, dot, usec = stem.partition(".")
    if not (dot and sec.isascii() and sec.isdigit() and usec.isascii() and usec.isdigit()
            and len(usec) == 6):  # str.isdigit() takes "²" too, which int() refuses
        return None
    return int(sec) * 1_000_000_000 + int(usec) * 1000


class TimelineMismatch(DumpSetError):
    """-A names another timeline than the one the existing dump set records (a usage error)."""


def _same_path(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _timeline_entry(tl: Path, root: Path) -> str:
    """The marker's `timeline`: relative when inside the dump set, so the two move together."""
    return os.path.relpath(tl, root) if tl.is_relative_to(root) else str(tl)


def _marked_ancestor(path: Path) -> tuple[Path, str] | None:
    """The nearest directory from `path` up holding a dump set or timeline marker."""
    for d in (path, *path.parents):
        for marker, what in ((MARKER, "dump set"), (timeline.MARKER, "timeline")):
            if (d / marker).exists():
                return d, what
    return None


def _owned_timeline(d: Path, root: Path) -> bool:
    """Whether the timeline marked at `d` names `root` as its dump set."""
    try:
        owner = Path(timeline.read_marker(d).get("dumpset", ""))
    except DumpSetError:
        return False
    return _same_path(owner if owner.is_absolute() else d / owner, root)


def _marked_below(root: Path, depth: int = 2) -> tuple[Path, str] | None:
    """A dump set or timeline marker in the directories `depth` levels below `root`, other
    than `root`'s own timeline and storage directories. Bounded so that it is cheap on every
    start: a dump set is not normally buried deeper under another -o."""
    own_set = (root / MARKER).exists()
    level = [root]
    for _ in range(depth):
        below = []
        for d in level:
            try:
                entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for e in entries:
                if own_set and d == root and parse_name(e.name) is not None:
                    continue  # a storage directory: holds files, not markers
                p = Path(e.path)
                if (p / MARKER).exists():
                    return p, "dump set"
                if (p / timeline.MARKER).exists():
                    if _owned_timeline(p, root):
                        continue
                    return p, "timeline"
                below.append(p)
        level = below
    return None


def refuse_nested(root: Path) -> None:
    """A dump set inside another dump set or a timeline, or holding one, would be counted,
    deleted and found by both (or by neither): refuse it.
    """
    root = Path(os.path.realpath(root))
    if (root / timeline.MARKER).exists() and not (root / MARKER).exists():
        raise DumpSetError(f"{root} is a timeline, not a dump set; choose another -o")
    found = _marked_ancestor(root.parent)
    if found:
        d, what = found
        raise DumpSetError(f"{root} is inside the {what} {d}; choose an -o outside it")
    found = _marked_below(root)
    if found:
        d, what = found
        raise DumpSetError(f"{root} holds the {what} {d}; choose an -o beside it, not above it")


def _ensure_timeline(tl: Path, root: Path) -> None:
    """Create (or check) the timeline of the dump set at `root`, with its marker."""
    tl = Path(os.path.realpath(tl))
    below = _marked_below(tl)
    if below:  # -A above dump sets: theirs would then lie inside a timeline
        d, what = below
        raise DumpSetError(f"timeline {tl} holds the {what} {d}; choose an -A beside it, "
                           "not above it")
    found = _marked_ancestor(tl)
    if found and not _same_path(found[0], root):
        d, what = found
        if what == "dump set" or d != tl:
            raise DumpSetError(f"timeline {tl} is inside the {what} {d}; choose another -A")
        owner = Path(timeline.read_marker(tl).get("dumpset", ""))
        if not _same_path(owner if owner.is_absolute() else tl / owner, root):
            raise DumpSetError(
                f"timeline {tl} belongs to another dump set ({(tl / owner).resolve()}); "
                "choose another -A"
            )
    try:
        timeline.ensure_marker(tl, root)
    except OSError as e:
        raise DumpSetError(
            f"cannot create the timeline {tl}: {e.strerror}; choose another -A or fix its "
            "permissions"
        ) from None


# The marker's fields its readers take as they are, and the values each may have
# (docs/FORMAT.md, "Dump set"); `file_bytes` is read leniently (DumpSet.file_bytes).
_META_FIELDS: dict[str, Callable[[object], bool]] = {
    "timeline": lambda v: isinstance(v, str) and v != "",
    "interface": lambda v: isinstance(v, str),
    "linktype": lambda v: type(v) is int and 0 <= v < 1 << 32,
    "snaplen": lambda v: type(v) is int and 0 <= v < 1 << 32,
    "files_per_dir": lambda v: type(v) is int and v > 0,
    "precision": lambda v: v in ("ns", "us"),
}


def _check_meta(path: Path, meta: dict) -> None:
    """A marker whose fields have other types or values: damage, said in one line (its
    readers would fail on it with a traceback, or read the files wrongly)."""
    for key, ok in _META_FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise DumpSetError(f"{path} is damaged ({key} is {meta[key]!r}); correct it as "
                               "docs/FORMAT.md (\"Dump set\") describes")


@dataclass(frozen=True, order=True)
class StoredFile:
    """One finished pcap of a dump set; ordering is by first-packet time."""

    first_ns: int
    pcap: Path

    @property
    def name(self) -> str:
        return self.pcap.name

    @property
    def index(self) -> Path:
        return self.pcap.with_name(self.pcap.name + ".idx")

    @property
    def slot(self) -> int:
        return timeline.slot_of(self.first_ns // 1_000_000_000)

    def named_for(self, first_ns: int, last_ns: int) -> bool:
        """Whether this file's name fits packets from `first_ns` to `last_ns` (an index's
        span): its first packet's microsecond, or up to NAME_SLACK_NS later when that one was
        taken (`place`), then possibly after its last packet. An index of another file,
        copied or renamed, has another span."""
        return first_ns // 1000 * 1000 <= self.first_ns <= max(last_ns, first_ns + NAME_SLACK_NS)


class DumpSet:
    """A dump set directory with its marker and timeline."""

    def __init__(self, root: Path, meta: dict):
        self.root = root
        self.meta = meta
        _check_meta(root / MARKER, meta)
        tl = Path(meta.get("timeline", "timeline"))
        self.timeline = tl if tl.is_absolute() else root / tl
        self.files_per_dir = int(meta.get("files_per_dir", 1000))

    # --- creation and opening -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        *,
        interface: str,
        linktype: int,
        snaplen: int,
        nanosecond: bool,
        timeline_dir: Path | None = None,
        files_per_dir: int = 1000,
        file_bytes: int | None = None,
    ) -> DumpSet:
        """Create a dump set, or adopt the one already at `root` (a restart, see `_adopt`).

        The marker is written last, once the timeline it names exists: a start that fails on a
        bad -A leaves nothing behind that a later start would have to adopt.
        """
        root = Path(root).absolute()
        refuse_nested(root)
        tl = Path(timeline_dir).absolute() if timeline_dir else None
        if (root / MARKER).exists():
            ds = cls.open(root)
            ds._check_same_source(interface, nanosecond)
            if tl is not None and not _same_path(tl, ds.timeline):
                ds._move_timeline(tl)
            _ensure_timeline(ds.timeline, ds.root)
            ds._adopt(snaplen, files_per_dir, file_bytes)
            return ds
        tl = tl or root / "timeline"
        root.mkdir(parents=True, exist_ok=True)
        _ensure_timeline(tl, root)
        meta = {
            "format": "pcapvault-dumpset",
            "version": FORMAT_VERSION,
            "timeline": _timeline_entry(tl, root),
            "interface": interface,
            "linktype": linktype,
            "precision": "ns" if nanosecond else "us",
            "snaplen": snaplen,
            "files_per_dir": files_per_dir,
        }
        if file_bytes is not None:
            meta["file_bytes"] = file_bytes
        timeline.write_json_atomic(root / MARKER, meta)
        return cls(root, meta)

    def _check_same_source(self, interface: str, nanosecond: bool) -> None:
        """Refuse a restart on another interface or timestamp precision: one dump set holds one
        interface's packets (its name, link type and timeline are that interface's), and
        extraction writes every file's records under one header."""
        recorded = self.meta.get("interface")
        if recorded and recorded != interface:
            raise DumpSetError(
                f"{self.root} is the dump set of interface {recorded}, not {interface}; give "
                f"-i {recorded}, or another -o for {interface}"
            )
        if self.nanosecond != nanosecond:
            has, opt = ("nanosecond", "leave out --usec") if self.nanosecond else (
                "microsecond", "add --usec")
            raise DumpSetError(f"{self.root} records {has} timestamps; {opt}, or give another -o")

    def _adopt(self, snaplen: int, files_per_dir: int, file_bytes: int | None) -> None:
        """Take a restart's -s, --files-per-dir and -p into the marker.

        `snaplen` only grows: the files already recorded keep their longer records, and
        extraction's one header must cover them all (n2disk's files each carry their own -s).
        `files_per_dir` applies to storage directories started from now on. `file_bytes`, the
        -p, is kept so that npcapimport cuts files as the recorder does.
        """
        meta = dict(self.meta)
        meta["snaplen"] = max(int(meta.get("snaplen", 0)), snaplen)
        if self.files_per_dir != files_per_dir:
            log.warning("--files-per-dir %d replaces the %d of %s for storage directories "
                        "started from now on", files_per_dir, self.files_per_dir, self.root)
            meta["files_per_dir"] = files_per_dir
        if file_bytes is not None:
            meta["file_bytes"] = file_bytes
        if meta != self.meta:
            self.meta = meta
            self.files_per_dir = files_per_dir
            timeline.write_json_atomic(self.root / MARKER, meta)

    @property
    def file_bytes(self) -> int | None:
        """The recorder's -p at its last start (None: no recorder has run, or an older one)."""
        v = self.meta.get("file_bytes")
        return v if type(v) is int and v > 0 else None

    def _move_timeline(self, tl: Path) -> None:
        """Adopt -A `tl` in place of a recorded timeline that does not exist (any more).

        A timeline holds only links, which the repair on start rebuilds, so pointing the marker
        elsewhere loses nothing once the old one is gone; while it exists, -A is refused
        rather than silently ignored or split over two timelines.
        """
        if (self.timeline / timeline.MARKER).exists():
            raise TimelineMismatch(
                f"-A {tl} differs from the timeline {self.timeline} of the existing dump set "
                f"{self.root}; leave out -A to keep it, or to move it stop the recorder, delete "
                f"{self.timeline} (it holds only links) and start again with -A {tl}: the "
                "start links every file into the new timeline"
            )
        _ensure_timeline(tl, self.root)
        self.meta = {**self.meta, "timeline": _timeline_entry(tl, self.root)}
        timeline.write_json_atomic(self.root / MARKER, self.meta)
        self.timeline = tl

    def timeline_problem(self) -> str:
        """Why this dump set's timeline is unusable, or '' when it is fine.

        For `npcaprepair`: a timeline that is missing, unmarked or marked as another dump
        set's is not something repair can fix by relinking files.
        """
        tl = self.timeline
        if not tl.is_dir():
            return f"its timeline {tl} does not exist"
        try:
            tmeta = timeline.read_marker(tl)
        except DumpSetError as e:
            return str(e)
        owner = Path(tmeta.get("dumpset", ""))
        owner = owner if owner.is_absolute() else tl / owner
        if not _same_path(owner, self.root):
            return f"its timeline {tl} belongs to the dump set {owner.resolve()}"
        return ""

    @classmethod
    def open(cls, path: Path | str) -> DumpSet:
        """Open a dump set given its directory or its timeline directory."""
        path = Path(path).absolute()
        if not path.exists():
            raise DumpSetError(f"{path} does not exist; give the recorder's -o directory")
        if not path.is_dir():
            raise DumpSetError(f"{path} is not a directory; give the recorder's -o directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise PermissionError(f"no permission to read {path}")
        if (path / timeline.MARKER).exists() and not (path / MARKER).exists():
            tmeta = timeline.read_marker(path)
            ds_root = Path(tmeta["dumpset"])
            path = (ds_root if ds_root.is_absolute() else path / ds_root).resolve()
        meta = timeline.read_json_marker(
            path / MARKER,
            "dumpset",
            f"{path} is not a pcapvault dump set (no {MARKER}); give the recorder's -o "
            "directory or its timeline",
        )
        return cls(path, meta)

    # --- layout -----------------------------------------------------------------------------

    @property
    def nanosecond(self) -> bool:
        return self.meta.get("precision", "ns") == "ns"

    def temp_path(self, tag: str | int) -> Path:
        """Name of a file being written: hidden, so no reader ever takes it for a finished one."""
        return self.root / f"{TEMP_PREFIX}{tag}{TEMP_SUFFIX}"

    def temp_files(self) -> list[Path]:
        """The recorder's unfinished pcaps: regular files only (npcaprepair truncates and
        places them; a symlink there would lead it to a file outside the dump set)."""
        return sorted(Path(e.path) for e in os.scandir(self.root)
                      if e.name.startswith(TEMP_PREFIX) and e.name.endswith(TEMP_SUFFIX)
                      and e.is_file(follow_symlinks=False))

    def storage_dirs(self) -> list[Path]:
        dirs = []
        for e in os.scandir(self.root):
            if e.is_dir(follow_symlinks=False) and parse_name(e.name) is not None:
                dirs.append(Path(e.path))
        return sorted(dirs, key=lambda p: parse_name(p.name))

    def files(self) -> list[StoredFile]:
        """Every finished pcap, oldest first, found from the storage directories: regular
        files only, since what is listed here is truncated, rewritten and deleted (a symlink
        would make that happen to its target, outside the dump set)."""
        out = []
        for d in self.storage_dirs():
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue  # emptied and removed by another process meanwhile
            for e in entries:
                if timeline.is_pcap_name(e.name) and e.is_file(follow_symlinks=False):
                    first = parse_name(e.name)
                    if first is not None:
                        out.append(StoredFile(first, Path(e.path)))
        out.sort()
        return out

    @staticmethod
    def _count(d: Path) -> int:
        try:
            return sum(map(timeline.is_pcap_name, os.listdir(d)))
        except FileNotFoundError:
            return 0

    def placement(self, first_ns: int) -> StoredFile:
        """Where `place` puts a pcap whose first packet is at `first_ns`: its storage directory
        and its name, collisions included. An import records the name before placing the
        file, so that a stop in between is undone by the name the file really has."""
        name = file_name(first_ns)
        dirs = self.storage_dirs()
        target_dir = dirs[-1] if dirs else None
        if target_dir is None or parse_name(target_dir.name) > first_ns or (
            self._count(target_dir) >= self.files_per_dir
        ):
            target_dir = self.root / name
        return self._free_name(first_ns, target_dir)

    def _free_name(self, first_ns: int, d: Path, taken: set[str] = frozenset()) -> StoredFile:
        """The file for `first_ns` in directory `d`, under the first free name from its own.

        Names have microsecond resolution: two files whose first packets fall in the same
        microsecond (SIGUSR1 right after a packet) would collide, and a start's repair would
        then fail on it for good. The later one takes the next free microsecond instead;
        readers allow NAME_SLACK_NS for it. `taken`: names planned but not yet placed.
        """
        name = wanted = file_name(first_ns)
        for _ in range(NAME_SLACK_NS // 1000):
            if name not in taken and not self._name_taken(name, d):
                return StoredFile(first_ns, d / f"{name}.pcap")
            first_ns = parse_name(name) + 1000
            name = file_name(first_ns)
        raise DumpSetError(f"{d / wanted}.pcap and the names after it exist; "
                           "refusing to overwrite recorded data")

    def placements(self, firsts: list[int]) -> list[StoredFile]:
        """Where `place` is to put pcaps whose first packets are at `firsts` (in order), as
        npcapimport places them: many at once, often older than the recorder's files.

        Each goes into the storage directory with the latest name not after it while that
        one has room for it (`files_per_dir`), else into a new one named for it; so files
        imported among later ones fill directories as recorded files do, instead of taking
        a new directory each (`placement`'s rule for the recorder, whose files come last).
        """
        dirs = self.storage_dirs()
        starts = [parse_name(d.name) for d in dirs]
        counts: dict[Path, int] = {}
        taken: set[str] = set()
        out = []
        for first in firsts:
            k = bisect.bisect_right(starts, first) - 1
            d = dirs[k] if k >= 0 else None
            if d is None or counts.setdefault(d, self._count(d)) >= self.files_per_dir:
                d = self.root / file_name(first)
                if d not in counts:
                    k = bisect.bisect_right(starts, first)
                    dirs.insert(k, d)
                    starts.insert(k, parse_name(d.name))
                    counts[d] = self._count(d)
            sf = self._free_name(first, d, taken)
            taken.add(sf.name.removesuffix(".pcap"))
            counts[d] += 1
            out.append(sf)
        return out

    def place(self, temp_pcap: Path, first_ns: int, at: StoredFile | None = None) -> StoredFile:
        """Move a complete pcap from its temporary name to its final name in a storage dir:
        `at`, chosen by `placement` beforehand, else chosen now."""
        if at is None:
            at = self.placement(first_ns)
        elif self._name_taken(at.pcap.name.removesuffix(".pcap"), at.pcap.parent):
            raise DumpSetError(f"{at.pcap} was taken meanwhile; refusing to overwrite recorded "
                               "data: run again")
        final = at.pcap
        # Another process (the indexer cleaning up after the budget) may remove an empty
        # storage directory between our choice and the rename: recreate it and retry.
        for attempt in range(3):
            final.parent.mkdir(exist_ok=True)
            try:
                os.rename(temp_pcap, final)
                break
            except FileNotFoundError:
                if attempt == 2 or not temp_pcap.exists():
                    raise
        return at

    def _name_taken(self, name: str, d: Path | None = None) -> bool:
        """Whether the newest storage directory, `d` or the timeline already holds this name."""
        slot = timeline.slot_dir(self.timeline, timeline.slot_of(parse_name(name) // 10**9))
        dirs = [*self.storage_dirs()[-1:], slot, *([d] if d else [])]
        return any((d / f"{name}{suf}").exists() for d in dirs for suf in timeline.PCAP_SUFFIXES)

    def link(self, sf: StoredFile) -> None:
        """Make a finished, indexed file visible to extraction through the timeline."""
        timeline.link(self.timeline, sf.slot, sf.pcap)
        if sf.index.exists():
            timeline.link(self.timeline, sf.slot, sf.index)

    @contextmanager
    def links_locked(self) -> Iterator[None]:
        """Serialise linking and deleting across processes (recorder and its indexer).

        Without it the indexer could check that a file still exists, the budget delete it and
        its (not yet made) links, and the indexer then link a file that is gone.
        """
        fd = os.open(self.root / LINKS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def link_if_present(self, sf: StoredFile) -> bool:
        """Link `sf` unless it was deleted meanwhile (then clear what is left of it)."""
        with self.links_locked():
            if sf.pcap.exists():
                self.link(sf)
                return True
            self._delete(sf)
            return False

    def delete(self, sf: StoredFile,
               keep: Callable[[StoredFile], bool] | None = None) -> int | None:
        """Delete a pcap with its index and links (links first: readers stop seeing it first).

        Returns the bytes freed, or None when `keep(sf)`, asked under the links lock, says to
        keep it (a legal hold placed meanwhile: index/holds.py changes holds under that lock).
        """
        with self.links_locked():
            if keep is not None and keep(sf):
                return None
            return self._delete(sf)

    def _delete(self, sf: StoredFile) -> int:
        freed = timeline.unlink(self.timeline, sf.slot, sf.name)
        for p in (sf.index, sf.pcap):
            try:
                freed += p.stat().st_size
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            sf.pcap.parent.rmdir()
        except OSError:
            pass
        return freed

    # --- queries ----------------------------------------------------------------------------

    def files_in_window(self, begin_ns: int, end_ns: int) -> list[StoredFile]:
        """Files that may hold packets in [begin_ns, end_ns), found from the timeline only.

        A file's packets lie in [its first time, the next file's first time), so the file just
        before the window still counts; one slot of look-back finds it. Kernel timestamps may
        step back slightly across CPUs, hence one second of slack.
        """
        lo = begin_ns - 1_000_000_000
        first_slot = timeline.slot_of(lo // 1_000_000_000) - timeline.SLOT_SECONDS
        last_slot = (end_ns - 1) // 1_000_000_000
        found: list[StoredFile] = []
        for slot in timeline.existing_slots(self.timeline, first_slot, last_slot):
            d = timeline.slot_dir(self.timeline, slot)
            for n in timeline.slot_entries(self.timeline, slot):
                first = parse_name(n)
                if first is not None:
                    found.append(StoredFile(first, (d / n)))
        # A name is one file: a stray copy of a slot (or a link in the wrong slot) must not
        # make a reader take its packets twice.
        found = sorted({sf.name: sf for sf in found}.values())
        out = []
        for i, sf in enumerate(found):
            nxt = found[i + 1].first_ns if i + 1 < len(found) else None
            if sf.first_ns >= end_ns + NAME_SLACK_NS:
                break
            if nxt is not None and nxt <= lo:
                continue
            out.append(sf)
        return out

    def usage(self) -> int:
        """Bytes of pcaps, indexes and timeline counted against the disk budget."""
        total = timeline.link_size(self.timeline)
        for sf in self.files():
            for p in (sf.pcap, sf.index):
                try:
                    total += p.stat().st_size
                except FileNotFoundError:
                    pass
        for p in self.temp_files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass
        return total
