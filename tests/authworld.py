"""The world of npcapserve's authentication tests: real PAM users and groups (pamworld.py's
make_user), a PAM service file with the shipped content, and a service account, all removed
at the end; no dump set or extraction service, which these tests do not need.

`drive_checker` runs a PasswordChecker the way npcapserve will: started as root, then the
process drops to the service account and asks from there.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pamworld import NET_FILTER, PAM_FILE, UDP_FILTER, User, make_user, remove_user, sh

# `npcapserve token ...` as the app's command will run it.
TOKEN_CLI = [sys.executable, "-c", "from pcapvault.server.tokens import main; main()"]

__all__ = ["NET_FILTER", "UDP_FILTER", "AuthWorld", "make_auth_world", "drive_checker",
           "make_user", "remove_user", "sh", "process_ended", "uid_of"]


@dataclass
class AuthWorld:
    base: Path
    pam_service: str
    service_account: str
    group: str  # the extractors' group
    net_group: str  # restricted by NET_FILTER
    udp_group: str  # restricted by UDP_FILTER
    member: User
    outsider: User  # only in udp_group: a restriction grants nothing
    restricted: User  # group and net_group
    doubly_restricted: User  # group, net_group and udp_group


@contextmanager
def make_auth_world() -> Iterator[AuthWorld]:
    tag = secrets.token_hex(3)
    svc, group, net_group, udp_group = (f"pva{tag}{c}" for c in "sgnu")
    pam_service = f"pvauth-{tag}"
    base = Path(tempfile.mkdtemp(prefix="pv-auth-", dir="/tmp"))
    base.chmod(0o755)
    users: list[str] = []
    try:
        for g in (group, net_group, udp_group):
            sh("groupadd", g)
        sh("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", svc)
        users.append(svc)
        made = []
        for suffix, groups in (("a", [group]), ("b", [udp_group]), ("c", [group, net_group]),
                               ("d", [group, net_group, udp_group])):
            made.append(make_user(f"pva{tag}{suffix}", base, groups))
            users.append(made[-1].name)
        Path(f"/etc/pam.d/{pam_service}").write_text(PAM_FILE.read_text())
        yield AuthWorld(base, pam_service, svc, group, net_group, udp_group, *made)
    finally:
        for name in users:
            remove_user(name)
        for g in (group, net_group, udp_group, svc):
            subprocess.run(["groupdel", g], capture_output=True)
        Path(f"/etc/pam.d/{pam_service}").unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


# Run as root by drive_checker: start the helper, drop to the account, then answer one JSON
# line per request on stdin. A request is [user, password], or {"raw": N} to send a bare
# header announcing N bytes, or {"hold": true} to pass our end of the socketpair to a
# sleeping child (so that only PR_SET_PDEATHSIG, not EOF, can end the helper when we die).
DRIVER = r"""
import json, os, subprocess, sys
from pcapvault.index.privileges import drop_to, lookup
from pcapvault.server.auth import LENGTH, CheckerGone, PasswordChecker

service, account = sys.argv[1:3]
checker = PasswordChecker.start(service)
drop_to(lookup(account))
print(json.dumps({"helper": checker.proc.pid, "uid": os.getuid(), "euid": os.geteuid()}),
      flush=True)
for line in sys.stdin:
    req = json.loads(line)
    try:
        if isinstance(req, list):
            out = checker.check(*req)
        elif "raw" in req:
            checker._sock.sendall(LENGTH.pack(req["raw"]) + b"x" * 64)
            out = "sent"
        else:
            fd = checker._sock.fileno()
            out = subprocess.Popen(["sleep", "600"], pass_fds=[fd]).pid
    except CheckerGone as e:
        out = {"gone": str(e)}
    print(json.dumps(out), flush=True)
"""


class CheckerDriver:
    """A process that started a PasswordChecker as root and now runs as `account`."""

    def __init__(self, pam_service: str, account: str):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, pam_service, account],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.hello = json.loads(self.proc.stdout.readline() or "null") or {}
        assert self.hello, self.proc.stderr.read()

    def ask(self, request: object) -> object:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read()
        return json.loads(line)

    def stop(self) -> str:
        """End the driver; its stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        return self.proc.stderr.read()


@contextmanager
def drive_checker(pam_service: str, account: str) -> Iterator[CheckerDriver]:
    d = CheckerDriver(pam_service, account)
    try:
        yield d
    finally:
        d.stop()
        helper = d.hello.get("helper")
        if helper and not process_ended(helper, 0):
            os.kill(helper, 9)


def process_ended(pid: int, timeout: float = 10) -> bool:
    """Whether `pid` is gone (or a zombie nobody reaps) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def uid_of(pid: int) -> int:
    """The real uid of a running process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")
