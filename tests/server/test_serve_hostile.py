"""npcapserve against hostile or careless clients: slow request heads, too many connections,
oversized headers, a client that leaves in the middle of a large pcap."""

from __future__ import annotations

import base64
import pwd
import socket
import ssl
import struct
import time

import pytest
from extract_helpers import build_dumpset
from pamworld import PAM_MARKS
from serveworld import serving

from pcapvault.index.privileges import give_tree

pytestmark = PAM_MARKS


def tls_socket(served, rcvbuf: int | None = None) -> ssl.SSLSocket:
    host, port = served.url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(served.cert))
    raw = socket.socket()
    if rcvbuf:  # before connecting: the window the server may fill
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect((host, int(port)))
    return ctx.wrap_socket(raw, server_hostname=host)


def closed_within(sock: ssl.SSLSocket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def test_slow_or_missing_request_heads_are_cut_off(world):
    with serving(world, None, "--request-timeout", "1") as s:
        silent = tls_socket(s)
        slow = tls_socket(s)
        slow.sendall(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        for _ in range(3):  # a byte now and then does not extend the deadline
            time.sleep(0.3)
            slow.sendall(b"X")
        assert closed_within(slow, 3) and closed_within(silent, 3)
        assert time.monotonic() - t0 < 4
        with s.client() as c:  # a prompt client is served, and its connection kept a while
            assert c.get("/api/v1/status").status_code == 200
            time.sleep(0.5)
            assert c.get("/metrics").status_code == 200


def test_connections_beyond_the_limit_get_503(world):
    with serving(world, None, "--max-connections", "2") as s:
        held = [tls_socket(s) for _ in range(2)]
        for h in held:
            h.sendall(b"GET /api/v1/status HTTP/1.1\r\n")  # an unfinished head holds a slot
        time.sleep(0.2)
        with s.client() as c:
            r = c.get("/api/v1/status")
        assert r.status_code == 503 and "connections" in r.json()["error"]
        assert r.headers["connection"] == "close"
        for h in held:
            h.close()
        time.sleep(0.2)
        with s.client() as c:
            assert c.get("/api/v1/status").status_code == 200


def test_a_client_that_leaves_during_the_login_body_is_audited_quietly(world):
    """starlette's ClientDisconnect while the login's body is read: an audit line that the
    client went away, no traceback in the journal (serving checks) and no 500."""
    with serving(world) as s:
        before = world.audit_count()
        host = s.url.removeprefix("https://")
        conn = tls_socket(s)
        conn.sendall(f"POST /login HTTP/1.1\r\nHost: {host}\r\nOrigin: {s.url}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                     '{"user": '.encode())
        time.sleep(0.3)
        conn.close()
        for _ in range(50):
            if world.audit_count() > before:
                break
            time.sleep(0.1)
        line = world.audit_lines()[-1]
        assert line["endpoint"] == "login" and line["outcome"] == "error"
        assert line["reason"] == "the client went away"


@pytest.mark.parametrize("body", ["[" * 2000 + "]" * 2000, '{"user": ' * 1500, "\xff\xfe",
                                  '{"user": 1, "password": 2}'])
def test_a_login_body_that_is_no_form_is_400(world, body):
    """A deeply nested body once raised RecursionError in the JSON parser: a 500 and a
    traceback in the journal (serving checks there is none)."""
    with serving(world) as s, s.client() as c:
        r = c.post("/login", content=body.encode("latin-1"), headers={"Origin": s.url})
        assert r.status_code == 400 and r.json()["error"], r.text
        assert world.audit_lines()[-1]["endpoint"] == "login"


def test_a_body_that_never_comes_or_answers_never_read_free_their_connections(world):
    """A head whose announced body never comes (the login reads its body), and requests
    pipelined by a client that never reads the answers: each held its connection for ever,
    so that with every slot taken the server answered 503 for good. (uvicorn counts the
    connection asking: with --max-connections 3, two others make it a 503.)"""
    with serving(world, None, "--max-connections", "3", "--request-timeout", "1",
                 "--send-timeout", "1") as s:
        host = s.url.removeprefix("https://")
        no_body = tls_socket(s)
        no_body.sendall(f"POST /login HTTP/1.1\r\nHost: {host}\r\nOrigin: {s.url}\r\n"
                        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                        "{".encode())
        greedy = tls_socket(s, rcvbuf=4096)
        # 400 answers of 18 KB: more than the socket buffers on either side hold
        greedy.sendall(f"GET /static/app.js HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() * 400)
        time.sleep(0.3)
        with s.client() as c:  # the two hold their slots
            assert c.get("/api/v1/status").status_code == 503
        assert closed_within(no_body, 3)
        t0 = time.monotonic()
        while True:  # and both are given back: two clients at once are served
            time.sleep(0.5)
            with s.client() as one, s.client() as two:
                codes = [one.get("/api/v1/status").status_code,
                         two.get("/api/v1/status").status_code]
            if codes == [200, 200]:
                break
            assert time.monotonic() - t0 < 6, codes
        greedy.close()
        line = world.audit_lines()[-1]
        assert line["endpoint"] == "login" and line["reason"] == "the client went away"


def test_a_slow_download_that_progresses_is_not_cut(world, big):
    """--send-timeout cuts a connection whose client takes nothing, not one whose client
    reads slower than the server writes. (Loopback's MSS is 64 KiB: the client's kernel
    reopens its window only once it has room for a whole segment, here about every 0.8 s of
    16 KiB reads, so the acknowledgements come in steps that far apart; a timeout of 1 s cut
    this client now and then.)"""
    with serving(world, [big], "--send-timeout", "2") as s:
        conn = tls_socket(s, rcvbuf=64 << 10)
        b, e = world.window
        auth = base64.b64encode(f"{world.member.name}:{world.member.password}".encode())
        conn.sendall(f"GET /api/v1/pcap?begin={b}&end={e}&snaplen=200 HTTP/1.1\r\n"
                     f"Host: localhost\r\nAuthorization: Basic {auth.decode()}\r\n"
                     "Connection: close\r\n\r\n".encode())
        got = b""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4:  # 80 KB/s: the answer's 1 MB chunks take 12 s
            got += conn.recv(16 << 10)
            time.sleep(0.2)
        while chunk := conn.recv(1 << 20):
            got += chunk
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        print("AUDIT", world.audit_lines()[-1], len(body), time.monotonic() - t0)
        assert len(body) >= 24 + 28000 * 216, world.audit_lines()[-1]  # chunked: + sizes
        assert world.audit_lines()[-1]["outcome"] == "allowed"


@pytest.mark.parametrize("path", ["/", "/static/app.js"])
@pytest.mark.parametrize("ranges", ["bytes=999999-", "lines=1-2", "bytes=5-1"])
def test_a_range_is_ignored_not_a_plain_text_error(world, path, ranges):
    """Starlette's files answered a bad or unsatisfiable Range with a plain-text 400 or
    416; no answer here is served in ranges, so the whole file comes."""
    with serving(world) as s, s.client() as c:
        whole = c.get(path)
        r = c.get(path, headers={"Range": ranges})
        assert r.status_code == 200 and r.content == whole.content


def test_oversized_headers_are_refused(world):
    with serving(world) as s, s.client() as c:
        r = c.get("/api/v1/status", headers={"X-Junk": "a" * (32 << 10)})
        assert r.status_code == 431 and "headers" in r.json()["error"]
        assert c.get("/api/v1/status").status_code == 200


@pytest.fixture(scope="module")
def big(world):
    """About 40 MB of full-sized frames, the service account's."""
    root = world.base / "big"
    t0 = (int(world.window[0]) + 3600 - 60) * 10**9
    frame = bytes(12) + b"\x08\x00" + bytes(1486)
    build_dumpset(root, [(t0 + i * 1000, frame[:-4] + struct.pack("!I", i), 1500)
                         for i in range(28000)], per_file=7000, interface="big0")
    give_tree(root, pwd.getpwnam(world.service_account))
    return root


def test_a_client_that_leaves_stops_the_extraction(world, big):
    total = 24 + 28000 * 1516
    with serving(world, [big]) as s:
        before = world.audit_count()
        conn = tls_socket(s, rcvbuf=64 << 10)
        b, e = world.window
        auth = base64.b64encode(f"{world.member.name}:{world.member.password}".encode())
        conn.sendall(f"GET /api/v1/pcap?begin={b}&end={e} HTTP/1.1\r\nHost: localhost\r\n"
                     f"Authorization: Basic {auth.decode()}\r\n\r\n".encode())
        head = conn.recv(4096)
        assert head.startswith(b"HTTP/1.1 200"), head
        time.sleep(1)  # the server fills what the connection and the pipe hold, then waits
        conn.close()
        # The engine notices at its next write; the audit line says so.
        for _ in range(100):
            if world.audit_count() > before:
                break
            time.sleep(0.1)
        line = world.audit_lines()[-1]
        assert line["endpoint"] == "pcap" and line["outcome"] == "error"
        assert "stopped reading" in line["reason"]
        # Not the first file's 21 MB: the loop does not read the pipe on for nobody once
        # the client is gone (it once did, its sends returning at once, until the pipe ran
        # dry: the engine's whole first file went into the void).
        assert 0 < line["bytes"] < total // 4
        # What the server sent, not what the engine finished writing into the pipe (once
        # 24 bytes, the header, its first write being cut short): at least what the
        # client's 64 KiB receive buffer took.
        assert line["bytes"] > 64 << 10
        with s.client(world.member) as c:  # and the server goes on
            r = c.get("/api/v1/pcap", params={"begin": b, "end": e, "snaplen": "20"})
            assert r.status_code == 200 and len(r.content) == 24 + 28000 * 36
