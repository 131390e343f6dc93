"""Run as an unprivileged account once the capture socket is open (n2disk's -u).

Only opening the packet socket and setting promiscuous mode need capabilities; everything the
recorder does afterwards (writing, indexing, deleting) works as the dump set's owner. Dropping
early means a bug in the file-handling code cannot be used to write anywhere else.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import stat
from pathlib import Path

from pcapvault.index.errors import PcapVaultError


def lookup(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise PcapVaultError(
            f"unknown user {user!r} for -u; create it (the shipped sysusers.d file makes "
            "'pcapvault') or choose another"
        ) from None


def give_tree(root: Path, pw: pwd.struct_passwd) -> None:
    """Hand the dump set at `root` to the account that will write it from now on.

    Root does this with a path the account may have shaped (it owns /var/lib/pcapvault, and
    its --exec-cmd runs there): so `root` must be a new, empty directory or a dump set
    already (its marker), reached through no link but root's own; below it nothing is
    followed, and only what root or the directory's owner made changes hands, never
    another user's file."""
    from .dumpset import MARKER

    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) and st.st_uid != 0:
        raise PcapVaultError(f"-o {root} is a link made by uid {st.st_uid}, not root's; give "
                             "the directory itself")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top = os.fstat(fd)
        if top.st_uid == pw.pw_uid:
            return
        names = os.listdir(fd)
        if names and MARKER not in names:
            raise PcapVaultError(f"-o {root} holds files but no dump set; give an empty "
                                 "directory or a dump set's (the recorder's -o)")
        makers = {0, top.st_uid}
        for _path, dirs, files, dfd in os.fwalk(".", dir_fd=fd):  # links: never descended
            if os.fstat(dfd).st_uid in makers:
                os.fchown(dfd, pw.pw_uid, pw.pw_gid)
            for n in files + dirs:  # a directory's own turn comes as it is walked
                entry = os.lstat(n, dir_fd=dfd)
                if entry.st_uid in makers and not stat.S_ISDIR(entry.st_mode):
                    os.chown(n, pw.pw_uid, pw.pw_gid, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(fd)


_CAP_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Give up every capability, for good, once the capture socket is set up.

    The unit starts the recorder as its account with CAP_NET_RAW and CAP_NET_ADMIN as
    ambient capabilities: needed to open the ring and set promiscuous mode, and by nothing
    after; kept, they served every later bug, the indexer process (which parses the packets
    an attacker sends) and the --exec-cmd commands (the ambient set passes on through
    exec). Emptying the permitted and inheritable sets empties the ambient one with them."""
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    if libc.capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot give up the capabilities capture needed: "
                           f"{os.strerror(err)}")


def drop_to(pw: pwd.struct_passwd) -> None:
    """Irrevocably become `pw` (all real, effective and saved ids; its groups only)."""
    if os.geteuid() != 0:
        if os.geteuid() == pw.pw_uid:
            return
        raise PcapVaultError(f"-u {pw.pw_name} needs the recorder to start as root")
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)


def parse_mode(text: str, what: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise PcapVaultError(f"bad {what} {text!r}: give octal permissions such as 0640")
    return mode
