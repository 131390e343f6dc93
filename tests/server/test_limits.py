"""LoginLimiter: failed logins per client address over a sliding window, in bounded memory."""

from __future__ import annotations

import time

import pytest

from pcapvault.server.limits import LoginLimiter


def fail(lim: LoginLimiter, addr: str, n: int) -> None:
    for _ in range(n):
        lim.failed(addr)


def test_blocked_after_max_failures_until_the_oldest_ages_out():
    lim = LoginLimiter(max_failures=3, window=0.3)
    fail(lim, "192.0.2.1", 2)
    assert lim.blocked("192.0.2.1") == 0
    fail(lim, "192.0.2.1", 1)
    assert 0.2 < lim.blocked("192.0.2.1") <= 0.3
    assert lim.blocked("192.0.2.2") == 0  # another address
    time.sleep(0.35)
    assert lim.blocked("192.0.2.1") == 0


def test_the_window_slides():
    lim = LoginLimiter(max_failures=2, window=0.4)
    lim.failed("a")
    time.sleep(0.25)
    lim.failed("a")
    assert lim.blocked("a") > 0
    time.sleep(0.2)  # the first failure has aged out, the second not
    assert lim.blocked("a") == 0
    lim.failed("a")
    assert 0.1 < lim.blocked("a") <= 0.2  # until the second ages out, not a whole window


def test_a_success_forgives_once_per_window():
    lim = LoginLimiter(max_failures=3, window=60)
    fail(lim, "a", 2)
    lim.succeeded("a")  # a user who mistyped, then got it right
    fail(lim, "a", 2)
    assert lim.blocked("a") == 0
    lim.succeeded("a")  # not again within the window: one valid account is no reset button
    lim.failed("a")
    assert lim.blocked("a") > 0


def test_memory_is_bounded_and_the_stalest_address_goes_first():
    lim = LoginLimiter(max_failures=2, window=60, max_addresses=100)
    fail(lim, "198.51.100.1", 2)
    for i in range(99):
        lim.failed(f"10.0.0.{i}")
    fail(lim, "198.51.100.1", 1)  # the newest failure again: not the stalest any more
    for i in range(50):
        lim.failed(f"10.1.0.{i}")
    assert len(lim) == 100
    assert lim.blocked("198.51.100.1") > 0
    assert lim.blocked("10.0.0.0") == 0 and "10.0.0.0" not in lim._seen


def test_ipv6_is_limited_per_64_and_mapped_ipv4_as_ipv4():
    lim = LoginLimiter(max_failures=2, window=60)
    lim.failed("2001:db8:1:2::1")
    lim.failed("2001:db8:1:2:ffff::7")
    assert lim.blocked("2001:db8:1:2::99") > 0
    assert lim.blocked("2001:db8:1:3::1") == 0
    fail(lim, "::ffff:192.0.2.5", 2)
    assert lim.blocked("192.0.2.5") > 0


@pytest.mark.parametrize("kw", [dict(fail_delay=-1), dict(max_failures=0), dict(window=0),
                                dict(max_addresses=0)])
def test_nonsense_limits_are_refused(kw):
    with pytest.raises(ValueError):
        LoginLimiter(**kw)
