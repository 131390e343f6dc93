"""Test network: a veth pair whose ends live in two throwaway network namespaces.

Nothing here reaches a real network: frames are sent raw on one end and arrive on the other.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SENDER = Path(__file__).with_name("sendraw.py")


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass
class VethPair:
    tx_ns: str
    rx_ns: str
    tx: str = "pvtx"
    rx: str = "pvrx"

    def run_rx(self, *cmd: str, **kw) -> subprocess.Popen:
        """Start a command inside the receiving namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.rx_ns, *cmd], **kw)

    def send(self, pcaps: list[Path], *, pps: int = 0, out: Path | None = None,
             vlan_tags: bool = True) -> list[bytes]:
        """Send the frames of `pcaps` raw from the transmitting end; return what was sent."""
        out = out or Path(f"/tmp/pv-sent-{secrets.token_hex(4)}.bin")
        cmd = ["ip", "netns", "exec", self.tx_ns, sys.executable, str(SENDER),
               "--iface", self.tx, "--out", str(out), "--pps", str(pps)]
        subprocess.run(cmd + [str(p) for p in pcaps], check=True)
        data = out.read_bytes()
        out.unlink()
        return decode_sent(data)


def decode_sent(data: bytes) -> list[bytes]:
    frames, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "little")
        frames.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return frames


@contextmanager
def veth_pair(mtu: int = 9000) -> Iterator[VethPair]:
    if os.geteuid() != 0:
        import pytest

        pytest.skip("veth tests need root (network namespaces)")
    tag = secrets.token_hex(3)
    pair = VethPair(f"pvtx-{tag}", f"pvrx-{tag}")
    try:
        sh("ip", "netns", "add", pair.tx_ns)
        sh("ip", "netns", "add", pair.rx_ns)
        sh("ip", "link", "add", pair.tx, "netns", pair.tx_ns, "type", "veth",
           "peer", "name", pair.rx, "netns", pair.rx_ns)
        for ns, dev in ((pair.tx_ns, pair.tx), (pair.rx_ns, pair.rx)):
            # No IPv6 autoconfiguration chatter: only the test's own frames cross the pair.
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw",
               "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", ns, "link", "set", dev, "mtu", str(mtu))
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        time.sleep(0.1)
        yield pair
    finally:
        sh("ip", "netns", "del", pair.tx_ns, check=False)
        sh("ip", "netns", "del", pair.rx_ns, check=False)
