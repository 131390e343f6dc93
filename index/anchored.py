"""A dump set reached only through a descriptor opened once: what the extraction service reads.

The service checks a client's path as root and reads the dump set as the service account. If
each of them resolved the path text on its own, one text could name two directories: a
component root may search and the account may not (`os.path.realpath` then applies `..` to
the text), `..` after a symbolic link, or a link swapped in between. So the path is opened
once, as root; what was opened is checked (its owner, and its place under an allowed
directory, found by walking `..` from the descriptor, not from text); and everything inside
is reached through /proc/self/fd/N, which the kernel follows to that very directory, as
openat() would. The files a query takes are checked again one by one when the timeline names
them: inside the dump set, regular files, owned by the service account.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import timeline
from .dumpset import MARKER, DumpSet, StoredFile
from .errors import DumpSetError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC


class RefusedPath(DumpSetError):
    """A dump set, timeline link, index or pcap the service will not serve; says why.

    `real`: where the refused path led, for the audit."""

    def __init__(self, message: str, real: str | None = None):
        super().__init__(message)
        self.real = real


def fd_path(fd: int) -> Path:
    """A path the kernel resolves to what `fd` holds open, without resolving any text."""
    return Path(f"/proc/self/fd/{fd}")


def real_path(fd: int) -> str:
    """Where `fd` is now, as the kernel names it (for messages, audits and containment)."""
    return os.readlink(fd_path(fd))


def identities(paths: Iterable[str]) -> set[tuple[int, int]]:
    """(device, inode) of each existing directory among `paths` (the service's --allow)."""
    found = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.add((st.st_dev, st.st_ino))
    return found


def beneath(fd: int, roots: set[tuple[int, int]]) -> bool:
    """Whether the directory open on `fd` is one of `roots` or lies below one.

    Walks `..` from the descriptor up to `/`: no path text is involved, so neither a rename
    nor a symbolic link can make the answer describe another directory."""
    cur = os.open(".", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=fd)
    try:
        while True:
            st = os.fstat(cur)
            if (st.st_dev, st.st_ino) in roots:
                return True
            up = os.open("..", _PATH_FLAGS | os.O_DIRECTORY, dir_fd=cur)
            ust = os.fstat(up)
            os.close(cur)
            cur = up
            if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino):
                return False  # `/`
    finally:
        os.close(cur)


@dataclass(frozen=True)
class Held:
    """A dump set directory held open: `asked` is the client's text, `real` what it named."""

    asked: str
    real: str
    fd: int
    owner: int

    def shown(self, text: str) -> str:
        """`text` with /proc/self/fd/N paths of this directory named as the user knows it."""
        return _name_fd(text, str(fd_path(self.fd)), self.real)

    def open(self) -> AnchoredDumpSet:
        """The dump set, every path of it under /proc/self/fd/N (call as the service account)."""
        ds = AnchoredDumpSet.open(fd_path(self.fd))
        ds.anchor(self)
        return ds

    def close(self) -> None:
        os.close(self.fd)


def hold(path: str, owner: int, roots: set[tuple[int, int]]) -> Held:
    """Open the dump set `path` names (or the one whose timeline it names) and check it.

    Run as root, before the privilege drop: this is the only time the client's text is
    resolved. Raises RefusedPath unless the directory lies under one of `roots` and belongs
    to `owner`."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        raise RefusedPath(f"{path} does not exist; give the recorder's -o directory") from None
    except NotADirectoryError:
        raise RefusedPath(f"{path} is not a directory; give the recorder's -o directory") from None
    except OSError as e:
        raise RefusedPath(f"{path}: {e.strerror}") from None
    try:
        real = real_path(fd)
        _check_dir(fd, path, real, owner, roots)
        if not _has(fd, MARKER) and _has(fd, timeline.MARKER):
            # A timeline: the dump set it belongs to, as its marker (the owner's) says.
            inner = os.open(_timeline_dumpset(fd, real, owner), _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = inner
            real = real_path(fd)
            _check_dir(fd, path, real, owner, roots)
    except BaseException:
        os.close(fd)
        raise
    return Held(path, real, fd, owner)


def _check_dir(fd: int, asked: str, real: str, owner: int, roots: set[tuple[int, int]]) -> None:
    shown = asked if asked == real else f"{asked} (resolved to {real})"
    if not beneath(fd, roots):
        raise RefusedPath(f"{shown} is not a dump set this service serves", real)
    st = os.fstat(fd)
    if st.st_uid != owner:
        raise RefusedPath(f"{shown} belongs to uid {st.st_uid}, not to the service account; "
                          "only the recorder's own dump sets are served", real)


def _has(fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _timeline_dumpset(fd: int, real: str, owner: int) -> str:
    """The `dumpset` entry of a timeline marker, read without following a link (as root)."""
    try:
        mfd = os.open(timeline.MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
        raise RefusedPath(f"{real}/{timeline.MARKER}: {e.strerror}") from None
    try:
        st = os.fstat(mfd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_size > 65536:
            raise RefusedPath(f"{real}/{timeline.MARKER} is not a timeline marker of the "
                              "service account")
        with os.fdopen(os.dup(mfd), "rb") as f:
            meta = json.loads(f.read())
        rel = meta["dumpset"]
        if not isinstance(rel, str) or not rel:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise RefusedPath(f"{real}/{timeline.MARKER} is damaged; run npcaprepair") from None
    finally:
        os.close(mfd)
    return rel


def _name_fd(text: str, anchor: str, real: str) -> str:
    return re.sub(re.escape(anchor) + r"(?![0-9])", lambda _m: real, text)


class AnchoredDumpSet(DumpSet):
    """A dump set whose files are checked as the timeline names them (see the module)."""

    held: Held
    _timeline_name: tuple[str, str] | None = None  # (/proc/self/fd/N, the real path of N)

    def anchor(self, held: Held) -> None:
        self.held = held
        if not self.timeline.is_relative_to(self.root):
            # A timeline kept elsewhere (-A): held too, and the service account's.
            tfd = os.open(self.timeline, _DIR_FLAGS)
            if os.fstat(tfd).st_uid != held.owner:
                os.close(tfd)
                raise RefusedPath(f"{self.timeline}: the timeline of {held.real} does not "
                                  "belong to the service account")
            self._timeline_name = (str(fd_path(tfd)), str(self.timeline))
            self.timeline = fd_path(tfd)

    def shown(self, text: str) -> str:
        """`text` with this dump set's /proc/self/fd/N paths named as the user knows them."""
        if self._timeline_name is not None:
            text = _name_fd(text, *self._timeline_name)
        return self.held.shown(text)

    def files_in_window(self, begin_ns: int, end_ns: int) -> list[StoredFile]:
        root = real_path(self.held.fd)
        out = []
        for sf in super().files_in_window(begin_ns, end_ns):
            checked = self._checked(sf, root)
            if checked is not None:
                out.append(checked)
        return out

    def _checked(self, sf: StoredFile, root: str) -> StoredFile | None:
        """`sf` named inside the dump set, after checking where its link leads and what is
        there; None when it was deleted meanwhile."""
        link = self.shown(str(sf.pcap))
        try:
            fd = os.open(sf.pcap, _PATH_FLAGS)
        except FileNotFoundError:
            return None
        try:
            real = real_path(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not real.startswith(root.rstrip("/") + "/"):
            raise RefusedPath(f"{link} leads to {real}, outside the dump set {root}")
        inside = StoredFile(sf.first_ns, self.root / real[len(root.rstrip("/")) + 1 :])
        self._own_file(st, link)
        try:
            ist = os.lstat(inside.index)
        except FileNotFoundError:
            return inside
        self._own_file(ist, self.shown(str(inside.index)))
        return inside

    def _own_file(self, st: os.stat_result, shown: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise RefusedPath(f"{shown} is not a regular file")
        if st.st_uid != self.held.owner:
            raise RefusedPath(f"{shown} belongs to uid {st.st_uid}, not to the service account")
