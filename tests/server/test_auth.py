"""npcapserve's Gate and its root password helper, with real PAM users (authworld.py)."""

from __future__ import annotations

import asyncio
import base64
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time

import pytest
from authworld import (
    NET_FILTER,
    TOKEN_CLI,
    UDP_FILTER,
    drive_checker,
    make_auth_world,
    make_user,
    process_ended,
    remove_user,
    sh,
    uid_of,
)

from pcapvault.extract.service.policy import parse_group_filters
from pcapvault.index.errors import PcapVaultError
from pcapvault.server.auth import CheckerGone, Denied, Gate, PasswordChecker, Principal
from pcapvault.server.limits import LoginLimiter
from pcapvault.server.tokens import TokenStore

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users and PAM files: needs root"),
    pytest.mark.skipif(not shutil.which("useradd"), reason="useradd (package passwd) missing"),
]

@pytest.fixture(scope="module")
def world():
    with make_auth_world() as w:
        yield w


@pytest.fixture(scope="module")
def checker(world):
    c = PasswordChecker.start(world.pam_service)
    yield c
    c.close()


@pytest.fixture
def tokens(tmp_path):
    return TokenStore(tmp_path / "tokens")


def gate(world, checker, tokens, **limits) -> Gate:
    filters = parse_group_filters((f"{world.net_group}={NET_FILTER}",
                                   f"{world.udp_group}={UDP_FILTER}"))
    limits.setdefault("fail_delay", 0.0)
    return Gate(checker, tokens, world.group, filters, LoginLimiter(**limits))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def admit(g: Gate, header: str | None, client: str = "192.0.2.1") -> Principal:
    return asyncio.run(g.admit(header, client))


def denied(g: Gate, header: str | None, client: str = "192.0.2.1") -> Denied:
    with pytest.raises(Denied) as e:
        admit(g, header, client)
    return e.value


# The root helper


def test_helper_is_root_and_the_caller_is_not(world):
    with drive_checker(world.pam_service, world.service_account) as d:
        account = world.member.pw
        assert d.hello["uid"] == d.hello["euid"] == pwd.getpwnam(world.service_account).pw_uid
        assert uid_of(d.hello["helper"]) == 0
        assert uid_of(d.proc.pid) == d.hello["uid"]
        ok, gids = d.ask([world.member.name, world.member.password])
        assert ok and sorted(gids) == sorted(os.getgrouplist(account.pw_name, account.pw_gid))
        assert d.ask([world.member.name, world.member.password + "x"]) == [False, []]
        assert d.ask(["pvauth-nosuchuser", "x"]) == [False, []]


@pytest.mark.parametrize("length, says", [
    (1 << 20, "refused a message of 1048576 bytes"),
    (64, "refused a malformed request"),  # 64 x's: a user name of 0x7878 bytes
])
def test_helper_refuses_a_crafted_message_and_exits(world, length, says):
    with drive_checker(world.pam_service, world.service_account) as d:
        assert d.ask({"raw": length}) == "sent"
        assert process_ended(d.hello["helper"])
        assert "gone" in d.ask([world.member.name, world.member.password])
        assert says in d.stop()


def test_helper_ends_with_its_parent_even_with_the_socket_held_open(world):
    """PR_SET_PDEATHSIG, not only EOF: a descendant still holds the parent's end."""
    with drive_checker(world.pam_service, world.service_account) as d:
        sleeper = d.ask({"hold": True})
        try:
            assert not process_ended(d.hello["helper"], 0.3)
            d.proc.send_signal(signal.SIGKILL)
            assert process_ended(d.hello["helper"])
        finally:
            os.kill(sleeper, signal.SIGKILL)


@pytest.mark.parametrize("name", ["pvauth-no-such-service", "../pam.d/other", ""])
def test_an_unknown_pam_service_stops_the_start(name):
    with pytest.raises(PcapVaultError, match="no PAM service"):
        PasswordChecker.start(name)


def test_a_helper_that_cannot_run_stops_the_start(world, monkeypatch):
    """The server must not come up to refuse every password later."""
    monkeypatch.setattr(sys, "executable", shutil.which("true"))  # exits at once
    with pytest.raises(CheckerGone, match="did not start"):
        PasswordChecker.start(world.pam_service)


def test_helper_exits_when_its_socket_closes(world):
    c = PasswordChecker.start(world.pam_service)
    c.close()
    assert c.proc.returncode == 0


# The Gate


def test_member_unrestricted(world, checker, tokens):
    p = admit(gate(world, checker, tokens), basic(world.member.name, world.member.password))
    assert p == Principal(world.member.name, "password", None, ())


def test_restricted_members_get_their_filters(world, checker, tokens):
    g = gate(world, checker, tokens)
    u = world.restricted
    assert admit(g, basic(u.name, u.password)) == Principal(u.name, "password", NET_FILTER,
                                                            (world.net_group,))
    u = world.doubly_restricted
    p = admit(g, basic(u.name, u.password))
    assert p.allowed == f"({NET_FILTER}) or ({UDP_FILTER})"
    assert p.groups == (world.net_group, world.udp_group)


def test_non_member_is_forbidden(world, checker, tokens):
    e = denied(gate(world, checker, tokens), basic(world.outsider.name, world.outsider.password))
    assert e.status == 403 and world.group in e.reason


def test_wrong_password_is_refused_after_the_delay(world, checker, tokens):
    # Longer than PAM's own failure delay (pam_unix: 2 s, up to 25% more), so that it is
    # the Gate's delay that is measured.
    g = gate(world, checker, tokens, fail_delay=3.5)
    wrong = world.member.password + "x"
    t = time.monotonic()
    e = denied(g, basic(world.member.name, wrong))
    assert time.monotonic() - t >= 3.5
    assert e.status == 401 and wrong not in e.reason and world.member.password not in e.reason


def test_the_delay_does_not_block_the_event_loop(world, checker, tokens):
    g = gate(world, checker, tokens, fail_delay=0.5)

    async def both() -> tuple[int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        t = time.monotonic()
        with pytest.raises(Denied) as e:
            await g.admit("Bearer pvt_000000000000_" + "0" * 64, "192.0.2.7")
        task.cancel()
        assert e.value.status == 401
        return ticks, time.monotonic() - t

    ticks, took = asyncio.run(both())
    assert took >= 0.5 and ticks >= 10


@pytest.mark.parametrize("header", [
    "Basic", "Basic !!!!", "Basic " + base64.b64encode(b"no-colon").decode(),
    "Basic " + base64.b64encode(b":password-but-no-user").decode(),
    "Basic " + base64.b64encode(b"\xff\xfe:x").decode(), "Digest username=x", "Bearer",
    "Bearer not-a-token", "Basic " + "A" * 9000,
])
def test_malformed_credentials_are_401(world, checker, tokens, header):
    g = gate(world, checker, tokens)
    assert denied(g, header).status == 401
    assert g.limiter.blocked("192.0.2.1") == 0 and len(g.limiter) == 1  # counted


def test_no_credentials_is_401_without_counting_as_a_failure(world, checker, tokens):
    g = gate(world, checker, tokens, fail_delay=5.0)
    t = time.monotonic()
    for header in (None, "", "  "):
        assert denied(g, header).status == 401
    assert time.monotonic() - t < 1 and len(g.limiter) == 0  # a browser's first request


def test_tokens_act_as_their_user_and_stop_when_revoked(world, checker, tokens):
    """Created and revoked by `npcapserve token` while the Gate runs, as an operator would."""
    g = gate(world, checker, tokens)

    def cli(*args: str) -> str:
        r = subprocess.run([*TOKEN_CLI, "--tokens", str(tokens.path), *args],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    admit(g, basic(world.member.name, world.member.password))  # the store read: no file yet
    mine = cli("create", world.member.name)
    theirs = cli("create", world.restricted.name)
    assert admit(g, f"Bearer {mine}") == Principal(world.member.name, "token", None, ())
    assert admit(g, f"bearer  {theirs} ") == Principal(world.restricted.name, "token",
                                                        NET_FILTER, (world.net_group,))
    cli("revoke", mine.split("_")[1])
    e = denied(g, f"Bearer {mine}")
    assert e.status == 401 and mine.split("_")[2] not in e.reason
    assert admit(g, f"Bearer {theirs}").user == world.restricted.name


def test_a_token_of_a_non_member_is_forbidden(world, checker, tokens):
    token = tokens.create(world.outsider.name)
    assert denied(gate(world, checker, tokens), f"Bearer {token}").status == 403


def test_removal_from_the_group_takes_effect_at_the_next_request(world, checker, tokens):
    u = make_user(f"{world.group}x", world.base, [world.group])
    try:
        g = gate(world, checker, tokens)
        token = tokens.create(u.name)
        assert admit(g, basic(u.name, u.password)).user == u.name
        assert admit(g, f"Bearer {token}").user == u.name
        sh("gpasswd", "-d", u.name, world.group)
        assert denied(g, basic(u.name, u.password)).status == 403
        assert denied(g, f"Bearer {token}").status == 403
    finally:
        remove_user(u.name)


def test_eleventh_failure_from_an_address_is_429_while_another_gets_in(world, checker, tokens):
    g = gate(world, checker, tokens)  # max_failures=10, window=60 by default
    token = tokens.create(world.member.name)
    bad = "Bearer pvt_000000000000_" + "0" * 64
    for _ in range(10):
        assert denied(g, bad, "198.51.100.9").status == 401
    e = denied(g, f"Bearer {token}", "198.51.100.9")  # even with good credentials
    assert e.status == 429 and 59 < e.retry_after <= 60
    e = denied(g, basic(world.member.name, world.member.password), "198.51.100.9")
    assert e.status == 429
    assert admit(g, f"Bearer {token}", "198.51.100.10").user == world.member.name
    assert admit(g, basic(world.member.name, world.member.password), "2001:db8::1").user


def test_a_dead_helper_is_503_not_a_wrong_password(world, tokens):
    c = PasswordChecker.start(world.pam_service)
    try:
        c.proc.kill()
        c.proc.wait()
        g = gate(world, c, tokens)
        e = denied(g, basic(world.member.name, world.member.password))
        assert e.status == 503 and world.member.password not in e.reason
        assert len(g.limiter) == 0  # the client did nothing wrong
    finally:
        c.close()


def test_damaged_tokens_file_is_503(world, checker, tokens):
    tokens.path.write_text("{not json")
    assert denied(gate(world, checker, tokens), "Bearer pvt_000000000000_" + "0" * 64
                  ).status == 503
