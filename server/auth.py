"""Who is asking npcapserve, and what they may see: the extraction service's rules over HTTP.

HTTP Basic is checked by PAM, an API token (tokens.py) stands for its user; then membership
of the extractors' group authorizes, and --group-filter restrictions narrow what a member
sees (extract/service/policy.py, shared with npcapextractd).

pam_unix needs root to check another user's password, and the HTTP worker must not be root
(sshd's privilege separation): `PasswordChecker.start` runs, as root, before the worker drops
privileges, a helper process that answers one question only, "is this user/password valid,
and which groups does the user have", over a socketpair. It is a fresh interpreter (fork and
exec, `python -I`), so it inherits nothing of the server: no memory, no descriptor but its end
of the socketpair and stderr (the journal), no environment but a fixed PATH and LANG.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import os
import pwd
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pcapvault.extract.service.policy import (
    GroupFilter,
    allowed_filter,
    authenticate,
    log,
    member_of,
)
from pcapvault.extract.service.wire import ProtocolError, recv_exact
from pcapvault.index.errors import PcapVaultError
from pcapvault.server.limits import LoginLimiter
from pcapvault.server.session import SessionStore
from pcapvault.server.tokens import TokenFileError, TokenStore

PROG = "npcapserve"
# The helper's messages: a 4-byte big-endian length, then the body.
#   request: user length (2 bytes), the user, the password (the rest)
#   answer:  1 byte (1 valid, 0 not), then each of the user's gids (4 bytes) when valid
LENGTH = struct.Struct(">I")
USER_LENGTH = struct.Struct(">H")
MAX_USER = 256  # useradd allows 32 characters; LDAP names are longer, never this long
MAX_PASSWORD = 512  # PAM_MAX_RESP_SIZE: PAM itself passes no longer answer on
MAX_REQUEST = USER_LENGTH.size + MAX_USER + MAX_PASSWORD
MAX_GROUPS = 65536  # NGROUPS_MAX
MAX_ANSWER = 1 + 4 * MAX_GROUPS
CHECK_TIMEOUT = 60.0  # PAM's own failure delay is 2 s; a helper this slow is stuck
HELPER_READ_TIMEOUT = 10.0  # for the rest of a request once its first byte is in
PR_SET_PDEATHSIG = 1
READY = b"R"  # the helper's first word: it runs and has PAM
MAX_HEADER = 8192  # longer Authorization headers are not credentials


@dataclass(frozen=True)
class Principal:
    """An admitted request's user and what they may see."""

    user: str
    method: str  # "password", "token" or "session"
    allowed: str | None  # policy.allowed_filter(...) of the user's restricted groups; None = all
    groups: tuple[str, ...]  # the restricted groups that apply (for the audit line)


class Denied(Exception):
    """Not admitted: the HTTP status, a short reason (never the password), and for 429 when
    to come back. 503 when the server itself cannot check (its password helper is gone)."""

    def __init__(self, status: int, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class CheckerGone(PcapVaultError):
    """The password helper did not start, exited or stopped answering."""


class PasswordChecker:
    """The parent's end of the root password helper; `check` is safe from any thread."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen):
        self._sock = sock
        self.proc = proc
        self._lock = threading.Lock()
        self._broken = False

    @classmethod
    def start(cls, pam_service: str) -> PasswordChecker:
        """Start the helper (as root, before dropping privileges).

        Call it from the main thread: the kernel signals the helper when the thread that
        started it ends (PR_SET_PDEATHSIG), not the process. Returns once the helper is ready,
        so that a helper that cannot run stops the server at start, not at the first login."""
        _check_pam_service(pam_service)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            code = "from pcapvault.server.auth import _helper_main; _helper_main()"
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", code, str(theirs.fileno()), str(os.getpid()),
                 pam_service],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, cwd="/",
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(CHECK_TIMEOUT)
        try:
            ready = ours.recv(len(READY))
        except OSError:
            ready = b""
        if ready != READY:
            ours.close()
            proc.kill()
            proc.wait()
            raise CheckerGone("the password helper did not start (see the lines above); "
                              f"is python-pam installed for {sys.executable}?")
        return cls(ours, proc)

    def check(self, user: str, password: str) -> tuple[bool, tuple[int, ...]]:
        """(valid, the user's gids); gids are given only for a valid password.

        Raises CheckerGone when the helper cannot answer (it is not restarted: the server
        no longer has the root privileges that would take)."""
        u, p = user.encode(errors="surrogateescape"), password.encode(errors="surrogateescape")
        if not u or len(u) > MAX_USER or len(p) > MAX_PASSWORD:
            return False, ()  # no PAM account has such a name or takes such a password
        body = USER_LENGTH.pack(len(u)) + u + p
        with self._lock:
            if self._broken:
                raise CheckerGone("the password helper has stopped")
            try:
                self._sock.sendall(LENGTH.pack(len(body)) + body)
                (n,) = LENGTH.unpack(recv_exact(self._sock, LENGTH.size, "answer"))
                if not 1 <= n <= MAX_ANSWER or (n - 1) % 4:
                    raise ProtocolError(f"an answer of {n} bytes")
                answer = recv_exact(self._sock, n, "answer")
            except (OSError, ProtocolError) as e:
                self._broken = True
                log(PROG, f"the password helper stopped answering ({e}); no password can be "
                          "checked until npcapserve is restarted")
                raise CheckerGone("the password helper has stopped") from None
        if answer[0] != 1:
            return False, ()
        return True, struct.unpack(f">{(n - 1) // 4}I", answer[1:])

    def close(self) -> None:
        """End the helper (it exits when its socket closes)."""
        self._sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                self.proc.kill()  # a root process: refused once the caller has dropped root
                self.proc.wait(5)
            except (PermissionError, subprocess.TimeoutExpired):
                log(PROG, f"the password helper (pid {self.proc.pid}) did not exit")


def _check_pam_service(name: str) -> None:
    """PAM falls back to its `other` service for a name it does not know (on Debian: deny
    everyone), so a misspelt --pam-service would only show as every password refused."""
    folders = [Path("/etc/pam.d"), Path("/usr/lib/pam.d")]
    if "/" in name or not name or (
        folders[0].is_dir() and not any((f / name).is_file() for f in folders)
    ):
        raise PcapVaultError(f"no PAM service {name!r} (no /etc/pam.d/{name}): install it "
                             "(setup.sh --system does) or name another")


def _helper_main() -> None:
    """The root helper: answer password checks on the socket given as argv[1], nothing else.

    Any message that does not follow the protocol ends it: only a compromised or buggy
    parent sends one, and it gets no second chance at root. It ends with its parent too,
    even if a descendant of the parent still holds the socket open (no EOF then)."""
    fd, parent, service = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # PR_SET_PDEATHSIG alone is not enough: the kernel delivers the signal with the dying
    # parent's credentials, so once the parent has dropped root it is refused (EPERM) and
    # silently lost. The parent's pidfd turns readable when it exits, whoever it is by then.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:
        return
    if os.getppid() != parent:
        return  # the parent died before we watched it (pidfd may name another process)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is for the server; we follow it
    import pam  # noqa: F401  (now: missing, it is to fail the start, not a login)

    sock = socket.socket(fileno=fd)
    sock.sendall(READY)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while True:
        if any(ready == pidfd for ready, _ in poller.poll()):
            return
        try:
            answer = _answer(sock, service)
        except (OSError, ProtocolError):  # EOF (the parent closed its end), or stuck mid-way
            return
        if answer is None:
            return
        sock.sendall(answer)


def _answer(sock: socket.socket, service: str) -> bytes | None:
    """Read one request and check it; None when it breaks the protocol."""
    deadline = time.monotonic() + HELPER_READ_TIMEOUT
    (n,) = LENGTH.unpack(recv_exact(sock, LENGTH.size, "request", deadline))
    if not USER_LENGTH.size < n <= MAX_REQUEST:
        log(f"{PROG}[password helper]",
            f"refused a message of {n} bytes (at most {MAX_REQUEST}); exiting")
        return None
    body = recv_exact(sock, n, "request", deadline)
    (ulen,) = USER_LENGTH.unpack_from(body)
    if not 0 < ulen <= min(MAX_USER, n - USER_LENGTH.size):
        log(f"{PROG}[password helper]", "refused a malformed request; exiting")
        return None
    user = body[USER_LENGTH.size : USER_LENGTH.size + ulen].decode(errors="surrogateescape")
    password = body[USER_LENGTH.size + ulen :].decode(errors="surrogateescape")
    del body
    if "\0" in user or "\0" in password:
        return LENGTH.pack(1) + b"\x00"
    try:
        if not authenticate(user, password, service)[0]:
            return LENGTH.pack(1) + b"\x00"
        gids = os.getgrouplist(user, pwd.getpwnam(user).pw_gid)[:MAX_GROUPS]
    except (KeyError, OSError) as e:  # the account went away meanwhile
        log(f"{PROG}[password helper]", f"{user!r}: {e}")
        return LENGTH.pack(1) + b"\x00"
    return LENGTH.pack(1 + 4 * len(gids)) + b"\x01" + struct.pack(f">{len(gids)}I", *gids)


class Gate:
    """Admits a request by its Authorization header, or raises Denied."""

    def __init__(self, checker: PasswordChecker, tokens: TokenStore, group: str,
                 group_filters: tuple[GroupFilter, ...], limiter: LoginLimiter,
                 sessions: SessionStore | None = None):
        self.checker = checker
        # the web page's logins (server/session.py); not `or`: an empty store is falsy
        self.sessions = sessions if sessions is not None else SessionStore()
        self.tokens = tokens
        self.group = group
        self.group_filters = group_filters
        self.limiter = limiter
        # The helper checks one password at a time anyway; taking turns here as well makes
        # the limiter see each failure before the same address's next attempt is checked.
        self._turn = asyncio.Lock()

    async def admit(self, authorization: str | None, client: str,
                    session: str | None = None, touch: bool = True) -> Principal:
        """The Principal of a request from `client` (its address) with this header, or
        without one, this session id (the web page's cookie; `touch`: SessionStore.user's).

        A failure to authenticate takes at least the limiter's fail_delay from the call
        (asyncio.sleep: the loop goes on serving others), so guessing is slow and a wrong
        password cannot be told from an unknown user by time. An unknown or expired session
        is no guess (its id has 256 random bits): it is refused at once and not counted, so
        a page left open past its idle expiry does not lock its address out."""
        started = time.monotonic()
        self._not_blocked(client)
        if (not authorization or not authorization.strip()) and session:
            user = self.sessions.user(session, touch)
            if user is None:
                raise Denied(401, "the session has ended (idle too long, or logged out); "
                                  "log in again")
            return self._principal(*await asyncio.to_thread(self._user_gids, user, "session"))
        if not authorization or not authorization.strip():
            raise Denied(401, "authentication required (HTTP Basic or a Bearer token)")
        try:
            user, method, gids = await self._authenticate(authorization, client)
        except Denied as e:
            if e.status == 401:
                self.limiter.failed(client)
                await asyncio.sleep(max(0.0, self.limiter.fail_delay
                                        - (time.monotonic() - started)))
            raise
        self.limiter.succeeded(client)
        return self._principal(user, method, gids)

    def _principal(self, user: str, method: str, gids: tuple[int, ...]) -> Principal:
        """The group check and restrictions, at every request whatever the method."""
        if not member_of(self.group, set(gids)):
            raise Denied(403, f"{user} is not a member of the group {self.group} whose "
                              "members may extract")
        restrictions = tuple(f for f in self.group_filters if f.gid in gids)
        return Principal(user, method, allowed_filter(restrictions),
                         tuple(r.group for r in restrictions))

    def _not_blocked(self, client: str) -> None:
        wait = self.limiter.blocked(client)
        if wait > 0:
            raise Denied(429, "too many failed logins from this address; try again later",
                         retry_after=wait)

    async def _authenticate(self, authorization: str, client: str
                            ) -> tuple[str, str, tuple[int, ...]]:
        """(user, method, gids), or Denied(401) for anything but valid credentials."""
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if len(authorization) > MAX_HEADER or not value:
            raise Denied(401, "malformed Authorization header")
        if scheme.lower() == "bearer":
            return await asyncio.to_thread(self._token_user, value)
        if scheme.lower() != "basic":
            raise Denied(401, f"unsupported authorization scheme {scheme[:20]!r}; use Basic "
                              "or Bearer")
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, password = "", "", ""
        if not sep or not user:
            raise Denied(401, "malformed Basic credentials (base64 of USER:PASSWORD)")
        async with self._turn:
            self._not_blocked(client)  # others from this address failed while we waited
            try:
                ok, gids = await asyncio.to_thread(self.checker.check, user, password)
            except CheckerGone:
                raise Denied(503, "passwords cannot be checked now; see the server's "
                                  "journal") from None
        if not ok:
            raise Denied(401, f"authentication failed for {user[:64]!r}")
        return user, "password", gids

    def _token_user(self, token: str) -> tuple[str, str, tuple[int, ...]]:
        """Runs in a thread: the file may be re-read, the groups may come from NSS."""
        try:
            user = self.tokens.lookup(token)
        except TokenFileError as e:
            log(PROG, str(e))
            raise Denied(503, "tokens cannot be checked now; see the server's journal"
                         ) from None
        if user is None:
            raise Denied(401, "unknown or revoked token")
        return self._user_gids(user, "token")

    @staticmethod
    def _user_gids(user: str, method: str) -> tuple[str, str, tuple[int, ...]]:
        """(user, method, gids) of a token's or session's user, as NSS has them now."""
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise Denied(401, f"the {method}'s user {user} no longer exists") from None
        return user, method, tuple(os.getgrouplist(user, pw.pw_gid))
