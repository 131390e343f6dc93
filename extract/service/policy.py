"""Who may extract what: the policy npcapextractd and npcapserve share.

PAM checks the password, membership of the extractors' group is the authorization, and a
member of a group given with --group-filter sees only what that group's filter selects; every
attempt ends as one JSON line in the audit file. Both front ends apply exactly these rules, so
a user gets the same packets through either.
"""

from __future__ import annotations

import grp
import json
import os
import stat
import sys
import syslog
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pcapvault.index.errors import PcapVaultError

if TYPE_CHECKING:
    from pcapvault.index.dumpset import DumpSet

    from ..flowplan import Source


class AuditLogError(PcapVaultError):
    """The audit log cannot be opened, or is not safe to append to."""


def log(ident: str, msg: str) -> None:
    """A line for the journal (stderr of a unit)."""
    print(f"{ident}: {' '.join(msg.split())}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class GroupFilter:
    """--group-filter GROUP=FILTER: the members of `group` may extract only what `expr` selects."""

    group: str
    gid: int
    expr: str


class Audit:
    """One JSON line per attempt, appended to the audit file and sent to syslog as `ident`."""

    def __init__(self, path: Path, ident: str):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            self.fd = os.open(path, flags, 0o640)
        except OSError as e:
            raise AuditLogError(f"cannot open the audit log {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        if (
            not stat.S_ISREG(st.st_mode)
            or st.st_mode & 0o022
            or st.st_uid not in (0, os.geteuid())
        ):
            os.close(self.fd)
            raise AuditLogError(
                f"refusing the audit log {path}: it must be a regular file owned by root "
                "and writable by its owner only (mode 0640)"
            )
        self.path = path
        self.ident = ident
        syslog.openlog(ident, syslog.LOG_PID | syslog.LOG_NDELAY, syslog.LOG_AUTHPRIV)

    def write(self, record: dict) -> None:
        # The file first: it is the record of reference, and a stalled syslog daemon (sending
        # to /dev/log blocks when its queue is full) must not delay or lose it.
        line = json.dumps(record, separators=(",", ":"))
        try:
            os.write(self.fd, (line + "\n").encode())
        except OSError as e:
            log(self.ident,
                f"cannot append to the audit log {self.path}: {e.strerror}; the record: {line}")
        level = syslog.LOG_INFO if record["outcome"] == "allowed" else syslog.LOG_WARNING
        syslog.syslog(level, line)


def authenticate(user: str, password: str, service: str) -> tuple[bool, str]:
    """PAM authentication and account checks; (ok, PAM's reason)."""
    import pam

    p = pam.pam()
    ok = p.authenticate(user, password, service=service, resetcreds=False)
    return ok, str(p.reason)


def member_of(group: str, gids: set[int]) -> bool:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log("pcapvault", f"the extractors' group {group!r} does not exist; nobody may extract")
        return False
    return gid in gids


def parse_group_filters(values: tuple[str, ...]) -> tuple[GroupFilter, ...]:
    """The --group-filter options, checked before anything else runs.

    A mistake must stop the service rather than fail open: a misspelt group would leave its
    members unrestricted, and a filter that does not compile would only show up as every
    restricted extraction failing. The filters come from the unit file (the administrator,
    not a client), so compiling them as root is no exposure."""
    found: dict[str, GroupFilter] = {}
    for value in values:
        group, sep, expr = (part.strip() for part in value.partition("="))
        if not sep or not group or not expr:
            raise _bad_group_filter(f"{value!r} is not GROUP=FILTER (both parts non-empty)")
        if group in found:
            raise _bad_group_filter(f"group {group!r} is given twice")
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise _bad_group_filter(f"no group named {group!r}") from None
        from pcapvault.index.libpcap import compile_filter

        try:
            compile_filter(expr)
        except PcapVaultError as e:
            raise _bad_group_filter(f"group {group}: {e}") from None
        found[group] = GroupFilter(group, gid, expr)
    return tuple(found.values())


def _bad_group_filter(message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint="'--group-filter'")


def allowed_filter(restrictions: tuple[GroupFilter, ...]) -> str | None:
    """What a member of these restricted groups may see; None when unrestricted.

    The union: each group alone would grant its filter, so being in a second group must
    not take away what the first one grants."""
    if not restrictions:
        return None
    if len(restrictions) == 1:
        return restrictions[0].expr
    return " or ".join(f"({r.expr})" for r in restrictions)


def effective_filter(user_filter: str, allowed: str | None) -> str:
    """The filter the engine runs: the user's, inside what the user may see.

    A conjunction, never a check that the user's filter starts with the allowed one:
    `ALLOWED or anything` has that prefix and selects everything. The allowed filter comes
    first and both are parenthesised, so neither borrows the other's qualifiers (tcpdump's
    `host a or b` shorthand stops at a parenthesis); the user's filter must compile on its
    own too, so its parentheses cannot close ours: a filter to run comes from
    checked_filter, this text alone is for the audit line."""
    if allowed is None:
        return user_filter
    if not user_filter.strip():
        return allowed
    return f"({allowed}) and ({user_filter})"


def default_allow() -> tuple[str, ...]:
    """The dump sets of this sensor: /var/lib/pcapvault and the configured ones."""
    from pcapvault.index.config import default_dumpsets

    return ("/var/lib/pcapvault", *(str(p) for p in default_dumpsets()))


def checked_filter(user_filter: str, allowed: str | None, linktypes: Iterable[int]) -> str:
    """The effective filter, once the user's filter has been parsed alone for each link type.

    The one place a restricted user's filter is put inside the restriction, for every front
    end and endpoint: only an expression that is whole by itself can be put in parentheses
    (with `tcp) or (udp` the conjunction would read `(ALLOWED) and (tcp) or (udp)`, all
    traffic). Parsed, not optimised: libpcap's parser is cheap, its optimiser is not.
    Raises FilterError with libpcap's message, as a direct extraction would."""
    from pcapvault.index.libpcap import compile_filter

    if allowed is not None and user_filter.strip():
        for linktype in sorted(set(linktypes)):
            compile_filter(user_filter, linktype, optimize=False).close()
    return effective_filter(user_filter, allowed)


def open_sources(paths: list[str], sets: list[DumpSet], user_filter: str,
                 allowed: str | None) -> list[Source]:
    """The dump sets, each with the filter this user may run (checked_filter), compiled
    once, so that its errors read exactly as in a direct extraction."""
    from pcapvault.index.libpcap import FilterError

    from ..flowplan import Source

    sources = []
    for i, (path, ds) in enumerate(zip(paths, sets, strict=True)):
        linktype = int(ds.meta.get("linktype", 1))
        expr = checked_filter(user_filter, allowed, [linktype])
        try:
            sources.append(Source(path, i, expr, ds))
        except FilterError as e:
            if allowed is None:
                raise
            raise FilterError(f"{path} (link type {linktype}): your filter cannot run "
                              f"inside the --group-filter restriction {allowed!r}: {e}") from None
    return sources
