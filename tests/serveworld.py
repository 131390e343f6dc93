"""npcapserve started as its unit starts it, on the PAM service's world (pamworld.py).

A real process, as root: TLS with a certificate made here by openssl (its key readable by root
only), the world's PAM service, users, groups and --group-filter restrictions, its audit
log, an API token store; it drops to the world's service account before serving. Clients are
httpx clients that trust that certificate and nothing else.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pamworld import NET_FILTER, UDP_FILTER, User, World
from proctree import descendants
from recorderproc import tool


def make_tls(base: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, as setup.sh --system makes."""
    cert, key = base / "cert.pem", base / "key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
        key.chmod(0o600)
        cert.chmod(0o644)
    return cert, key


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    cert: Path
    tokens: Path
    lines: list[str] = field(default_factory=list)

    def client(self, user: User | None = None, password: str | None = None,
               token: str | None = None, timeout: float = 120) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.cert))
        auth = (user.name, password if password is not None else user.password) if user else None
        headers = {"Authorization": f"Bearer {token}"} if token else None
        return httpx.Client(base_url=self.url, verify=ctx, auth=auth, headers=headers,
                            timeout=timeout)

    def token(self, *args: str) -> subprocess.CompletedProcess:
        """`npcapserve token --tokens FILE ARGS`, as root."""
        return subprocess.run([tool("npcapserve"), "token", "--tokens", str(self.tokens), *args],
                              capture_output=True, text=True, timeout=60)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@contextmanager
def serving(world: World, dumpsets: list[Path] | None = None, *args: str) -> Iterator[Served]:
    """npcapserve on 127.0.0.1 (a free port), TLS, the world's rules; stopped after."""
    cert, key = make_tls(world.base)
    tokens = world.base / "tokens" / "tokens"
    if not tokens.parent.exists():
        tokens.parent.mkdir(mode=0o750)
        shutil.chown(tokens.parent, "root", world.service_account)
    cmd = [tool("npcapserve"), "--listen", "127.0.0.1", "--port", "0",
           "--tls-cert", str(cert), "--tls-key", str(key), "-u", world.service_account,
           "--group", world.group, "--pam-service", world.pam_service,
           "--audit-log", str(world.audit), "--tokens", str(tokens), "--fail-delay", "0.3",
           "--group-filter", f"{world.net_group}={NET_FILTER}",
           "--group-filter", f"{world.udp_group}={UDP_FILTER}",
           *[a for d in (dumpsets or [world.dumpset]) for a in ("-t", str(d))], *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd="/")
    served = Served(proc, "", cert, tokens)
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stderr:
            served.lines.append(line)
            m = re.search(r"on (https?://\S+)", line)
            if m and not served.url:
                served.url = m.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(30) and served.url, f"npcapserve did not start: {served.stderr}"
        yield served
    finally:
        kids = descendants(proc.pid)
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(30)
        finally:
            assert "Traceback" not in served.stderr, served.stderr
        left_behind(kids)


def left_behind(pids: list[int], wait_s: float = 5.0) -> None:
    """Fail if a process the server started outlives it for more than `wait_s`: it would
    hold the server's output open, and memory."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not alive, "outlived npcapserve: " + "; ".join(
        Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in alive)

