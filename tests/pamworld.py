"""The world of the PAM service tests: real PAM (pam_unix), throwaway users and groups, a
private dump set recorded with `recorder -u SERVICE_ACCOUNT`, and the service's entry point run
per connection by systemd-socket-activate --accept exactly as npcapextract.socket runs it.

`make_world()` creates a group, a member and a non-member (with passwords), two groups
restricted by --group-filter with members of their own, a PAM service file with the shipped
content, and removes all of it at the end; conftest.py makes it the module-scoped `world`
fixture.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from extract_helpers import synthetic_traffic, write_pcap
from netns import veth_pair
from recorderproc import BIN, RecorderProc

from pcapvault.extract.service import wire

ROOT = Path(__file__).resolve().parents[1]
PAM_FILE = ROOT / "systemd" / "pam.d" / "npcapextract"
FAIL_DELAY = 0.5
# The --group-filter restrictions of the module's service: one selects by address, the other
# by protocol, so that their union is wider than either.
NET_FILTER = "net 10.0.0.0/16"
UDP_FILTER = "udp"
CLIENT = [sys.executable, "-m", "pcapvault.extract"]  # the console script's entry

PAM_MARKS = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users and PAM files: needs root"),
    pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                       reason="systemd-socket-activate (package systemd) starts the service "
                              "per connection as npcapextract.socket does"),
    pytest.mark.skipif(not shutil.which("useradd"), reason="useradd (package passwd) missing"),
]


def service_entry() -> list[str]:
    """The console script npcapextract@.service runs (or its module, in a source tree)."""
    p = BIN / "npcapextractd"
    return [str(p)] if p.exists() else [sys.executable, "-m", "pcapvault.extract.service.server"]


def sh(*args: str, input: str | None = None) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, input=input)


@dataclass
class User:
    name: str
    password: str
    home: Path

    @property
    def pw(self) -> pwd.struct_passwd:
        return pwd.getpwnam(self.name)

    def run(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, timeout=60, **self.popen_kw(), **kw)

    def popen_kw(self) -> dict:
        """Drop to this user in the child, as login would: its uid, gid and groups."""
        pw = self.pw
        return dict(user=pw.pw_uid, group=pw.pw_gid,
                    extra_groups=os.getgrouplist(pw.pw_name, pw.pw_gid), cwd=self.home,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


@dataclass
class Service:
    """systemd-socket-activate --accept running the service's entry point."""

    socket: Path
    log: Path
    args: list[str]
    proc: subprocess.Popen | None = field(default=None, repr=False)
    prefix: list[str] = field(default_factory=list)  # runs the whole command, e.g. unshare

    def start(self) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, "systemd-socket-activate", "--accept", "-l", str(self.socket),
                 *service_entry(), *self.args],
                stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.02)
        self.socket.chmod(0o666)  # SocketMode=0666 in npcapextract.socket
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@dataclass
class World:
    base: Path
    dumpset: Path
    service_account: str
    group: str
    pam_service: str
    member: User
    outsider: User
    audit: Path
    service: Service
    window: tuple[str, str]
    net_group: str  # --group-filter NET_FILTER
    udp_group: str  # --group-filter UDP_FILTER
    restricted: User  # in the group and in net_group
    doubly_restricted: User  # in the group, net_group and udp_group
    syslog: SyslogCatcher

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def client(self, *args: str, service: Service | None = None) -> list[str]:
        b, e = self.window
        return [*CLIENT, "-t", str(self.dumpset), "-b", b, "-e", e,
                "--service-socket", str((service or self.service).socket), *args]

    def direct(self, *args: str, to_stdout: bool = True) -> bytes:
        b, e = self.window
        r = subprocess.run([*CLIENT, "-t", str(self.dumpset), "-b", b, "-e", e,
                            *(["-O"] if to_stdout else []), *args],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def through_service(self, user: User, *args: str, service: Service | None = None
                        ) -> subprocess.CompletedProcess:
        """npcapextract run by `user`, who types the right password."""
        return user.run(self.client(*args, "--password-stdin", service=service),
                        input=f"{user.password}\n".encode())

    def audit_count(self) -> int:
        return len(self.audit_lines()) if self.audit.exists() else 0


class SyslogCatcher:
    """Everything sent to /dev/log while it runs, as (priority, message) pairs.

    A thread keeps reading: senders block once a Unix datagram socket holds
    net.unix.max_dgram_qlen messages (10 by default)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received: list[tuple[int, str]] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return  # closed at the end of the module
            head, _, rest = data.decode(errors="replace").partition(">")
            if head.startswith("<") and head[1:].isdigit():
                self.received.append((int(head[1:]), rest))

    def wait_for(self, tag: str, lines: list[str], timeout: float = 10) -> list[int]:
        """The priority of the message that carries each of `lines` after `tag[pid]: `."""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            for prio, msg in list(self.received):
                before, sep, line = msg.partition("]: ")
                if sep and before.split()[-1].startswith(f"{tag}[") and line in lines:
                    found[line] = prio
            if len(found) == len(lines) or time.monotonic() > deadline:
                return [found.get(line, -1) for line in lines]
            time.sleep(0.05)


@contextmanager
def catch_syslog(base: Path) -> Iterator[tuple[SyslogCatcher, list[str]]]:
    """A socket that receives what is sent to /dev/log, and the prefix of the command that
    starts the service so that its /dev/log is that socket.

    Where the machine has a syslog socket, the service gets ours in a mount namespace of its
    own (bind-mounted over /dev/log), so the machine's logging is untouched; where it has none
    (containers, CI), ours is created at /dev/log and removed at the end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    own = not os.path.lexists("/dev/log")
    path = Path("/dev/log") if own else base / "dev-log"
    try:
        sock.bind(str(path))
        path.chmod(0o666)
        prefix = [] if own else [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount --bind "$0" /dev/log && exec "$@"', str(path),
        ]
        yield SyslogCatcher(sock), prefix
    finally:
        sock.close()
        if own:
            path.unlink(missing_ok=True)


def make_user(name: str, base: Path, groups: list[str]) -> User:
    password = secrets.token_urlsafe(12)
    sh("useradd", "-M", "-N", "-g", "users", "-s", "/usr/sbin/nologin",
       *(["-G", ",".join(groups)] if groups else []), name)
    sh("chpasswd", input=f"{name}:{password}\n")
    home = base / f"home-{name}"
    home.mkdir()
    pw = pwd.getpwnam(name)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    home.chmod(0o700)
    return User(name, password, home)


def remove_user(name: str) -> None:
    """userdel refuses while a process of the user lives (a service instance finishing)."""
    for _ in range(50):
        if subprocess.run(["userdel", name], capture_output=True).returncode in (0, 6):
            return
        time.sleep(0.1)
    subprocess.run(["userdel", "-f", name], capture_output=True)


@contextmanager
def make_world() -> Iterator[World]:
    tag = secrets.token_hex(3)
    svc, grp_name = f"pvt{tag}s", f"pvt{tag}g"
    net_group, udp_group = f"pvt{tag}n", f"pvt{tag}u"
    pam_service = f"pvtest-{tag}"
    base = Path(tempfile.mkdtemp(prefix="pv-pam-", dir="/tmp"))
    base.chmod(0o755)  # traversable: the service account writes the dump set in it
    created_users: list[str] = []
    service = None
    cleanup = ExitStack()
    try:
        for group in (grp_name, net_group, udp_group):
            sh("groupadd", group)
        # Its own group, as sysusers.d makes pcapvault:pcapvault: the users are not in it.
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", svc)
        created_users.append(svc)
        member = make_user(f"pvt{tag}a", base, [grp_name])
        created_users.append(member.name)
        # In a restricted group but not in the extractors' group: a restriction grants nothing.
        outsider = make_user(f"pvt{tag}b", base, [udp_group])
        created_users.append(outsider.name)
        restricted = make_user(f"pvt{tag}c", base, [grp_name, net_group])
        created_users.append(restricted.name)
        doubly = make_user(f"pvt{tag}d", base, [grp_name, net_group, udp_group])
        created_users.append(doubly.name)
        Path(f"/etc/pam.d/{pam_service}").write_text(PAM_FILE.read_text())

        try:
            probe = outsider.run([sys.executable, "-c", "import pcapvault.extract.cli"])
            why = probe.stderr.decode(errors="replace").strip()[-200:]
            usable = probe.returncode == 0
        except OSError as e:
            why, usable = e.strerror, False
        if not usable:
            pytest.skip(f"{sys.executable} cannot be run by an unprivileged user (an interpreter "
                        f"under /root?): {why}; run the tests with /opt/pcapvault/bin/python")

        # A private dump set, recorded the way a sensor records it.
        src = base / "in.pcap"
        write_pcap(src, synthetic_traffic(1500, time.time_ns(), seed=5, span_s=2.0))
        with veth_pair() as pair:
            rec = RecorderProc(pair, base / "ds", "-u", svc, "-p", "0.1M", "--disk-limit", "1GB")
            pair.send([src])
            time.sleep(0.3)
            assert rec.stop() == 0, rec.stderr
        src.unlink()

        (base / "audit").mkdir(mode=0o755)
        audit = base / "audit" / "audit.jsonl"
        catcher, prefix = cleanup.enter_context(catch_syslog(base))
        service = Service(base / "extract.sock", base / "service.log", prefix=prefix, args=[
            "-u", svc, "--group", grp_name, "--pam-service", pam_service,
            "--audit-log", str(audit), "--allow", str(base / "ds"),
            "--fail-delay", str(FAIL_DELAY), "--max-attempts", "2",
            "--group-filter", f"{net_group}={NET_FILTER}",
            "--group-filter", f"{udp_group}={UDP_FILTER}",
        ]).start()
        now = int(time.time())
        yield World(base, base / "ds", svc, grp_name, pam_service, member, outsider, audit,
                    service, (str(now - 3600), str(now + 3600)), net_group, udp_group,
                    restricted, doubly, catcher)
        log = (base / "service.log").read_text()
        assert "Traceback" not in log, log
    finally:
        if service:
            service.stop()
        cleanup.close()
        for name in created_users:
            remove_user(name)
        for group in (grp_name, net_group, udp_group, svc):
            subprocess.run(["groupdel", group], capture_output=True)
        Path(f"/etc/pam.d/{pam_service}").unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)



def raw_exchange(world: World, payload: bytes, shut: bool = True) -> tuple[list, bytes]:
    """Send raw bytes as a client would; return the frames the service answered."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(world.service.socket))
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass
    if shut:
        s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    s.close()
    frames, pos = [], 0
    while pos + wire.FRAME.size <= len(data):
        kind, n = wire.FRAME.unpack_from(data, pos)
        frames.append((kind, json.loads(data[pos + 12 : pos + 12 + n]) if kind == b"R"
                       else data[pos + 12 : pos + 12 + n]))
        pos += 12 + n
    return frames, data


def request(**fields) -> bytes:
    body = {"version": 1, "password": "x", "dumpsets": ["/nonexistent"], "begin_ns": 0,
            "end_ns": 10, **fields}
    payload = json.dumps(body).encode()
    return wire.FRAME.pack(b"Q", len(payload)) + payload


RAW_CLIENT = Path(__file__).with_name("rawclient.py")


def raw_client(user: User, service: Service, *, password: str | None = None, timeout: float = 60,
               **plan) -> list[dict]:
    """tests/rawclient.py run as `user` against `service`: one dict per exchange.

    The source goes through -c: the user may not be able to read the test tree."""
    spec = {"socket": str(service.socket), "password": user.password if password is None
            else password, **plan}
    spec.setdefault("payload", {})
    r = subprocess.run([sys.executable, "-c", RAW_CLIENT.read_text()],
                       input=json.dumps(spec).encode(), capture_output=True, timeout=timeout,
                       **user.popen_kw())
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]
