"""npcapextract through the extraction service, for dump sets this user may not read.

The service (npcapextractd) checks the password with PAM and the group membership, then
streams the result; this side writes it where the user asked, with the user's own rights, so
the service never creates a file for anyone. The password comes from the terminal without
echo or, for scripts, from the first line of stdin: never from argv or the environment,
which other users can read in /proc.

Only light modules are imported here: the client does not run the engine, and starting
faster hides part of the service's own start-up (docs/BENCHMARKS.md, PAM service).
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import pwd
import re
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click

from pcapvault.index.errors import PcapVaultError

from .. import prestart
from ..outfile import DIR_MODE, FILE_MODE
from ..request import Request
from . import wire

COPY_BUFFER = 4 << 20
PIPE_SIZE = 1 << 20  # the default pipe-max-size
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
NO_ANSWER = "the extraction service closed the connection without an answer"
SPLIT_NAME = re.compile(r"extract-\d{6}\.pcap(ng)?")


class RemoteError(PcapVaultError):
    """The service refused, failed, or is not there; the text says which."""


def readable(path: str) -> bool:
    """May this user read the dump set directly? Other problems are the direct path's to
    report, so only a permission failure answers no."""
    from pcapvault.index.dumpset import DumpSet

    try:
        ds = DumpSet.open(Path(path))
        dirs = [ds.root] + ([ds.timeline] if ds.timeline.exists() else [])
    except PermissionError:
        return False
    except (PcapVaultError, OSError):
        return True
    return all(os.access(d, os.R_OK | os.X_OK) for d in dirs)


def service_targets(dumpsets: tuple[str, ...], forced: bool) -> tuple[str, ...]:
    """The dump sets to ask the service for: with --service, or when this user cannot read
    one of them (the service may let them). Empty: extract directly.

    Without -t these are the sensor's configured dump sets, as for a direct extraction."""
    if not dumpsets:
        from pcapvault.index.config import default_dumpsets

        dumpsets = tuple(str(p) for p in default_dumpsets())
        if not dumpsets:
            return ()  # the direct path explains what to configure
    if forced or not all(readable(p) for p in dumpsets):
        return dumpsets
    return ()


def connect(path: str, automatic: bool, dumpsets: tuple[str, ...]) -> socket.socket:
    """Connect (or take the connection prestart.py made), and make sure the listener is root's
    (systemd's) before sending a password."""
    sock = prestart.take(path)
    if sock is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise _unavailable(path, e, automatic, dumpsets) from None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid != 0:
        sock.close()
        raise RemoteError(
            f"refusing to send a password to {path}: it is served by uid {uid}, not by root"
        )
    return sock


def _unavailable(path: str, e: OSError, automatic: bool, dumpsets: tuple[str, ...]
                 ) -> RemoteError:
    why = f"the extraction service is not available at {path} ({e.strerror})"
    if automatic:
        blocked = next((p for p in dumpsets if not readable(p)), dumpsets[0])
        return RemoteError(
            f"no permission to read dump set {blocked}, and {why}; run as its owner or "
            "a member of its group, or ask the administrator to enable npcapextract.socket"
        )
    return RemoteError(f"{why}; ask the administrator to enable npcapextract.socket")


def read_password(from_stdin: bool, user: str) -> str:
    if from_stdin:
        line = sys.stdin.buffer.readline(wire.MAX_PASSWORD + 2)
        password = line.rstrip(b"\n").rstrip(b"\r")
        if not password:
            raise RemoteError("--password-stdin: no password on standard input")
        try:
            return password.decode()
        except UnicodeDecodeError:
            raise RemoteError("--password-stdin: the password is not UTF-8") from None
    import getpass
    import warnings

    with warnings.catch_warnings():
        # getpass would fall back to an echoing read of stdin; refuse instead.
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(f"Password for {user} (npcapextract service): ")
        except getpass.GetPassWarning:
            raise RemoteError(
                "no terminal to ask for the password; give it on standard input with "
                "--password-stdin"
            ) from None
        except EOFError:
            raise click.exceptions.Abort() from None


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            raise  # the reader of stdout left: npcapextract ends quietly
        except OSError as e:
            raise RemoteError(f"cannot write the output: {e.strerror}") from None
        view = view[n:]


class _Receiver:
    """Copies DATA frames to the output, opened when the first frame arrives.

    Where the kernel allows it (a regular file or a pipe) the bytes go from the socket to the
    output with splice(2) and never pass through Python: this copy is the only work the
    service adds to an extraction, so it should cost as little as a copy can."""

    def __init__(self, sock: socket.socket, target: str):
        self.sock = sock
        self.target = target
        self.fd: int | None = None
        self.buf: memoryview | None = None
        self.pipe: tuple[int, int] | None = None  # (read, write) between socket and file
        self.splice = False
        self.shared: memoryview | None = None  # the service's shared read buffers, read-only

    def share(self, length: int) -> None:
        """The SHARED frame: map the region the service reads dense spans into."""
        if length != 8:
            raise wire.ProtocolError("malformed shared-buffer frame from the extraction service")
        data, fd = wire.recv_fd(self.sock, length, "shared-buffer frame")
        try:
            size = struct.unpack("<Q", data)[0]
            if self.shared is not None or not 0 < size <= os.fstat(fd).st_size:
                raise wire.ProtocolError("unexpected shared-buffer frame from the extraction "
                                         "service")
            self.shared = memoryview(mmap.mmap(fd, size, prot=mmap.PROT_READ))
        finally:
            os.close(fd)

    def copy_shared(self, length: int) -> None:
        """A REFS frame: write the referenced pieces of the shared region, then acknowledge
        it, so that the service may read into that space again."""
        view = self.shared
        if view is None or not length or length % wire.REF.size or length > wire.MAX_REPLY:
            raise wire.ProtocolError("unexpected reference frame from the extraction service")
        refs = wire.REF.iter_unpack(wire.recv_exact(self.sock, length, "references"))
        pieces = []
        for off, n in refs:
            if off + n > len(view):
                raise wire.ProtocolError("reference outside the shared buffers")
            pieces.append(view[off : off + n])
        if self.fd is None:
            self.fd = self.open(self.target)
        for piece in pieces:
            _write_all(self.fd, piece)
        try:
            wire.send(self.sock, wire.ACK)
        except OSError:
            pass  # the service has sent everything and left; the next read tells

    def open(self, name: str) -> int:
        if name == "-":
            fd = 1
        else:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            except OSError as e:
                raise RemoteError(f"cannot create {name}: {e.strerror}") from None
        st = os.fstat(fd)
        appending = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        if stat.S_ISFIFO(st.st_mode):
            self.splice = True  # socket -> pipe directly
        elif stat.S_ISREG(st.st_mode) and not appending:
            self.splice = True
            self.pipe = os.pipe()
            try:
                fcntl.fcntl(self.pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the default 64 KiB pipe works, with more calls
        return fd

    def next_file(self, name: str) -> None:
        """-P/-N: the service's engine started the next file; create it in our directory."""
        if not SPLIT_NAME.fullmatch(name):
            raise wire.ProtocolError(f"unexpected file name {name!r} from the extraction service")
        if self.fd is None:
            try:
                os.makedirs(self.target, DIR_MODE, exist_ok=True)
            except OSError as e:
                raise RemoteError(f"cannot create output directory {self.target}: "
                                   f"{e.strerror}") from None
        self.close()
        self.fd = self.open(os.path.join(self.target, name))

    def copy(self, n: int) -> None:
        if self.fd is None:
            self.fd = self.open(self.target)
        if self.splice:
            try:
                self._splice(n)
                return
            except _NoSplice:
                self.splice = False  # not one byte moved: copy through Python instead
        if self.buf is None:
            self.buf = memoryview(bytearray(COPY_BUFFER))
        buf = self.buf
        while n:
            k = self.sock.recv_into(buf[: min(n, len(buf))])
            if not k:
                raise _incomplete()
            _write_all(self.fd, buf[:k])
            n -= k

    def _splice(self, n: int) -> None:
        src = self.sock.fileno()
        into = self.pipe[1] if self.pipe else self.fd
        moved = False
        while n:
            try:
                k = os.splice(src, into, min(n, PIPE_SIZE))
            except OSError as e:
                if not moved and e.errno == errno.EINVAL:
                    raise _NoSplice() from None
                if e.errno == errno.EPIPE:
                    raise BrokenPipeError() from None
                raise RemoteError(f"cannot write the output: {e.strerror}") from None
            if not k:
                raise _incomplete()
            moved = True
            n -= k
            while self.pipe and k:
                try:
                    k -= os.splice(self.pipe[0], self.fd, k)
                except OSError as e:
                    raise RemoteError(f"cannot write the output: {e.strerror}") from None

    def close(self) -> None:
        if self.fd is not None and self.fd > 2:
            os.close(self.fd)
        self.fd = None
        for fd in self.pipe or ():
            os.close(fd)
        self.pipe = None


class _NoSplice(Exception):
    """splice(2) refused this socket or output before moving anything."""


def _incomplete() -> RemoteError:
    return RemoteError("the extraction service ended the connection in the middle of the "
                        "result; the output is incomplete")


def run_remote(
    req: Request, *, socket_path: str, password_stdin: bool, automatic: bool,
    output: str | None, verbose: bool, t0: float,
) -> NoReturn:
    """npcapextract's whole run through the service; exits as npcapextract does.

    `output` is already resolved by the command line (-O folded into `-o -`); `t0` is when
    the command started, for -v."""
    if (req.split_bytes or req.split_packets) and output == "-":
        raise RemoteError("-P/-N split the output into files: give -o a directory, not -")
    user = pwd.getpwuid(os.getuid()).pw_name
    sock = connect(socket_path, automatic, tuple(req.dumpsets))
    with sock:
        _authenticate(sock, wire.Asked(req, "", shared_memory=True), password_stdin, user)
        trailer, receiver = _receive(sock, output or "-")
    receiver.close()
    if req.list_only:
        for path, n in trailer["files"]:
            click.echo(f"{path}\t{n}" if verbose else path)
    written = int(trailer["packets"])
    from ..report import EXIT_INCOMPLETE, Stats

    counts = trailer["stats"]
    status = Stats.from_counts(counts).exit_status(written)
    if counts.get("incomplete"):
        status = EXIT_INCOMPLETE
    if verbose:
        elapsed = time.monotonic() - t0
        if "packets_read" in counts:
            line = Stats.from_counts(counts).line(written, trailer["bytes"], elapsed)
        else:  # a restricted member is told only about what they were given
            line = (f"matched {int(counts.get('packets_matched', 0))}, written {written}; "
                    f"bytes out {trailer['bytes']}; elapsed {elapsed:.3f} s")
        _err(f"through the extraction service as {user}: {line}")
    if trailer.get("error"):
        raise RemoteError(trailer["error"])
    sys.exit(status)


MAX_TABLE = 256 << 20  # a table's JSON (all of a day's conversations fit)


def table_remote(req: Request, *, socket_path: str, password_stdin: bool, automatic: bool,
                 warn: Callable[[str], None]) -> dict:
    """A table of the window (`req.table`) through the service (npcapflows): the fields of
    conversations()'s Table, computed by the service over the filter this user may run;
    its warnings go to `warn` as they come."""
    user = pwd.getpwuid(os.getuid()).pw_name
    sock = connect(socket_path, automatic, tuple(req.dumpsets))
    body = bytearray()
    with sock:
        _authenticate(sock, wire.Asked(req, ""), password_stdin, user)
        while True:
            head = wire.recv_header(sock, "result")
            if head is None:
                raise _incomplete()
            kind, length = head
            if kind == wire.DATA:
                if len(body) + length > MAX_TABLE:
                    raise wire.ProtocolError("oversized table from the extraction service")
                body += wire.recv_exact(sock, length, "table")
            elif kind == wire.WARNING:
                if length > wire.MAX_REPLY:
                    raise wire.ProtocolError("oversized warning from the extraction service")
                warn(wire.recv_exact(sock, length, "warning").decode(errors="replace"))
            elif kind == wire.TRAILER:
                trailer = wire.recv_json(sock, length, wire.MAX_REPLY, "trailer")
                break
            elif kind == wire.REPLY:
                reply = wire.recv_json(sock, length, wire.MAX_REPLY, "reply")
                raise RemoteError(str(reply.get("message", "the extraction service failed")))
            else:
                raise wire.ProtocolError(f"unexpected frame {kind!r} from the extraction service")
    if trailer.get("error"):
        raise RemoteError(str(trailer["error"]))
    try:
        table = json.loads(body)
    except ValueError:
        raise wire.ProtocolError("malformed table from the extraction service") from None
    if not isinstance(table, dict):
        raise wire.ProtocolError("malformed table from the extraction service")
    return table


def _authenticate(sock: socket.socket, asked: wire.Asked, from_stdin: bool, user: str
                  ) -> None:
    """Send the request with a password until the service says ok; retry at a terminal."""
    while True:
        asked.password = read_password(from_stdin, user)
        if len(asked.password.encode()) > wire.MAX_PASSWORD:
            raise RemoteError(f"the password is longer than {wire.MAX_PASSWORD} bytes")
        try:
            wire.send(sock, wire.REQUEST, asked.encode())
            reply = _next_reply(sock)
        except (BrokenPipeError, ConnectionResetError):
            # Not our stdout's reader leaving: the service went away before answering.
            raise RemoteError(NO_ANSWER) from None
        finally:
            asked.password = ""
        status, message = reply.get("status"), str(reply.get("message", ""))
        if status == "ok":
            return
        if status == "denied" and reply.get("retry") and not from_stdin:
            _err(f"{message}; try again")
            continue
        raise RemoteError(message or f"the extraction service answered {status!r}")


def _next_reply(sock: socket.socket) -> dict:
    try:
        head = wire.recv_header(sock, "reply")
        if head is None:
            raise RemoteError(NO_ANSWER)
        kind, length = head
        if kind != wire.REPLY:
            raise wire.ProtocolError(f"unexpected frame {kind!r} from the extraction service")
        return wire.recv_json(sock, length, wire.MAX_REPLY, "reply")
    except ConnectionResetError:
        raise RemoteError(NO_ANSWER) from None


def _receive(sock: socket.socket, target: str) -> tuple[dict, _Receiver]:
    """DATA frames to the output, warnings to stderr, until the trailer."""
    receiver = _Receiver(sock, target)
    try:
        while True:
            head = wire.recv_header(sock, "result")
            if head is None:
                raise RemoteError("the extraction service ended the connection before the end "
                                   "of the result; the output is incomplete")
            kind, length = head
            if kind == wire.DATA:
                receiver.copy(length)
            elif kind == wire.REFS:
                receiver.copy_shared(length)
            elif kind == wire.SHARED:
                receiver.share(length)
            elif kind == wire.FILE:
                name = wire.recv_exact(sock, min(length, 256), "file name").decode(
                    errors="replace")
                receiver.next_file(name)
            elif kind == wire.WARNING:
                if length > wire.MAX_REPLY:
                    raise wire.ProtocolError("oversized warning from the extraction service")
                text = wire.recv_exact(sock, length, "warning")
                _err(f"warning: {text.decode(errors='replace')}")
            elif kind == wire.TRAILER:
                return wire.recv_json(sock, length, wire.MAX_REPLY, "trailer"), receiver
            elif kind == wire.REPLY:
                reply = wire.recv_json(sock, length, wire.MAX_REPLY, "reply")
                raise RemoteError(str(reply.get("message", "the extraction service failed")))
            else:
                raise wire.ProtocolError(f"unexpected frame {kind!r} from the extraction service")
    except BaseException:
        receiver.close()
        raise


def _err(msg: str) -> None:
    click.echo(f"npcapextract: {msg}", err=True)
