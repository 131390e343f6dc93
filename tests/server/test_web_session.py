"""The web page's session store (server/session.py): idle expiry, logout, bounded memory."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest
from authworld import NET_FILTER, UDP_FILTER, make_auth_world, make_user, remove_user, sh

from pcapvault.extract.service.policy import parse_group_filters
from pcapvault.server.auth import Denied, Gate, PasswordChecker, Principal
from pcapvault.server.limits import LoginLimiter
from pcapvault.server.session import SessionStore
from pcapvault.server.tokens import TokenStore

ROOT_MARKS = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd"),
                                reason="creates users and PAM files: needs root and useradd")


def test_idle_session_ends_and_use_keeps_it_alive():
    store = SessionStore(idle=0.3)
    sid = store.create("alice")
    for _ in range(4):  # used every 0.15 s: alive for longer than one idle period
        time.sleep(0.15)
        assert store.user(sid) == "alice"
    time.sleep(0.4)
    assert store.user(sid) is None
    assert store.user(sid) is None  # and it stays ended


def test_end_is_on_the_server_and_ids_are_unguessable():
    store = SessionStore()
    a, b = store.create("alice"), store.create("alice")
    assert a != b and len(a) >= 43  # 256 random bits, URL-safe base64
    assert store.end(a) and not store.end(a)
    assert store.user(a) is None and store.user(b) == "alice"
    assert store.user(None) is None and store.user("") is None and not store.end(None)


def test_memory_is_bounded_least_recently_used_goes():
    store = SessionStore(max_sessions=3)
    ids = [store.create(f"u{i}") for i in range(3)]
    assert store.user(ids[0]) == "u0"  # used: the oldest unused is now ids[1]
    newer = store.create("u3")
    assert len(store) == 3
    assert store.user(ids[1]) is None
    assert [store.user(x) for x in (ids[0], ids[2], newer)] == ["u0", "u2", "u3"]


def test_a_session_in_use_still_ends_at_its_lifetime():
    """A stolen cookie, or the session of an account locked since, used every few minutes
    would otherwise live for ever."""
    store = SessionStore(idle=0.3, lifetime=0.7)
    sid = store.create("alice")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        assert store.user(sid) == "alice"
        time.sleep(0.1)
    time.sleep(0.2)
    assert store.user(sid) is None


def test_the_page_timer_does_not_keep_a_session_alive():
    store = SessionStore(idle=0.3)
    sid = store.create("alice")
    time.sleep(0.2)
    assert store.user(sid, touch=False) == "alice"
    time.sleep(0.2)  # 0.4 s since the analyst's last use
    assert store.user(sid, touch=False) is None and store.user(sid) is None


def test_one_user_cannot_log_everyone_else_out():
    """Logging in over and over (one account, a valid password) ended the least recently
    used sessions of everyone once the store was full; now it ends the user's own."""
    store = SessionStore(max_sessions=10, per_user=3)
    others = [store.create(f"analyst{i}") for i in range(5)]
    mallory = [store.create("mallory") for _ in range(50)]
    assert [store.user(s) for s in others] == [f"analyst{i}" for i in range(5)]
    assert [store.user(s) for s in mallory[-3:]] == ["mallory"] * 3
    assert all(store.user(s) is None for s in mallory[:-3]) and len(store) == 8
    store.user(mallory[-3])  # used: the user's least recently used is now the next one
    store.create("mallory")
    assert store.user(mallory[-3]) == "mallory" and store.user(mallory[-2]) is None


# The Gate admits a session id as it admits a token: the groups looked up at every request.

@pytest.fixture(scope="module")
def auth():
    with make_auth_world() as w:
        c = PasswordChecker.start(w.pam_service)
        yield w, c
        c.close()


def session_gate(auth, tmp_path) -> Gate:
    w, checker = auth
    filters = parse_group_filters((f"{w.net_group}={NET_FILTER}", f"{w.udp_group}={UDP_FILTER}"))
    return Gate(checker, TokenStore(tmp_path / "tokens"), w.group, filters,
                LoginLimiter(fail_delay=0.0, max_failures=2))


def admit(g: Gate, sid: str | None, header: str | None = None) -> Principal:
    return asyncio.run(g.admit(header, "192.0.2.7", sid))


@ROOT_MARKS
def test_session_is_its_users_groups_now(auth, tmp_path):
    w, _ = auth
    g = session_gate(auth, tmp_path)
    p = admit(g, g.sessions.create(w.restricted.name))
    assert (p.user, p.method, p.allowed) == (w.restricted.name, "session", NET_FILTER)
    with pytest.raises(Denied) as e:
        admit(g, g.sessions.create(w.outsider.name))
    assert e.value.status == 403
    u = make_user(f"{w.group}s", w.base, [w.group])
    try:
        sid = g.sessions.create(u.name)
        assert admit(g, sid).user == u.name
        sh("gpasswd", "-d", u.name, w.group)
        with pytest.raises(Denied) as e:
            admit(g, sid)
        assert e.value.status == 403
    finally:
        remove_user(u.name)


@ROOT_MARKS
def test_ended_session_is_401_and_no_failed_login(auth, tmp_path):
    w, _ = auth
    g = session_gate(auth, tmp_path)  # two failures would block the address
    sid = g.sessions.create(w.member.name)
    g.sessions.end(sid)
    for _ in range(3):
        with pytest.raises(Denied) as e:
            admit(g, sid)
        assert e.value.status == 401 and "log in again" in e.value.reason
    assert len(g.limiter) == 0
    live = g.sessions.create(w.member.name)
    with pytest.raises(Denied) as e:  # a header wins over the cookie, and its failure counts
        admit(g, live, "Bearer pvt_000000000000_" + "0" * 64)
    assert e.value.status == 401 and len(g.limiter) == 1
