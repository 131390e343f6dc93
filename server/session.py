"""Login sessions of the web page: a random id in a cookie, the user it stands for on the server.

The page cannot keep a password, and Basic authentication would have the browser resend it
with every request and never forget it. So POST /login checks the password once (the same
Gate: PAM, rate limit, audit) and hands out a session id; the cookie carries only that id.
The session knows its user, nothing more: group membership and restrictions are looked up
again at every request, as for API tokens. A session ends when idle for `idle` seconds or at
POST /logout, on the server: a copied cookie is worthless after either. However much it is
used, it ends `lifetime` seconds after the login (a stolen cookie, a locked account).

Memory is bounded: at most `max_sessions` sessions; when full, the least recently used goes.
One user holds at most `per_user` of them (logging in again ends their own least recently
used), so that one account cannot log everyone else out by logging in 10,000 times.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "pcapvault_session"
IDLE = 1800.0  # seconds: an analyst's lunch break ends the session, a long look does not
LIFETIME = 12 * 3600.0  # seconds from the login: a working day, however busy
PER_USER = 16  # sessions of one user at once: browsers and machines, not tabs (they share)


class SessionStore:
    """Session id -> user, with idle and absolute expiry; safe from any thread."""

    def __init__(self, idle: float = IDLE, max_sessions: int = 10_000,
                 lifetime: float = LIFETIME, per_user: int = PER_USER):
        if idle <= 0 or lifetime <= 0 or max_sessions < 1 or per_user < 1:
            raise ValueError("idle > 0, lifetime > 0, max_sessions >= 1, per_user >= 1")
        self.idle = idle
        self.lifetime = lifetime
        self.max_sessions = max_sessions
        self.per_user = per_user
        # id -> (user, created, last used), the least recently used first
        self._users: OrderedDict[str, tuple[str, float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, user: str) -> str:
        """A new session of `user`; its id (256 random bits, URL-safe)."""
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            mine = [s for s, (u, _, _) in self._users.items() if u == user]
            for old in mine[: max(0, len(mine) - self.per_user + 1)]:
                del self._users[old]
            while len(self._users) >= self.max_sessions:
                self._users.popitem(last=False)
            self._users[sid] = (user, now, now)
        return sid

    def user(self, sid: str | None, touch: bool = True) -> str | None:
        """The user of a live session, or None. `touch`: the analyst uses it now (the idle
        time starts again); not for what the page asks by itself, on a timer."""
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            found = self._users.get(sid)
            if found is None:
                return None
            user, created, last = found
            if now - last > self.idle or now - created > self.lifetime:
                del self._users[sid]
                return None
            if touch:
                self._users[sid] = (user, created, now)
                self._users.move_to_end(sid)  # the most recently used goes last
            return user

    def end(self, sid: str | None) -> bool:
        """End a session (logout); whether it was live."""
        with self._lock:
            return self._users.pop(sid or "", None) is not None

    def __len__(self) -> int:
        return len(self._users)


# The cookie: HttpOnly: the page's script never sees the id (an injected script could not
# send it elsewhere); SameSite=Strict: another site's page cannot make the browser send it;
# Secure under TLS. No Max-Age: the cookie goes when the browser closes, the session itself
# at idle expiry, at its lifetime's end or at logout.

# Every answer: never sniffed into another type, never framed (clickjacking), no Referer
# sent on, and never stored by a browser or proxy (conversations, packets and who is logged
# in are personal data). The page's own files (PAGE) are revalidated at every load instead,
# and the page may load its own script, style and chart.
ALL_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",  # no other page embeds an answer
    "Cache-Control": "no-store",
}
PAGE_HEADERS = {
    **ALL_HEADERS,
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "Cache-Control": "no-cache",
}


def is_page(path: str) -> bool:
    """The page's own files: / and /static/..."""
    return path == "/" or path.startswith("/static/")


class SecureHeaders:
    """ASGI middleware: ALL_HEADERS, or PAGE_HEADERS for the page's files, on every answer,
    errors included; a header the route set itself is kept."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = PAGE_HEADERS if is_page(scope["path"]) else ALL_HEADERS

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in wanted.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, with_headers)

MAX_FORM = 4096  # bytes of a login body: a user name and a password


class CrossOrigin(Exception):
    """A state-changing request that another site's page may have sent."""


def fetched_here(request: Request) -> None:
    """Raise CrossOrigin when the browser says another site's page started the request
    (Sec-Fetch-Site cross-site or same-site).

    SameSite=Strict keeps the cookie from other sites only, and a site has no port: a page on
    any port of the sensor's own host (any local user can serve one) is the same site, and
    its <img> would go out with the analyst's session. A browser that answered the Basic
    dialog sends that password whoever's page asks. Scripts send no Sec-Fetch-Site; the
    page's own requests are same-origin, an address typed or bookmarked none."""
    site = request.headers.get("sec-fetch-site", "")
    if site in ("cross-site", "same-site"):
        raise CrossOrigin(f"refused: another site's page started this request ({site}); "
                          "use this server's own page, or ask without a browser")


def same_origin(request: Request) -> None:
    """Raise CrossOrigin unless the request's Origin is this server (scheme, host, port).

    SameSite=Strict already keeps the cookie off other sites' requests; this covers POST
    /login, which carries no cookie (login CSRF: being logged in as someone else)."""
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    if origin != own:
        raise CrossOrigin(f"a {request.method} to {request.url.path} must come from this "
                          f"server's own page (Origin {own}, not {(origin or 'none')[:100]})")


async def form_credentials(request: Request) -> str:
    """The login form's JSON body {"user", "password"} as a Basic Authorization header, so
    that it goes through the Gate as any password does (PAM, rate limit, audit).

    Raises CrossOrigin, or ValueError for a body that is not such a form."""
    same_origin(request)
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise ValueError(f"a login body longer than {MAX_FORM} bytes")
    try:
        form = json.loads(body)
        user, password = form["user"], form["password"]
    except (ValueError, TypeError, KeyError, RecursionError):  # deep nesting: RecursionError
        raise ValueError('give a JSON body {"user": ..., "password": ...}') from None
    if not isinstance(user, str) or not isinstance(password, str):
        raise ValueError("user and password must be strings")
    if ":" in user:  # Basic would split the pair there: no account has such a name
        raise ValueError("a user name has no ':'")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def challenge(request: Request) -> str:
    """The WWW-Authenticate of a 401: Basic for scripts, but not for the page's own calls
    (a cookie, or X-Requested-With), or the browser would pop up its own password dialog."""
    if request.headers.get("x-requested-with") or COOKIE in request.cookies:
        return 'Session realm="pcapvault"'
    return 'Basic realm="pcapvault"'


def who(principal: Any) -> JSONResponse:
    """Who is logged in, and the filter that restricts what they see (None: everything)."""
    return JSONResponse({"user": principal.user, "method": principal.method,
                         "restricted_to": principal.allowed, "groups": list(principal.groups)})


def logged_in(request: Request, sid: str, principal: Any) -> JSONResponse:
    """The login's answer: who, and the session's cookie (see the comment on the cookie)."""
    response = who(principal)
    response.set_cookie(COOKIE, sid, path="/", secure=request.url.scheme == "https",
                        httponly=True, samesite="strict")
    return response


def logged_out(request: Request) -> JSONResponse:
    """The logout's answer: the browser forgets the cookie (the server has ended it)."""
    response = JSONResponse({"logged_out": True})
    response.delete_cookie(COOKIE, path="/", secure=request.url.scheme == "https",
                           httponly=True, samesite="strict")
    return response
