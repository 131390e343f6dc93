"""npcapserve's routes: packets, conversations, volume, status, metrics, the API description.

`create_app` takes everything the routes depend on (the authentication gate, the audit log,
the conversation and volume functions), so the command line wires them in one place. Every
answer other than a pcap is JSON; every error is `{"error": "..."}` with its status (400 bad
parameter, 401 with WWW-Authenticate, 403, 404, 414, 429 with Retry-After, 500 without a
traceback). Blocking work (opening dump sets, compiling filters, reading indexes) runs on
worker threads, so one slow request does not hold up the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pcapvault.extract.conversations import MAX_STEP_NS
from pcapvault.extract.request import Request
from pcapvault.extract.service.policy import Audit, checked_filter, effective_filter, log
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.times import format_time, parse_window

from . import catalogue, openapi, pcap, session
from .status import StatusCollector, dumpset_status
from .workers import WorkerDied

PROG = "npcapserve"
MAX_QUERY = 8192  # bytes of a query string; a filter longer than this is no query anyone types
# Bytes of all request headers, answered 431 here. h11 stops reading a head that has not
# ended after MAX_HEAD_BYTES (uvicorn's h11_max_incomplete_event_size, set larger, so that a
# head between the two, whole or in pieces, still gets this JSON answer).
MAX_HEADERS = 16 << 10
MAX_HEAD_BYTES = 64 << 10
WEB = Path(__file__).with_name("web")  # the page's files, installed with the package
ENDPOINTS = {"/api/v1/pcap": "pcap", "/api/v1/conversations": "conversations",
             "/api/v1/volume": "volume", "/api/v1/catalogue": "catalogue",
             "/api/v1/status": "status", "/metrics": "metrics",
             "/api/v1/openapi.json": "openapi", "/api/v1/filter": "filter", "/login": "login",
             "/logout": "logout", "/session": "session", "/": "page"}


class ApiError(Exception):
    """An answer other than success: its status, message and headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status, headers=headers)


@dataclass(frozen=True)
class ServeSettings:
    """What the routes need to know besides their collaborators."""

    dumpsets: tuple[str, ...]
    pam_service: str = "npcapextract"
    filter_cpu: float = 2.0  # CPU seconds a client's filter may take to compile
    metrics_auth: bool = False  # /metrics and /api/v1/status behind the login too
    max_rows: int = 10000  # the largest `limit` of /api/v1/conversations
    max_steps: int = 10000  # the most steps /api/v1/volume answers


class Guard:
    """ASGI middleware: refuses an overlong query string or header block, and counts every
    request and the bytes of its answer per endpoint (the Prometheus counters)."""

    def __init__(self, app: ASGIApp, requests: Counter, served: Counter):
        self.app = app
        self.requests = requests
        self.served = served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = ENDPOINTS.get(scope["path"], "other")
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.requests.labels(endpoint, str(status[0])).inc()
            elif message["type"] == "http.response.body":
                self.served.labels(endpoint).inc(len(message.get("body", b"")))
            await send(message)

        if len(scope.get("query_string", b"")) > MAX_QUERY:
            resp = error_response(414, f"query string longer than {MAX_QUERY} bytes")
            await resp(scope, receive, counted)
            return
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADERS:
            resp = error_response(431, f"request headers longer than {MAX_HEADERS} bytes")
            await resp(scope, receive, counted)
            return
        # No answer is served in ranges (the page's files are small, a pcap is a stream):
        # a Range is ignored, as HTTP allows, rather than met by Starlette's plain-text
        # 400 or 416 for the page's files.
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                      if k not in (b"range", b"if-range")]}
        await self.app(scope, receive, counted)


def claimed_user(authorization: str | None) -> str | None:
    """The user name a Basic header claims (for the audit of a refusal; never the password)."""
    if not authorization or not authorization[:6].lower() == "basic ":
        return None
    try:
        text = base64.b64decode(authorization[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return text.partition(":")[0][:64] or None


_STEP = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86400 * 10**9}


def parse_step(text: str) -> int:
    """A volume step: seconds, or a number with ms, s, m, h or d (`60`, `10s`, `5m`)."""
    m = _STEP.match(text.strip())
    if not m:
        raise ApiError(400, f"bad step {text[:40]!r}: give seconds or a number with ms, s, m, h "
                            "or d (60, 10s, 5m)")
    ns = int(Decimal(m.group(1)) * _UNIT_NS[m.group(2) or "s"])  # exact: a float overflows
    if ns < 1_000_000:
        raise ApiError(400, f"bad step {text[:40]!r}: at least 1ms")
    if ns > MAX_STEP_NS:  # the worker's int64 times would overflow
        raise ApiError(400, f"bad step {text[:40]!r}: at most {MAX_STEP_NS // 86400 // 10**9} "
                            "days")
    return ns


def _int_param(q: dict[str, str], name: str, default: int | None, lo: int, hi: int
               ) -> int | None:
    text = q.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"bad {name} {text[:40]!r}: give a whole number") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"bad {name} {value}: give {lo} to {hi}")
    return value


def _choice(q: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = q.get(name) or choices[0]
    if value not in choices:
        raise ApiError(400, f"bad {name} {value[:40]!r}: give one of {', '.join(choices)}")
    return value


def _chosen(text: str, served: tuple[str, ...] | list[str]) -> list[str]:
    """`dumpset=`: some of the served dump sets, by the paths /api/v1/status gives, comma
    separated, kept in the served order (pcapng's interfaces, as npcapextract's -t); all of
    them when absent."""
    if not text:
        return list(served)
    asked = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(asked - set(served))
    if unknown or not asked:
        raise ApiError(400, f"no dump set {unknown[0] if unknown else text!r} is served here; "
                            "/api/v1/status lists them")
    return [p for p in served if p in asked]


def _window(q: dict[str, str]) -> tuple[int, int]:
    begin, end = q.get("begin"), q.get("end")
    if not begin or not end:
        raise ApiError(400, "give begin and end (e.g. begin=-15m&end=now)")
    try:
        return parse_window(begin, end)
    except PcapVaultError as e:
        raise ApiError(400, str(e)) from None


def _single(request: HttpRequest) -> dict[str, str]:
    """The query parameters, each at most once (a repeated one is ambiguous)."""
    q: dict[str, str] = {}
    for k, v in request.query_params.multi_items():
        if k in q:
            raise ApiError(400, f"parameter {k[:40]!r} given twice")
        q[k] = v
    return q


# (request, principal, audit record, query parameters, close(outcome, reason, packets, bytes))
Handler = Callable[[HttpRequest, Any, dict, dict[str, str], Callable[..., None]],
                   Awaitable[Response]]


def create_app(settings: ServeSettings, gate: Any, audit: Audit,
               conversations: Callable[..., Any] | None = None,
               volume: Callable[..., Any] | None = None) -> Starlette:
    """The application. `gate.admit(authorization, client)` returns the principal or raises
    a denial with (status, reason, retry_after); `audit` receives one line per request for
    packets, conversations or volume; `conversations` and `volume` are
    extract/conversations.py's functions."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(settings.dumpsets))
    requests = Counter("npcapserve_requests", "HTTP requests answered, by endpoint and status.",
                       ["endpoint", "code"], registry=registry)
    served = Counter("npcapserve_bytes_served", "Bytes of answers sent, by endpoint.",
                     ["endpoint"], registry=registry)

    async def admit(request: HttpRequest, authorization: str | None = None,
                    touch: bool = True) -> Any:
        """The gate's principal for the request's Authorization header (or `authorization`),
        else its session cookie (session.py; `touch`: the analyst's own request, not the
        page's timer). Refused first when another site's page started it."""
        try:
            session.fetched_here(request)
        except session.CrossOrigin as e:
            raise ApiError(403, str(e)) from None
        client = request.client.host if request.client else "-"
        header = authorization or request.headers.get("authorization")
        sid = None if authorization else request.cookies.get(session.COOKIE)
        try:
            if sid:
                return await gate.admit(header, client, sid, touch)
            return await gate.admit(header, client)
        except Exception as e:
            status = getattr(e, "status", None)
            if status is None:
                raise
            headers = {}
            if status == 401:
                headers["WWW-Authenticate"] = session.challenge(request)
            retry = getattr(e, "retry_after", None)
            if status == 429 and retry:
                headers["Retry-After"] = str(max(1, round(retry)))
            raise ApiError(status, getattr(e, "reason", str(e)), headers) from None

    def audited(endpoint: str, handler: Handler,
                credentials: Callable[[HttpRequest], Awaitable[str]] | None = None
                ) -> Callable[[HttpRequest], Awaitable[Response]]:
        """A data endpoint (or the login): admitted by the gate, and one audit line whatever
        happens. `credentials` gives an Authorization header made from the request's body
        (the login form) in place of the request's own.

        The handler fills the record and returns the response; a pcap's line is written when
        its stream ends (pcap.body's `finished`)."""

        async def route(request: HttpRequest) -> Response:
            started = time.monotonic()
            authorization = None if credentials else request.headers.get("authorization")
            record: dict = {
                "time": format_time(time.time_ns()),
                "service": settings.pam_service,
                "endpoint": endpoint,
                "client": f"{request.client.host}:{request.client.port}"
                if request.client else None,
                "pam_user": claimed_user(authorization),
                "method": None,
            }

            def close(outcome: str, reason: str | None, packets: int = 0, nbytes: int = 0
                      ) -> None:
                record.update(outcome=outcome, reason=reason, packets=packets, bytes=nbytes,
                              duration_s=round(time.monotonic() - started, 3))
                audit.write(record)

            try:
                if credentials:
                    authorization = await credentials(request)
                    record["pam_user"] = claimed_user(authorization)
                principal = await admit(request, authorization)
                record.update(pam_user=principal.user, method=principal.method)
                q = _single(request)
                return await handler(request, principal, record, q, close)
            except ApiError as e:
                outcome = "denied" if e.status in (401, 403, 429) else "error"
                close(outcome, str(e))
                return error_response(e.status, str(e), e.headers)
            except asyncio.CancelledError:
                close("error", "the client went away")
                raise
            except ClientDisconnect:  # while its body was read (the login's)
                close("error", "the client went away")
                return Response(status_code=400)  # nobody is there to read it
            except BaseException as e:
                close("error", f"internal error: {type(e).__name__}")
                raise

        return route

    def request_of(q: dict[str, str], principal: Any, record: dict, *, pcapng: bool = False,
                   snaplen: int | None = None, empty: bool = False) -> Request:
        b_ns, e_ns = _window(q)
        user_filter = q.get("filter", "")
        req = Request(_chosen(q.get("dumpset", ""), settings.dumpsets), b_ns, e_ns,
                      user_filter, pcapng, snaplen, empty=empty)
        record.update(dumpsets=req.dumpsets, begin=format_time(b_ns), end=format_time(e_ns),
                      filter=user_filter, options=req.chosen_options(),
                      restricted_by=sorted(principal.groups or ()),
                      effective_filter=effective_filter(user_filter, principal.allowed))
        return req

    async def get_pcap(request: HttpRequest, principal: Any, record: dict, q: dict[str, str],
                       close: Callable[..., None]) -> Response:
        fmt = _choice(q, "format", ("pcap", "pcapng"))
        snaplen = _int_param(q, "snaplen", None, 1, 262144)
        req = request_of(q, principal, record, pcapng=fmt == "pcapng", snaplen=snaplen,
                         empty=True)
        try:
            prepared = await asyncio.to_thread(pcap.prepare, req, principal.allowed,
                                               settings.filter_cpu)
        except PcapVaultError as e:
            raise ApiError(400, str(e)) from None

        def finished(packets: int, nbytes: int, error: str | None) -> None:
            close("error" if error else "allowed", error, packets, nbytes)

        name = (f"pcapvault-{_stamp(req.begin_ns)}-{_stamp(req.end_ns)}.{fmt}")
        headers = {"Content-Disposition": f'attachment; filename="{name}"'}
        if principal.allowed is not None:
            headers["X-Pcapvault-Restricted-To"] = _header_text(principal.allowed)
        media = "application/vnd.tcpdump.pcap" if fmt == "pcap" else "application/x-pcapng"
        stream = pcap.body(prepared, finished)
        response = StreamingResponse(stream, media_type=media, headers=headers)

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            """The response, and its audit line even when the client leaves before the
            body starts (then no worker is there to write it). A stream the client left is
            closed here (its audit line then), not whenever it is collected."""
            try:
                await response(scope, receive, send)
            finally:
                if not prepared.started:
                    close("error", "the client went away before the stream started")
                else:
                    await stream.aclose()

        return respond  # type: ignore[return-value] - an ASGI app, as Starlette runs it

    async def get_conversations(request: HttpRequest, principal: Any, record: dict,
                                q: dict[str, str], close: Callable[..., None]) -> Response:
        if conversations is None:
            raise ApiError(404, "conversations are not available in this build")
        by = _choice(q, "by", ("conversation", "endpoint", "port"))
        sort = _choice(q, "sort", ("bytes", "packets"))
        limit = _int_param(q, "limit", 100, 1, settings.max_rows)
        req = request_of(q, principal, record)
        record["options"] = {"by": by, "sort": sort, "limit": limit}
        table = await _indexed(conversations, req, principal, by=by, sort=sort, limit=limit)
        close("allowed", None, table.packets, 0)
        return JSONResponse({"begin": record["begin"], "end": record["end"],
                             **_jsonable(table)})

    async def get_volume(request: HttpRequest, principal: Any, record: dict,
                         q: dict[str, str], close: Callable[..., None]) -> Response:
        if volume is None:
            raise ApiError(404, "volume is not available in this build")
        step_ns = parse_step(q.get("step") or "60")
        req = request_of(q, principal, record)
        steps = -(-(req.end_ns - req.begin_ns) // step_ns)
        if steps > settings.max_steps:
            raise ApiError(400, f"{steps} steps of {q.get('step') or '60'} in the window: at "
                                f"most {settings.max_steps}; give a longer step")
        record["options"] = {"step_ns": step_ns}
        vol = await _indexed(volume, req, principal, step_ns=step_ns)
        close("allowed", None, sum(vol.packets), 0)
        return JSONResponse({"begin": record["begin"], "end": record["end"],
                             **_jsonable(vol)})

    async def _indexed(fn: Callable[..., Any], req: Request, principal: Any, **kw: Any
                       ) -> Any:
        """conversations() or volume() over the effective filter (the user's checked alone
        first, policy.checked_filter, as for /api/v1/pcap), on a worker thread."""
        from pcapvault.extract.access import open_dumpset

        from . import filtercheck

        def work() -> Any:
            sets = [open_dumpset(p) for p in req.dumpsets]
            linktypes = [int(ds.meta.get("linktype", 1)) for ds in sets]
            req.filter = checked_filter(req.filter, principal.allowed, linktypes)
            filtercheck.check(req.filter, linktypes, settings.filter_cpu)
            return fn(req, **kw)

        try:
            return await asyncio.to_thread(work)
        except PcapVaultError as e:
            raise ApiError(400, str(e)) from None
        except WorkerDied as e:  # the next request has a new pool
            raise ApiError(503, str(e)) from None

    async def get_catalogue(request: HttpRequest, principal: Any, record: dict,
                            q: dict[str, str], close: Callable[..., None]) -> Response:
        """Files indexed since a cursor with their conversations (server/catalogue.py): the
        whole traffic's, so not for a user whose group filter restricts them."""
        if principal.allowed is not None:
            raise ApiError(403, "the catalogue describes all traffic; a user restricted by "
                                "--group-filter may not read it (use /api/v1/conversations)")
        chosen = _chosen(q.get("dumpset", ""), settings.dumpsets)
        if len(chosen) != 1:
            raise ApiError(400, "give dumpset= (one of the paths /api/v1/status lists)")
        limit = _int_param(q, "limit", 100, 1, 1000)
        try:
            since = catalogue.Cursor.parse(q.get("since", ""))
        except catalogue.CursorError as e:
            raise ApiError(400, str(e)) from None
        record.update(dumpsets=chosen, options={"since": str(since), "limit": limit},
                      restricted_by=[])
        try:
            answer = await asyncio.to_thread(catalogue.page, chosen[0], since, limit,
                                             time.time_ns())
        except PcapVaultError as e:
            raise ApiError(400, str(e)) from None
        close("allowed", None, sum(f["packets"] for f in answer["files"]), 0)
        return JSONResponse({"time": format_time(time.time_ns()), **answer})

    async def health_gate(request: HttpRequest) -> None:
        """--metrics-auth: the login; the page asks for status on a timer, which must not keep
        an unattended page's session from its idle expiry."""
        if settings.metrics_auth:
            await admit(request, touch=False)

    async def get_status(request: HttpRequest) -> Response:
        try:
            await health_gate(request)
        except ApiError as e:
            return error_response(e.status, str(e), e.headers)
        now = time.time()
        found = await asyncio.to_thread(lambda: [dumpset_status(p, now)
                                                 for p in settings.dumpsets])
        return JSONResponse({"time": format_time(int(now * 1e9)), "dumpsets": found})

    async def get_metrics(request: HttpRequest) -> Response:
        try:
            await health_gate(request)
        except ApiError as e:
            return error_response(e.status, str(e), e.headers)
        text = await asyncio.to_thread(generate_latest, registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    described = JSONResponse(openapi.document()).body

    async def get_openapi(request: HttpRequest) -> Response:
        return Response(described, media_type="application/json")

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, exc.detail or "error", exc.headers)

    async def internal_error(request: HttpRequest, exc: Exception) -> Response:
        log(PROG, f"internal error on {request.url.path}: {type(exc).__name__}: {exc}")
        return error_response(500, "internal error; see the server's journal")

    # The web page (server/web/, session.py): its files, the login and logout, and the
    # filter check it calls as the analyst types.
    async def check_filter(request: HttpRequest) -> Response:
        try:
            principal = await admit(request)
            expr = _single(request).get("expr", "")
            await _indexed(lambda req: None, Request(list(settings.dumpsets), 0, 1, expr),
                           principal)
        except ApiError as e:
            return error_response(e.status, str(e), e.headers)
        return JSONResponse({"filter": expr, "valid": True})

    async def login(request: HttpRequest, principal: Any, record: dict, q: dict[str, str],
                    close: Callable[..., None]) -> Response:
        close("allowed", None)
        return session.logged_in(request, gate.sessions.create(principal.user), principal)

    async def who(request: HttpRequest) -> Response:
        try:
            principal = await admit(request)
        except ApiError as e:
            return error_response(e.status, str(e), e.headers)
        return session.who(principal)

    async def logout(request: HttpRequest) -> Response:
        try:
            session.same_origin(request)
        except session.CrossOrigin as e:
            return error_response(403, str(e))
        gate.sessions.end(request.cookies.get(session.COOKIE))
        return session.logged_out(request)

    async def page(request: HttpRequest) -> Response:
        return FileResponse(WEB / "index.html")  # its headers: session.SecureHeaders

    async def login_form(request: HttpRequest) -> str:
        try:
            return await session.form_credentials(request)
        except session.CrossOrigin as e:
            raise ApiError(403, str(e)) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    routes = [
        Route("/", page),
        Mount("/static", StaticFiles(directory=WEB, follow_symlink=False), name="static"),
        Route("/login", audited("login", login, login_form), methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/session", who),
        Route("/api/v1/filter", check_filter),
        Route("/api/v1/pcap", audited("pcap", get_pcap)),
        Route("/api/v1/conversations", audited("conversations", get_conversations)),
        Route("/api/v1/volume", audited("volume", get_volume)),
        Route("/api/v1/catalogue", audited("catalogue", get_catalogue)),
        Route("/api/v1/status", get_status),
        Route("/metrics", get_metrics),
        Route("/api/v1/openapi.json", get_openapi),
    ]
    app = Starlette(routes=routes,
                    exception_handlers={HTTPException: http_error, Exception: internal_error})
    app.add_middleware(Guard, requests=requests, served=served)
    app.add_middleware(session.SecureHeaders)  # outermost: Guard's own answers get them too
    return app


def _stamp(ns: int) -> str:
    """A time for a file name: 20251121T150000Z (seconds, UTC)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ns // 1_000_000_000))


def _header_text(text: str) -> str:
    """A value safe in an HTTP header: printable ASCII only."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:1024]


def _jsonable(obj: Any) -> dict:
    """A result dataclass (numpy arrays and scalars included) as JSON-ready data."""
    from dataclasses import asdict, is_dataclass

    data = asdict(obj) if is_dataclass(obj) else dict(obj)
    return json.loads(json.dumps(data, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)
