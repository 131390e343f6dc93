"""Run as an unprivileged account once the capture socket is open (n2disk's -u).

Only opening the packet socket and setting promiscuous mode need capabilities; everything the
recorder does afterwards (writing, indexing, deleting) works as the dump set's owner. Dropping
early means a bug in the file-handling code cannot be used to write anywhere else.
"""

from __future__ import annotations

import os
import pwd
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
    """Hand an existing dump set to the account that will write it from now on."""
    if root.stat().st_uid == pw.pw_uid:
        return
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, pw.pw_uid, pw.pw_gid)
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


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
