"""How fast one client address may guess passwords or tokens.

Each failed login from an address is remembered for `window` seconds; an address with
`max_failures` of them inside the window is turned away (HTTP 429) until the oldest ages out.
The delay of each failure (`fail_delay`) is the Gate's to apply; it lives here so that both
limits are configured in one place.

Memory is bounded: at most `max_addresses` addresses are tracked, each with at most
`max_failures` timestamps; when the table is full, the address whose last failure is the
oldest is forgotten first (it is the nearest to ageing out anyway).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class _Failures:
    times: deque[float]
    forgiven_at: float = field(default=float("-inf"))


class LoginLimiter:
    """Failed logins per client address, over a sliding window."""

    def __init__(self, fail_delay: float = 1.0, max_failures: int = 10, window: float = 60.0,
                 max_addresses: int = 10_000):
        if fail_delay < 0 or max_failures < 1 or window <= 0 or max_addresses < 1:
            raise ValueError("fail_delay >= 0, max_failures >= 1, window > 0, "
                             "max_addresses >= 1")
        self.fail_delay = fail_delay
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._seen: OrderedDict[str, _Failures] = OrderedDict()
        # The app calls us from its event loop, but nothing stops a caller in a thread.
        self._lock = threading.Lock()

    def blocked(self, addr: str) -> float:
        """Seconds until `addr` may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(_key(addr))
            if entry is None or len(entry.times) < self.max_failures:
                return 0.0
            return max(0.0, entry.times[0] + self.window - now)

    def failed(self, addr: str) -> None:
        """A failed login from `addr`."""
        key, now = _key(addr), time.monotonic()
        with self._lock:
            entry = self._seen.pop(key, None)
            if entry is None:
                while len(self._seen) >= self.max_addresses:
                    self._seen.popitem(last=False)
                entry = _Failures(deque(maxlen=self.max_failures))
            entry.times.append(now)
            self._seen[key] = entry  # the most recent failure goes last

    def succeeded(self, addr: str) -> None:
        """A login from `addr` succeeded: forget its failures (a user who mistyped first).

        At most once per window, though: otherwise whoever holds one valid account could
        clear the counter between guesses at other accounts' passwords."""
        now = time.monotonic()
        with self._lock:
            entry = self._seen.get(_key(addr))
            if entry is not None and now - entry.forgiven_at >= self.window:
                entry.times.clear()
                entry.forgiven_at = now

    def __len__(self) -> int:
        return len(self._seen)


def _key(addr: str) -> str:
    """The unit that is limited: an IPv4 address, or the /64 of an IPv6 one.

    One IPv6 host usually has a whole /64 to pick source addresses from."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr  # a Unix socket path, or a name the app chose
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
