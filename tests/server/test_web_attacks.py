"""The web page and its sessions against an attacker: another page on the same host, a raw
client, a browser's caches. A real npcapserve (TLS, PAM users), real Chromium where a browser
is the point."""

from __future__ import annotations

import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from pamworld import PAM_MARKS
from serveworld import serving
from webworld import WEB_MARKS, browser, login, wait_for

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


@contextmanager
def other_site(served, html: str) -> Iterator[str]:
    """Another HTTPS server on the sensor's own address (another port): the same site as
    npcapserve for a browser, which ignores ports; any local user can run one."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(served.cert), str(served.cert.with_name("key.pem")))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("endpoint", ["/api/v1/pcap", "/api/v1/conversations"])
@WEB_MARKS[0]  # Chromium
def test_a_page_on_the_same_host_cannot_use_the_analysts_session(world, served, endpoint):
    """SameSite=Strict keeps the cookie from other sites only: a page on another port of the
    sensor is the same site, and its <img> went out with the analyst's session (an extraction,
    and an audit line, in their name). The server refuses what the browser says another
    page started (Sec-Fetch-Site), audited as denied."""
    url = f"{served.url}{endpoint}?begin=-3650d&end=now&filter=tcp"
    name = endpoint.rsplit("/", 1)[1]
    with other_site(served, f'<img src="{url}">') as evil, browser() as driver:
        login(driver, served.url, world.member.name, world.member.password)
        before = world.audit_count()
        driver.get(evil)
        line = wait_for(lambda: next((x for x in world.audit_lines()[before:]
                                      if x["endpoint"] == name), None),
                        message="the other page's request reached the server")
    assert line["outcome"] == "denied" and "another site" in line["reason"], line


def test_a_browsers_cached_password_is_not_sent_for_another_site(world, served):
    """A browser that answered the Basic dialog sends the password again with any request
    for this server, whoever's page starts it; the browser's Sec-Fetch-Site says whose."""
    with served.client(world.member) as c:
        for site, status in [("cross-site", 403), ("same-site", 403), ("same-origin", 200),
                             ("none", 200), (None, 200)]:
            headers = {"Sec-Fetch-Site": site} if site else {}
            r = c.get("/api/v1/conversations", params={**WINDOW, "limit": 1}, headers=headers)
            assert r.status_code == status, (site, r.text)
        r = c.get("/session", headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403 and "another site" in r.json()["error"]


def test_the_health_poll_does_not_keep_a_session_alive(world):
    """The page asks /api/v1/status every 30 s while it is open; with --metrics-auth that
    used the session, so an unattended page never reached its idle expiry."""
    with serving(world, None, "--metrics-auth", "--session-idle", "2") as s, \
            logged_in(s, world) as c:
        polled = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            polled.append(c.get("/api/v1/status").status_code)
            time.sleep(0.4)
        assert polled[0] == 200 and polled[-1] == 401, polled
        assert c.get("/session").status_code == 401
