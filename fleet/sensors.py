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
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from pcapvault.index.errors import PcapVaultError

from .config import Sensor

USER_AGENT = "npcapfleet"
CHUNK = 1 << 20  # bytes of a pcap stream read at once
MAX_ANSWER = 1 << 30  # bytes of a JSON answer read at the most (a catalogue page: tens of MB)
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
    host, port = parts.hostname or "", parts.port or 443
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as e:
        raise SensorError(f"{sensor.name}: cannot fetch the certificate of {sensor.url}: "
                          f"{e}") from None
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest()
    if digest != sensor.fingerprint:
        raise SensorError(
            f"{sensor.name}: the certificate of {sensor.url} has SHA-256 "
            f"{digest.hex(':').upper()}, not the fleet file's fingerprint; check the sensor "
            "(it may not be the sensor you mean) before changing the fingerprint")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the pinned certificate is the whole trust
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=pem)
    return ctx


class SensorClient:
    """npcapserve's endpoints for one sensor; errors become SensorError naming it."""

    def __init__(self, sensor: Sensor, timeout: float):
        self.sensor = sensor
        self.name = sensor.name
        ctx = ssl_context(sensor, timeout)
        self.http = httpx.Client(
            base_url=sensor.url, verify=ctx if ctx is not None else False,
            headers={"Authorization": f"Bearer {sensor.token}", "User-Agent": USER_AGENT},
            timeout=httpx.Timeout(timeout))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SensorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, path: str, **params: str | int) -> dict:
        """The JSON object GET `path` answers: at most MAX_ANSWER bytes of it read (a sensor's
        answer is input: it may be anything, of any size)."""
        body = bytearray()
        try:
            with self.http.stream("GET", path, params=params) as r:
                self._check(r)
                for chunk in r.iter_bytes(CHUNK):
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise SensorError(f"{self.name}: {path} answered more than "
                                          f"{MAX_ANSWER >> 20} MB; not read")
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            raise SensorError(f"{self.name}: {_reason(e)}") from None
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
        """The pcapng of the window, as chunks of the streamed answer."""
        params = {"begin": time_param(begin_ns), "end": time_param(end_ns), "filter": expr,
                  "dumpset": ",".join(dumpsets), "format": "pcapng"}
        try:
            with self.http.stream("GET", "/api/v1/pcap", params=params) as r:
                self._check(r)
                yield self._chunks(r)
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            raise SensorError(f"{self.name}: {_reason(e)}") from None

    def _chunks(self, r: httpx.Response) -> Iterator[bytes]:
        try:
            yield from r.iter_raw(CHUNK)
        except (httpx.HTTPError, OSError, ssl.SSLError) as e:
            raise SensorError(f"{self.name}: {_reason(e)}") from None


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
