"""The extraction service's wire format (docs/SECURITY.md): framed messages on a Unix socket.

Every message starts with a 12-byte header, type and length, so that the service can refuse
an oversized request from its header alone, before reading or parsing any of it, and so that
the pcap data can travel in large pieces between small status messages without escaping.
The request is a JSON object checked field by field against fixed types and limits: the
service runs it through PAM as root, so nothing it does not expect may get that far.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from dataclasses import asdict, dataclass, field

from pcapvault.index.errors import PcapVaultError

from ..request import Request

VERSION = 1

FRAME = struct.Struct("!c3xQ")  # type, 3 reserved bytes, payload length
REQUEST = b"Q"  # client -> service: the request (JSON)
REPLY = b"R"  # service -> client: ok / denied / error (JSON)
DATA = b"D"  # service -> client: a piece of the pcap or pcapng stream
WARNING = b"W"  # service -> client: a warning line (UTF-8)
TRAILER = b"T"  # service -> client: counts and statistics, the end of the result (JSON)
FILE = b"F"  # service -> client: the next DATA frames start the split file named here (-P/-N)
SHARED = b"M"  # service -> client: the shared read buffers (memfd by SCM_RIGHTS), size u64
REFS = b"S"  # service -> client: pieces of the stream in the shared buffers, n x (u64, u64)
ACK = b"A"  # client -> service: the oldest unacknowledged REFS frame is written out
REF = struct.Struct("<QQ")  # one piece of a REFS frame: offset in the shared region, length

MAX_REQUEST = 64 << 10
MAX_REPLY = 16 << 20  # a trailer lists the matching files with -l
MAX_DUMPSETS = 16
MAX_PATH = 4096
MAX_FILTER = 16 << 10
MAX_PASSWORD = 1024
MAX_NS = (1 << 63) - 1


class ProtocolError(PcapVaultError):
    """A message that is malformed, oversized or cut short."""


@dataclass
class Asked:
    """A request as it travels: the analyst's Request, the password, and whether the client
    takes dense spans through shared buffers."""

    request: Request
    password: str = field(repr=False)
    shared_memory: bool = False

    def encode(self) -> bytes:
        return json.dumps({"version": VERSION, "password": self.password,
                           "shared_memory": self.shared_memory,
                           **asdict(self.request)}).encode()

    @classmethod
    def decode(cls, body: bytes) -> Asked:
        """Parse and check a request; every problem is a ProtocolError naming the field."""
        try:
            obj = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ProtocolError("malformed request: not a UTF-8 JSON object") from None
        except RecursionError:
            raise ProtocolError("malformed request: nested too deeply") from None
        if not isinstance(obj, dict):
            raise ProtocolError("malformed request: not a JSON object")
        if obj.get("version") != VERSION:
            raise ProtocolError(
                f"unsupported request version {obj.get('version')!r} (this service speaks "
                f"{VERSION})"
            )
        unknown = set(obj) - set(_FIELDS) - {"version"}
        if unknown:
            raise ProtocolError(f"malformed request: unknown field {sorted(unknown)[0]!r}")
        values = {}
        for name, (kind, required) in _FIELDS.items():
            if name not in obj:
                if required:
                    raise ProtocolError(f"malformed request: missing field {name!r}")
                continue
            values[name] = _check(name, obj[name], kind)
        password = values.pop("password")
        shared = values.pop("shared_memory", False)
        req = Request(**values)
        if req.begin_ns > req.end_ns:
            raise ProtocolError("malformed request: begin_ns after end_ns")
        return cls(req, password, shared)


# name -> (kind, required); kinds are checked by _check
_FIELDS: dict[str, tuple[str, bool]] = {
    "password": ("password", True),
    "dumpsets": ("paths", True),
    "begin_ns": ("ns", True),
    "end_ns": ("ns", True),
    "filter": ("filter", False),
    "pcapng": ("bool", False),
    "snaplen": ("count", False),
    "max_bytes": ("count", False),
    "max_packets": ("count", False),
    "split_bytes": ("count", False),
    "split_packets": ("count", False),
    "empty": ("bool", False),
    "list_only": ("bool", False),
    "table": ("table", False),
    "table_sort": ("sort", False),
    "table_limit": ("count", False),
    "shared_memory": ("bool", False),
}
TABLES = ("conversation", "endpoint", "port")  # extract/conversations.py BY, SORT
SORTS = ("bytes", "packets")


def _check(name: str, value: object, kind: str) -> object:
    def bad(why: str) -> ProtocolError:
        return ProtocolError(f"malformed request: {name} {why}")

    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind in ("ns", "count"):
        if value is None and kind == "count":
            return None
        # bool is an int in Python; JSON true must not pass as 1.
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad("must be an integer")
        if not (0 if kind == "ns" else 1) <= value <= MAX_NS:
            raise bad("is out of range")
        return value
    if kind in ("password", "filter"):
        limit = MAX_PASSWORD if kind == "password" else MAX_FILTER
        if not isinstance(value, str):
            raise bad("must be a string")
        if not _is_text(value):
            raise bad("is not valid Unicode text (a lone surrogate)")
        if len(value.encode()) > limit:
            raise bad(f"is longer than {limit} bytes")
        if "\0" in value:
            raise bad("contains a NUL character")
        return value
    if kind in ("table", "sort"):
        choices = TABLES if kind == "table" else SORTS
        if value is None and kind == "table":
            return None
        if value not in choices:
            raise bad(f"must be one of {', '.join(choices)}")
        return value
    if kind == "paths":
        if not isinstance(value, list) or not value:
            raise bad("must be a non-empty list of paths")
        if len(value) > MAX_DUMPSETS:
            raise bad(f"lists more than {MAX_DUMPSETS} dump sets")
        for p in value:
            if not isinstance(p, str) or not p.startswith("/") or "\0" in p:
                raise bad("must hold absolute paths")
            if not _is_text(p):
                raise bad("holds a path that is not valid Unicode text (a lone surrogate)")
            if len(p.encode()) > MAX_PATH:
                raise bad(f"holds a path longer than {MAX_PATH} bytes")
        return list(value)
    raise AssertionError(kind)


def _is_text(value: str) -> bool:
    """JSON's \\ud800 escapes decode to lone surrogates, which no file name, filter or
    password can hold (and which str.encode refuses)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(FRAME.pack(kind, len(payload)) + payload)


def send_fd(sock: socket.socket, kind: bytes, payload: bytes, fd: int) -> None:
    """A frame whose payload carries a descriptor. The header goes on its own, so a reader
    that takes headers with plain recv() cannot swallow the descriptor with them."""
    sock.sendall(FRAME.pack(kind, len(payload)))
    sent = socket.send_fds(sock, [payload], [fd])
    if sent < len(payload):
        sock.sendall(payload[sent:])


def recv_fd(sock: socket.socket, length: int, what: str) -> tuple[bytes, int]:
    """The payload of a send_fd frame and the descriptor it carries."""
    data, fds, _, _ = socket.recv_fds(sock, length, 1)
    for extra in fds[1:]:
        os.close(extra)
    if not fds:
        raise ProtocolError(f"the {what} came without its descriptor")
    if len(data) < length:
        data += recv_exact(sock, length - len(data), what)
    return data, fds[0]


def send_json(sock: socket.socket, kind: bytes, obj: dict) -> None:
    send(sock, kind, json.dumps(obj).encode())


def _until(sock: socket.socket, deadline: float | None) -> None:
    """Before a read: the socket's timeout is what is left until `deadline` (time.monotonic),
    so that a client sending a byte at a time cannot stretch the whole past it."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError()
        sock.settimeout(left)


def recv_exact(sock: socket.socket, n: int, what: str, deadline: float | None = None) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        _until(sock, deadline)
        k = sock.recv_into(view[got:])
        if not k:
            raise ProtocolError(f"the connection ended in the middle of the {what}")
        got += k
    return bytes(buf)


def recv_header(sock: socket.socket, what: str, deadline: float | None = None
                ) -> tuple[bytes, int] | None:
    """The next frame's type and length, or None when the peer closed between frames."""
    _until(sock, deadline)
    first = sock.recv(FRAME.size)
    if not first:
        return None
    if len(first) < FRAME.size:
        first += recv_exact(sock, FRAME.size - len(first), what, deadline)
    kind, length = FRAME.unpack(first)
    return kind, length


def recv_json(sock: socket.socket, length: int, limit: int, what: str) -> dict:
    if length > limit:
        raise ProtocolError(f"{what} too large: {length} bytes (limit {limit})")
    try:
        obj = json.loads(recv_exact(sock, length, what))
    except ValueError:
        raise ProtocolError(f"malformed {what}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what}")
    return obj
