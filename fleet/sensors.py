"""The sensors' API (npcapserve, docs/API.md) as the fleet uses it, one httpx client per sensor.

Each sensor is trusted as the fleet file says: its CA file (or self-signed certificate), or
the SHA-256 fingerprint of its certificate. For a fingerprint the certificate is fetched once
without trust, compared, and then made the only trust anchor of the real connection, so the
token is sent only over a handshake that proved that very certificate (no check after the
fact, when the request would already be on its way).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from pcapvault.index.errors import PcapVaultError

from .config import Sensor

USER_AGENT = "npcapfleet"
CHUNK = 1 << 20  # bytes of a pcap stream read at once
# Bytes of a JSON answer read at the most. npcapserve's largest, a catalogue page of
# PAGE_ROWS (500,000) conversations, is about 50 MB (100 MB if all were IPv6); Python's
# objects for it take several times that, so a hostile sensor's gigabyte would not fit.
MAX_ANSWER = 256 << 20
ERROR_BYTES = 1 << 16  # of an error's body


class SensorError(PcapVaultError):
    """A sensor that could not be reached or refused: the message starts with its name."""


def time_param(ns: int) -> str:
    """A time as npcapserve takes it, exactly: epoch seconds with nine decimals."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def ssl_context(sensor: Sensor, timeout: float) -> ssl.SSLContext | None:
    """How to trust `sensor` (None for plain http on a loopback address)."""
    parts = urlsplit(sensor.url)
    if parts.scheme != "https":
        return None
    if sensor.fingerprint is None:
        return ssl.create_default_context(cafile=str(sensor.ca) if sensor.ca else None)
    der = _certificate(sensor, parts.hostname or "", parts.port or 443, timeout)
    digest = hashlib.sha256(der).digest()
    if digest != sensor.fingerprint:
        raise SensorError(
            f"{sensor.name}: the certificate of {sensor.url} has SHA-256 "
            f"{digest.hex(':').upper()}, not the fleet file's fingerprint; check the sensor "
            "(it may not be the sensor you mean) before changing the fingerprint")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the pinned certificate is the whole trust
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(der))
    return ctx


def _certificate(sensor: Sensor, host: str, port: int, timeout: float) -> bytes:
    """The certificate `sensor` presents (DER), fetched without trust. Bounded as a whole:
    the ssl module's handshake keeps one deadline of the socket's timeout for all its reads."""
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError, ValueError) as e:
        why = f"no certificate within {timeout:g} s" if isinstance(e, TimeoutError) else str(e)
        raise SensorError(f"{sensor.name}: cannot fetch the certificate of {sensor.url}: "
                          f"{why}") from None
    return ssl.PEM_cert_to_DER_cert(pem)


class Deadline:
    """A time by which a request must have got on, past which its connection is shut down.

    httpx's timeout bounds each read alone: a sensor sending a byte now and then would hold
    a run (and its result's merge) for ever. The watcher holds a duplicate of the
    connection's socket (never a descriptor number that may be reused); shutting it down
    wakes the reading thread with an error, which the request then reports as a timeout.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.passed = False
        self._at = math.inf
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="fleet-deadline").start()

    def begin(self) -> None:
        """A new request: `seconds` from now."""
        self.passed = False
        self.extend()

    def extend(self) -> None:
        """`seconds` from now (after progress)."""
        self._at = time.monotonic() + self.seconds

    def pause(self) -> None:
        """No deadline while the request waits on us, not on the sensor."""
        self._at = math.inf

    def watch(self, sock: socket.socket) -> None:
        """The connection to shut down from now on (a new one replaces the last)."""
        with self._lock:
            self._forget()
            if not self._closed.is_set():
                self._sock = socket.socket(fileno=os.dup(sock.fileno()))  # SSLSocket has no dup
        self.extend()

    def forget(self) -> None:
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._closed.set()
            self._forget()

    def _run(self) -> None:
        # At least 50 ms between looks: a time passed before there is a connection to cut
        # (httpx's own connect timeout ends that phase) is not a busy loop.
        while not self._closed.wait(min(max(self._at - time.monotonic(), 0.05), 1.0)):
            with self._lock:
                if time.monotonic() < self._at or self._sock is None:
                    continue
                self.passed = True
                self._at = math.inf
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the connection had already ended


class SensorClient:
    """npcapserve's endpoints for one sensor; errors become SensorError naming it."""

    def __init__(self, sensor: Sensor, timeout: float):
        self.sensor = sensor
        self.name = sensor.name
        ctx = ssl_context(sensor, timeout)
        # One connection: a client serves one thread at a time, and the deadline watches
        # the connection the last request made or reused.
        self.http = httpx.Client(
            base_url=sensor.url, verify=ctx if ctx is not None else False,
            headers={"Authorization": f"Bearer {sensor.token}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout), limits=httpx.Limits(max_connections=1))
        self.deadline = Deadline(timeout)
        self._extensions = {"trace": self._trace}

    def _trace(self, event: str, info: dict) -> None:
        """httpcore's events: which socket the deadline shuts down."""
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            sock = info["return_value"].get_extra_info("socket")
            if sock is not None:
                self.deadline.watch(sock)
        elif event in ("connection.close.started", "connection.connect_tcp.failed",
                       "connection.start_tls.failed"):
            self.deadline.forget()

    @contextmanager
    def _request(self, path: str, params: dict) -> Iterator[httpx.Response]:
        """GET `path`, streamed: its answer's head within `timeout` seconds of now; errors
        as SensorError."""
        self.deadline.begin()
        try:
            with self.http.stream("GET", path, params=params,
                                  extensions=self._extensions) as r:
                self._check(r)
                self.deadline.extend()
                yield r
                self._not_cut()
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            raise SensorError(f"{self.name}: {self._reason(e)}") from None
        finally:
            self.deadline.pause()

    def _not_cut(self) -> None:
        """An answer without a length ends at the connection's end, which a cut looks like."""
        if self.deadline.passed:
            raise SensorError(f"{self.name}: {self._reason(None)}")

    def _reason(self, e: BaseException | None) -> str:
        if self.deadline.passed or e is None:
            return (f"too slow: nothing whole came within {self.deadline.seconds:g} s "
                    "(the fleet file's timeout); cut off")
        return _reason(e)

    def close(self) -> None:
        self.http.close()
        self.deadline.close()

    def __enter__(self) -> SensorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **params: str | int) -> dict:
        """The JSON object GET `path` answers: at most MAX_ANSWER bytes of it read (a sensor's
        answer is input: it may be anything, of any size)."""
        body = bytearray()
        with self._request(path, params) as r:  # the whole answer within `timeout` s
            for chunk in r.iter_bytes(CHUNK):
                body += chunk
                if len(body) > MAX_ANSWER:
                    raise SensorError(f"{self.name}: {path} answered more than "
                                      f"{MAX_ANSWER >> 20} MB; not read")
        try:
            answer = strict_json(body)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            raise SensorError(f"{self.name}: {path} answered something other than a JSON "
                              "object; is this URL an npcapserve?")
        return answer

    def _check(self, r: httpx.Response) -> None:
        """A SensorError for an answer other than 200, with the sensor's JSON error message
        (from the first 64 KiB of its body at the most)."""
        if r.status_code == 200:
            return
        head = b""
        try:
            for chunk in r.iter_bytes():
                head += chunk
                if len(head) > ERROR_BYTES:
                    break
            message = str(strict_json(head).get("error", ""))[:300]
        except (ValueError, RecursionError, AttributeError, httpx.HTTPError):
            message = ""
        raise SensorError(f"{self.name}: {r.request.url.path} answered HTTP {r.status_code}"
                          + (f": {message}" if message else ""))

    def dumpsets(self) -> list[dict]:
        """The served dump sets, in the sensor's order (path, interface)."""
        return self.get("/api/v1/status")["dumpsets"]

    def catalogue(self, dumpset: str, since: str, limit: int = 100) -> dict:
        return self.get("/api/v1/catalogue", dumpset=dumpset, since=since, limit=limit)

    def conversations(self, begin_ns: int, end_ns: int, expr: str, dumpsets: list[str],
                      limit: int) -> dict:
        return self.get("/api/v1/conversations", begin=time_param(begin_ns),
                        end=time_param(end_ns), filter=expr, dumpset=",".join(dumpsets),
                        by="conversation", limit=limit)

    @contextmanager
    def pcapng(self, begin_ns: int, end_ns: int, expr: str, dumpsets: list[str]
               ) -> Iterator[Iterator[bytes]]:
        """The pcapng of the window, as the pieces of the answer as they come. Its reader
        calls `deadline.extend()` for each whole packet (the next is due within `timeout`
        s) and `deadline.pause()` while it waits on its own consumer."""
        params = {"begin": time_param(begin_ns), "end": time_param(end_ns), "filter": expr,
                  "dumpset": ",".join(dumpsets), "format": "pcapng"}
        with self._request("/api/v1/pcap", params) as r:
            yield self._chunks(r)

    def _chunks(self, r: httpx.Response) -> Iterator[bytes]:
        try:
            yield from r.iter_raw()  # as it comes: a packet's arrival extends the deadline
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            raise SensorError(f"{self.name}: {self._reason(e)}") from None
        self._not_cut()


def strict_json(data: bytes | bytearray) -> object:
    """JSON as a sensor may send it: ValueError for what Python's json takes beyond the
    standard (NaN, Infinity) and for a number no float holds (1e400 would be infinity)."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is past what a number holds")
    return value


def _reason(e: BaseException) -> str:
    """A short reason for a failed request (httpx's text, or its cause's)."""
    if isinstance(e, httpx.TimeoutException):
        return "timed out"
    if isinstance(e, httpx.ConnectError | socket.gaierror | ConnectionError):
        return f"cannot connect ({e})"
    return str(e) or type(e).__name__
