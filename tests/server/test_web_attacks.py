"""The web page and its sessions against an attacker: another page on the same host, a raw
client, a browser's caches. A real npcapserve (TLS, PAM users), real Chromium where a browser
is the point."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pamworld import PAM_MARKS
from serveworld import serving

pytestmark = PAM_MARKS

WINDOW = {"begin": "-3650d", "end": "now"}


@pytest.fixture(scope="module")
def served(world):
    with serving(world) as s:
        yield s


@contextmanager
def logged_in(served, world) -> Iterator:
    """An httpx client holding a session of the unrestricted member."""
    with served.client() as c:
        r = c.post("/login", json={"user": world.member.name,
                                   "password": world.member.password},
                   headers={"Origin": served.url})
        assert r.status_code == 200
        yield c


def test_no_answer_is_stored_framed_or_sniffed(world, served):
    """Personal data (conversations, packets, who is logged in) must not stay in a browser's
    or a proxy's cache; no answer may be framed (clickjacking) or sniffed into HTML."""
    with logged_in(served, world) as c:
        answers = {
            "conversations": c.get("/api/v1/conversations", params={**WINDOW, "limit": 3}),
            "volume": c.get("/api/v1/volume", params={**WINDOW, "step": "1d"}),
            "pcap": c.get("/api/v1/pcap", params=WINDOW),
            "filter": c.get("/api/v1/filter", params={"expr": "tcp"}),
            "status": c.get("/api/v1/status"),
            "bad parameter": c.get("/api/v1/volume", params={**WINDOW, "step": "x"}),
            "no such endpoint": c.get("/nope"),
        }
    with served.client() as c:
        answers["401"] = c.get("/api/v1/conversations", params=WINDOW)
        answers["openapi"] = c.get("/api/v1/openapi.json")
        page, script = c.get("/"), c.get("/static/app.js")
    for what, r in answers.items():
        assert "no-store" in r.headers.get("cache-control", ""), what
    for what, r in [*answers.items(), ("page", page), ("script", script)]:
        assert r.headers.get("x-content-type-options") == "nosniff", what
        assert r.headers.get("x-frame-options") == "DENY", what
        assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), what
        assert r.headers.get("referrer-policy") == "no-referrer", what
        assert r.headers.get("cross-origin-resource-policy") == "same-origin", what
    assert "unsafe" not in page.headers["content-security-policy"]
    assert script.headers["cache-control"] == "no-cache"  # revalidated: a new version shows


def test_the_page_files_are_the_installed_ones_only(served):
    """Traversal in any encoding, a NUL, a directory: 404 in JSON, never a file beside the
    page's, a listing or a traceback. Raw requests: a client library would normalise them."""
    import socket

    host, port = served.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(served.cert))
    for target in ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                   "/static/%2e%2e%2fapp.py", "/static/vendor/..%2f..%2fapp.py",
                   "/static/..\\app.py", "/static/app.js%00", "/static/app.js%00.css",
                   "/static/", "/static/vendor/", "/static/.", "/static//etc/passwd"]:
        with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10),
                             server_hostname=host) as s:
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                      "\r\n".encode())
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404 "), (target, head)
        assert body == b'{"error":"Not Found"}', (target, body)
