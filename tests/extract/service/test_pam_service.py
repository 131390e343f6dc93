"""PAM-gated extraction end to end: real PAM (pam_unix), throwaway users, the entry point
systemd starts per connection, and npcapextract run as those users.

The module records a private dump set with `recorder -u SERVICE_ACCOUNT`, creates a group, a
member and a non-member (with passwords), two groups restricted by --group-filter with members
of their own, a PAM service file with the shipped content, and removes all of it at the end.
The service runs under systemd-socket-activate --accept, which hands each connection to a
fresh instance on fd 3 exactly as npcapextract.socket does.
"""

from __future__ import annotations

import json
import os
import pty
import pwd
import secrets
import select
import shutil
import socket
import stat
import subprocess
import sys
import syslog
import tempfile
import time
from pathlib import Path

import pytest
from pamworld import (
    CLIENT,
    FAIL_DELAY,
    NET_FILTER,
    PAM_MARKS,
    ROOT,
    UDP_FILTER,
    Service,
    raw_exchange,
    request,
    service_entry,
)

from pcapvault.extract import prestart
from pcapvault.extract.service import wire

pytestmark = PAM_MARKS

def test_dump_set_is_private_to_the_service_account(world):
    svc_uid = pwd.getpwnam(world.service_account).pw_uid
    files = [p for p in world.dumpset.rglob("*") if p.is_file() and not p.is_symlink()]
    pcaps = [p for p in files if p.suffix == ".pcap"]
    assert len(pcaps) >= 2
    for p in files:
        st = p.stat()
        assert st.st_uid == svc_uid and stat.S_IMODE(st.st_mode) == 0o640, p
    for d in [world.dumpset, *(p for p in world.dumpset.rglob("*") if p.is_dir())]:
        if not d.is_symlink():
            assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    # Neither user may read it directly: the member needs the service.
    for user in (world.member, world.outsider):
        r = user.run([sys.executable, "-c", "import os, sys; print(os.access(sys.argv[1], "
                      "os.R_OK | os.X_OK))", str(world.dumpset)])
        assert r.stdout.strip() == b"False"


@pytest.mark.parametrize("args", [["-f", "tcp"], ["-f", "udp or icmp", "--pcapng", "-s", "60"]])
def test_member_gets_exactly_the_direct_extraction(world, args):
    expected = world.direct(*args)
    assert len(expected) > 1000
    out = world.member.home / "result.pcap"
    before = len(world.audit_lines()) if world.audit.exists() else 0
    # No --service: the dump set is unreadable, so the client turns to the service itself.
    r = world.member.run(world.client(*args, "-o", str(out), "--password-stdin"),
                         input=f"{world.member.password}\n".encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and r.stderr == b""
    assert out.read_bytes() == expected
    st = out.stat()
    assert st.st_uid == world.member.pw.pw_uid  # written by the client, with the user's rights
    assert stat.S_IMODE(st.st_mode) == 0o600  # the member's alone, whatever their umask
    lines = world.audit_lines()[before:]
    assert len(lines) == 1
    a = lines[0]
    assert a["outcome"] == "allowed"
    assert a["peer_user"] == a["pam_user"] == world.member.name
    assert a["peer_uid"] == world.member.pw.pw_uid
    assert a["dumpsets"] == [str(world.dumpset)]
    assert a["filter"] == a["effective_filter"] == args[1]  # in no restricted group
    assert a["restricted_by"] == []
    assert a["bytes"] == len(expected) and a["packets"] > 0
    assert a["begin"].endswith("Z") and a["duration_s"] >= 0
    assert world.member.password not in world.audit.read_text()


@pytest.mark.parametrize("split", [["-N", "300"], ["-P", "1", "--pcapng"]])
def test_split_output_through_the_service(world, split, tmp_path):
    b, e = world.window
    r = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, *split, "-o",
                        str(tmp_path / "direct")], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    expected = {p.name: p.read_bytes() for p in (tmp_path / "direct").iterdir()}
    out = world.member.home / f"split{len(split)}"
    r = world.member.run(world.client(*split, "-o", str(out), "--password-stdin"),
                         input=f"{world.member.password}\n".encode())
    assert r.returncode == 0, r.stderr
    got = {p.name: p.read_bytes() for p in out.iterdir()}
    assert got == expected and (len(got) > 1 or split[0] == "-P")
    assert all(p.stat().st_uid == world.member.pw.pw_uid for p in [out, *out.iterdir()])
    assert [stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]] == [
        0o700, *[0o600] * len(got)]
    a = world.audit_lines()[-1]
    assert a["bytes"] == sum(map(len, expected.values()))


def test_bad_filter_is_reported_as_a_direct_extraction_reports_it(world):
    b, e = world.window
    direct = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, "-f",
                             "tcp port", "-O"], capture_output=True, timeout=60)
    before = len(world.audit_lines()) if world.audit.exists() else 0
    r = world.member.run(world.client("-f", "tcp port", "-O", "--password-stdin"),
                         input=f"{world.member.password}\n".encode())
    assert r.returncode == direct.returncode == 2 and r.stdout == b""
    assert r.stderr == direct.stderr and r.stderr.startswith(b"npcapextract: error: bad filter")
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "error" and a["reason"].startswith("bad filter")


def test_list_and_summary_through_the_service(world):
    b, e = world.window
    direct = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, "-f", "tcp",
                             "-l"], capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0 and direct.stdout
    r = world.member.run(world.client("-f", "tcp", "-l", "--password-stdin"),
                         input=f"{world.member.password}\n".encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == direct.stdout
    r = world.member.run(world.client("-f", "tcp", "-o", "r.pcap", "-v", "--password-stdin"),
                         input=f"{world.member.password}\n".encode())
    assert r.returncode == 0
    summary = r.stderr.decode()
    assert summary.count("\n") == 1 and summary.startswith(
        f"npcapextract: through the extraction service as {world.member.name}: files considered")


def test_warnings_reach_the_client(world):
    idx = sorted(world.dumpset.glob("*/*.pcap.idx"))[0]
    aside = idx.with_name(idx.name + ".aside")
    idx.rename(aside)
    try:
        expected = world.direct("-f", "tcp")
        r = world.member.run(world.client("-f", "tcp", "-O", "--password-stdin"),
                             input=f"{world.member.password}\n".encode())
        assert r.returncode == 0 and r.stdout == expected
        name = idx.name.removesuffix(".idx")
        err = r.stderr.decode()
        assert err.count("\n") == 1 and err.startswith("npcapextract: warning: /")
        assert err.endswith(f"/{name}: no index; scanning the pcap sequentially\n")
    finally:
        aside.rename(idx)


def test_a_client_that_stops_reading_costs_the_service_nothing(world):
    before = len(world.audit_lines()) if world.audit.exists() else 0
    client = subprocess.Popen(world.client("-O", "--password-stdin"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              **world.member.popen_kw())
    client.stdin.write(f"{world.member.password}\n".encode())
    client.stdin.close()
    head = client.stdout.read(100)  # then hang up, as `| head -c 100` would
    client.stdout.close()
    assert client.wait(30) == 0 and client.stderr.read() == b""
    assert head[:4] == bytes.fromhex("4d3cb2a1")
    deadline = time.monotonic() + 10
    while len(world.audit_lines()) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] in ("allowed", "error")  # small results may be out before the hang-up
    if a["outcome"] == "error":
        assert a["reason"].startswith("the client stopped reading")


def test_wrong_password_gets_nothing_and_never_shows_in_the_process_list(world):
    wrong = "wrong-" + secrets.token_hex(8)
    out = world.member.home / "denied.pcap"
    before = len(world.audit_lines()) if world.audit.exists() else 0
    t0 = time.monotonic()
    p = subprocess.Popen(world.client("-o", str(out), "--password-stdin"),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         **world.member.popen_kw())
    p.stdin.write(f"{wrong}\n".encode())
    p.stdin.close()
    scans = 0
    while p.poll() is None:  # PAM and the failure delay keep the client waiting a while
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                for what in ("cmdline", "environ"):
                    try:
                        data = (proc / what).read_bytes()
                    except OSError:
                        continue
                    assert wrong.encode() not in data, f"password in /proc/{proc.name}/{what}"
        scans += 1
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    stdout, stderr = p.stdout.read(), p.stderr.read()
    assert scans >= 2
    assert p.returncode == 2
    assert stdout == b"" and not out.exists()
    assert stderr.decode().strip() == (
        f"npcapextract: error: authentication failed for {world.member.name}")
    assert elapsed >= FAIL_DELAY
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "denied" and a["pam_user"] == world.member.name
    assert "authentication failed" in a["reason"] and a["bytes"] == 0
    assert a["duration_s"] >= FAIL_DELAY
    assert wrong not in world.audit.read_text()


def test_user_outside_the_group_is_denied(world):
    out = world.outsider.home / "x.pcap"
    before = len(world.audit_lines()) if world.audit.exists() else 0
    r = world.outsider.run(world.client("-o", str(out), "--password-stdin"),
                           input=f"{world.outsider.password}\n".encode())
    assert r.returncode == 2 and r.stdout == b"" and not out.exists()
    assert r.stderr.decode().strip() == (
        f"npcapextract: error: {world.outsider.name} is not a member of the group "
        f"{world.group} whose members may extract")
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "denied" and a["pam_user"] == world.outsider.name
    assert a["duration_s"] >= FAIL_DELAY


def test_every_attempt_also_goes_to_syslog(world):
    """The audit file's line, word for word, at authpriv.info when allowed and
    authpriv.warning when denied: the priorities a log filter or SIEM rule keys on."""
    before = world.audit_count()
    ok = world.through_service(world.member, "-f", "tcp", "-o",
                               str(world.member.home / "logged.pcap"))
    assert ok.returncode == 0, ok.stderr
    denied = world.member.run(world.client("-o", str(world.member.home / "refused.pcap"),
                                           "--password-stdin"), input=b"not-the-password\n")
    assert denied.returncode == 2
    lines = world.audit.read_text().splitlines()[before:]
    assert [json.loads(line)["outcome"] for line in lines] == ["allowed", "denied"]
    assert world.syslog.wait_for("npcapextractd", lines) == [
        syslog.LOG_AUTHPRIV | syslog.LOG_INFO, syslog.LOG_AUTHPRIV | syslog.LOG_WARNING]


def test_a_client_started_without_stdout_keeps_the_pcap_out_of_the_services_socket(world):
    """`-O >&-`: the early connection to the service must not take fd 1 (the pcap went back
    into the service's connection, and the client died with a traceback)."""
    m = world.member
    b, e = world.window
    r = m.run(["bash", "-c", 'exec "$@" >&-', "_", *CLIENT, "-t", str(world.dumpset), "-b", b,
               "-e", e, "-O", "--password-stdin", "--service-socket",
               str(world.service.socket)], input=f"{m.password}\n".encode())
    assert r.returncode == 2
    assert r.stderr.decode() == (
        "npcapextract: error: cannot write the output: Bad file descriptor\n")


def test_only_served_dump_sets(world):
    other = world.base / "home-other"
    shutil.copytree(world.dumpset, other, symlinks=True)
    other.chmod(0o700)  # root's: the member cannot read it, and the service must not serve it
    try:
        b, e = world.window
        r = world.member.run([*CLIENT, "-t", str(other), "-b", b, "-e", e, "-O",
                              "--password-stdin", "--service-socket",
                              str(world.service.socket)],
                             input=f"{world.member.password}\n".encode())
        assert r.returncode == 2 and r.stdout == b""
        assert r.stderr.decode().strip() == (
            f"npcapextract: error: {other} is not a dump set this service serves")
    finally:
        shutil.rmtree(other)


def test_password_prompt_on_the_terminal_without_echo(world):
    out = world.member.home / "tty.pcap"
    master, slave = pty.openpty()
    os.chown(os.ttyname(slave), world.member.pw.pw_uid, -1)

    def controlling_tty() -> None:
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    p = subprocess.Popen(world.client("-f", "tcp", "-o", str(out), "--service"),
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         preexec_fn=controlling_tty, **world.member.popen_kw())
    os.close(slave)
    seen = b""
    sent = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        if not sent and b"Password for" in seen:
            os.write(master, f"{world.member.password}\n".encode())
            sent = True
        if p.poll() is not None and not ready:
            break
    os.close(master)
    assert p.wait(10) == 0, seen
    assert sent and world.member.password.encode() not in seen  # no echo
    assert out.read_bytes() == world.direct("-f", "tcp")


def restriction_warning(groups: str, allowed: str) -> bytes:
    return (f"npcapextract: warning: as a member of {groups} you may extract only packets "
            f"matching {allowed}\n").encode()


@pytest.mark.parametrize("user_filter, effective", [
    ("tcp", f"({NET_FILTER}) and (tcp)"),
    (None, NET_FILTER),
], ids=["own-filter", "no-filter"])
@pytest.mark.parametrize("fmt", [[], ["--pcapng"]], ids=["pcap", "pcapng"])
def test_restricted_member_gets_only_the_groups_selection(world, user_filter, effective, fmt):
    own = ["-f", user_filter] if user_filter else []
    expected = world.direct("-f", effective, *fmt)
    assert len(expected) > 1000
    assert expected != world.direct(*own, *fmt)  # the restriction takes something away
    before = world.audit_count()
    r = world.through_service(world.restricted, *own, *fmt, "-O")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    assert r.stderr == restriction_warning(world.net_group, NET_FILTER)
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "allowed" and a["pam_user"] == world.restricted.name
    assert a["filter"] == (user_filter or "")
    assert a["effective_filter"] == effective and a["restricted_by"] == [world.net_group]
    assert a["bytes"] == len(expected)


@pytest.mark.parametrize("attempt", [f"{NET_FILTER} or udp", f"{NET_FILTER} or not {NET_FILTER}"])
def test_allowed_prefix_or_more_does_not_widen_the_selection(world, attempt):
    """What a textual prefix check would let through selects nothing beyond the restriction."""
    expected = world.direct("-f", NET_FILTER)
    assert world.direct("-f", attempt) != expected  # directly, it would select more
    before = world.audit_count()
    r = world.through_service(world.restricted, "-f", attempt, "-O")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    (a,) = world.audit_lines()[before:]
    assert a["effective_filter"] == f"({NET_FILTER}) and ({attempt})"


def test_a_filter_that_closes_the_restrictions_parenthesis_is_refused(world):
    """`tcp) or (udp` would turn `(RESTRICTION) and (...)` into `... and (tcp) or (udp)`."""
    attempt = "tcp) or (udp"
    b, e = world.window
    direct = subprocess.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, "-f",
                             attempt, "-O"], capture_output=True, timeout=60)
    before = world.audit_count()
    r = world.through_service(world.restricted, "-f", attempt, "-O")
    assert r.returncode == direct.returncode == 2 and r.stdout == b""
    assert r.stderr == direct.stderr and r.stderr.startswith(b"npcapextract: error: bad filter")
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "error" and a["packets"] == a["bytes"] == 0


@pytest.mark.parametrize("user_filter", ["tcp or udp", None])
def test_several_restricted_groups_get_the_union(world, user_filter):
    union = f"({NET_FILTER}) or ({UDP_FILTER})"
    effective = f"({union}) and ({user_filter})" if user_filter else union
    expected = world.direct("-f", effective)
    # Wider than either group's selection alone, narrower than no restriction.
    assert expected not in (world.direct("-f", NET_FILTER), world.direct("-f", UDP_FILTER),
                            world.direct(*(["-f", user_filter] if user_filter else [])))
    before = world.audit_count()
    r = world.through_service(world.doubly_restricted,
                              *(["-f", user_filter] if user_filter else []), "-O")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    groups = f"{world.net_group}, {world.udp_group}"
    assert r.stderr == restriction_warning(groups, union)
    (a,) = world.audit_lines()[before:]
    assert a["effective_filter"] == effective
    assert a["restricted_by"] == [world.net_group, world.udp_group]


@pytest.mark.parametrize("user_filter, effective", [
    ("tcp", f"({NET_FILTER}) and (tcp)"),
    (None, NET_FILTER),
], ids=["own-filter", "no-filter"])
def test_list_mode_counts_only_the_restricted_selection(world, user_filter, effective):
    own = ["-f", user_filter] if user_filter else []
    expected = world.direct("-f", effective, "-l", "-v", to_stdout=False)  # files and counts
    assert expected and expected != world.direct(*own, "-l", "-v", to_stdout=False)
    r = world.through_service(world.restricted, *own, "-l", "-v")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected
    total = sum(int(line.split(b"\t")[1]) for line in expected.splitlines())
    assert f"matched {total}, written {total};".encode() in r.stderr
    # The summary of an extraction counts the restricted selection too, and nothing of what
    # was read outside it (packets and bytes read, files considered or skipped).
    r = world.through_service(world.restricted, *own, "-o", "r.pcap", "-v")
    assert r.returncode == 0, r.stderr
    assert f"matched {total}, written {total};".encode() in r.stderr
    for hidden in (b"read", b"files", b"skipped", b"scanned"):
        assert hidden not in r.stderr


@pytest.mark.parametrize("value, message", [
    ("{group}=tcp port", "group {group}: bad filter 'tcp port': can't parse filter expression"),
    ("{group}", "'{group}' is not GROUP=FILTER"),
    ("{group}=", "'{group}=' is not GROUP=FILTER"),
    ("=tcp", "'=tcp' is not GROUP=FILTER"),
    ("pvt-no-such-group=tcp", "no group named 'pvt-no-such-group'"),
], ids=["filter", "no-equals", "no-filter", "no-group", "unknown-group"])
def test_bad_group_filter_fails_the_start_in_one_line(world, value, message):
    value, message = value.format(group=world.group), message.format(group=world.group)
    r = subprocess.run([*service_entry(), "--group-filter", value], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"npcapextractd: error: Invalid value for '--group-filter': {message}")


def test_same_group_twice_fails_the_start(world):
    r = subprocess.run([*service_entry(), "--group-filter", f"{world.group}=tcp",
                        "--group-filter", f"{world.group}=udp"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"group '{world.group}' is given twice" in r.stderr


def test_misconfigured_service_tells_the_client_and_serves_nothing(world):
    log = world.base / "misconfigured.log"
    service = Service(world.base / "misconfigured.sock", log, [
        "-u", world.service_account, "--group", world.group, "--pam-service", world.pam_service,
        "--audit-log", str(world.audit), "--allow", str(world.dumpset),
        "--group-filter", f"{world.net_group}=tcp port",
    ]).start()
    try:
        before = world.audit_count()
        r = world.through_service(world.member, "-O", service=service)
    finally:
        service.stop()
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr == (b"npcapextract: error: the extraction service is misconfigured; "
                        b"ask the administrator\n")
    assert world.audit_count() == before  # refused before it opens the audit log
    text = log.read_text()  # systemd-socket-activate's own lines, and the instance's
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.startswith("npcapextractd")]
    assert lines == [f"npcapextractd: error: Invalid value for '--group-filter': group "
                     f"{world.net_group}: bad filter 'tcp port': can't parse filter expression: "
                     f"syntax error (see npcapextractd --help)"]


@pytest.mark.parametrize("payload, message", [
    (b"GET / HTTP/1.0\r\n\r\n", "malformed request: frame type b'G'"),
    (wire.FRAME.pack(b"Q", 9) + b"not json!", "malformed request: not a UTF-8 JSON object"),
    (wire.FRAME.pack(b"Q", 2) + b"[]", "malformed request: not a JSON object"),
    (request(begin_ns="yesterday"), "malformed request: begin_ns must be an integer"),
    (request(pcapng=1), "malformed request: pcapng must be true or false"),
    (request(dumpsets=["relative/ds"]), "malformed request: dumpsets must hold absolute paths"),
    (request(begin_ns=10, end_ns=5), "malformed request: begin_ns after end_ns"),
    (request(shell="rm -rf /"), "malformed request: unknown field 'shell'"),
    (request(version=99), "unsupported request version 99"),
    (request(password="x" * 2000), "malformed request: password is longer than 1024 bytes"),
    (wire.FRAME.pack(b"Q", 100) + b"{", "the connection ended in the middle of the request"),
    (wire.FRAME.pack(b"Q", 30000) + b"[" * 30000, "malformed request: nested too deeply"),
    (request(password="\ud800"), "malformed request: password is not valid Unicode text"),
    (request(filter="tcp \udfff"), "malformed request: filter is not valid Unicode text"),
    (request(dumpsets=["/ds\ud800"]),
     "malformed request: dumpsets holds a path that is not valid Unicode text"),
], ids=["http", "json", "list", "type", "bool", "relative", "window", "unknown", "version",
        "password", "truncated", "nested", "surrogate-password", "surrogate-filter",
        "surrogate-path"])
def test_malformed_request_gets_an_error_reply(world, payload, message):
    before = len(world.audit_lines()) if world.audit.exists() else 0
    frames, _ = raw_exchange(world, payload)
    assert len(frames) == 1, frames  # one error reply, never data
    kind, reply = frames[0]
    assert kind == b"R" and reply["status"] == "error"
    assert reply["message"].startswith(message), reply
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "rejected" and a["reason"].startswith(message)


def test_oversized_request_is_refused_from_its_header(world):
    before = len(world.audit_lines()) if world.audit.exists() else 0
    frames, _ = raw_exchange(world, wire.FRAME.pack(b"Q", 1 << 40))
    assert [k for k, _ in frames] == [b"R"]
    assert frames[0][1]["message"] == (
        f"request too large: {1 << 40} bytes (limit {wire.MAX_REQUEST})")
    # Really sending it changes nothing: the body is never read.
    body = b"{" + b" " * (wire.MAX_REQUEST + 10) + b"}"
    frames, _ = raw_exchange(world, wire.FRAME.pack(b"Q", len(body)) + body)
    assert [k for k, _ in frames] == [b"R"]
    assert frames[0][1]["message"].startswith("request too large")
    lines = world.audit_lines()[before:]
    assert [a["outcome"] for a in lines] == ["rejected", "rejected"]


def test_attempts_per_connection_are_limited(world):
    """Two attempts (--max-attempts 2), each slowed down, then the service hangs up."""
    before = len(world.audit_lines()) if world.audit.exists() else 0
    attempt = request(password="not-roots-password", dumpsets=[str(world.dumpset)])
    t0 = time.monotonic()
    frames, _ = raw_exchange(world, attempt * 3)
    elapsed = time.monotonic() - t0
    assert [k for k, _ in frames] == [b"R", b"R"]
    assert [f[1]["status"] for f in frames] == ["denied", "denied"]
    assert [f[1]["retry"] for f in frames] == [True, False]
    assert "no more on this connection" in frames[1][1]["message"]
    assert elapsed >= 2 * FAIL_DELAY
    lines = world.audit_lines()[before:]
    assert [(a["outcome"], a["attempt"], a["peer_uid"]) for a in lines] == [
        ("denied", 1, 0), ("denied", 2, 0)]


def test_a_client_that_says_nothing_is_not_an_attempt(world):
    before = len(world.audit_lines()) if world.audit.exists() else 0
    frames, data = raw_exchange(world, b"")
    assert data == b""
    assert len(world.audit_lines()) == before


def test_sigterm_ends_the_instance_with_an_answer_and_an_audit_line(world):
    before = len(world.audit_lines()) if world.audit.exists() else 0
    sa = world.service.proc.pid
    children = Path(f"/proc/{sa}/task/{sa}/children")
    earlier = set(children.read_text().split())  # instances of earlier tests still finishing
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(world.service.socket))
    deadline = time.monotonic() + 10
    while not set(children.read_text().split()) - earlier and time.monotonic() < deadline:
        time.sleep(0.02)
    new = set(children.read_text().split()) - earlier
    (pid,) = map(int, new)
    time.sleep(0.3)  # let it reach the read of the request
    os.kill(pid, 15)
    kind, length = wire.FRAME.unpack(s.recv(wire.FRAME.size, socket.MSG_WAITALL))
    reply = json.loads(s.recv(length, socket.MSG_WAITALL))
    s.close()
    assert kind == b"R" and reply == {"status": "error",
                                      "message": "the extraction service was stopped"}
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "error" and a["reason"] == "stopped by SIGTERM"


def test_audit_log_is_not_writable_by_clients(world):
    st = world.audit.stat()
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o640
    for user in (world.member, world.outsider):
        r = user.run([sys.executable, "-c", "import os, sys; print(os.access(sys.argv[1], "
                      "os.W_OK) or os.access(sys.argv[1], os.R_OK))", str(world.audit)])
        assert r.stdout.strip() == b"False"


def test_entry_point_outside_socket_activation_fails_in_one_line():
    r = subprocess.run([*service_entry(), "--audit-log", "/nonexistent/a.jsonl"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        "npcapextractd: error: not started by socket activation")


def test_units_and_setup_ship_the_service():
    socket_unit = (ROOT / "systemd" / "npcapextract.socket").read_text()
    service_unit = (ROOT / "systemd" / "npcapextract@.service").read_text()
    assert "Accept=yes" in socket_unit and f"ListenStream={prestart.SOCKET}" in socket_unit
    assert "ExecStart=/usr/local/bin/npcapextractd" in service_unit
    setup = (ROOT / "setup.sh").read_text()
    # Every unit of systemd/ is installed; the socket is enabled, the PAM file installed and
    # the entry point linked into /usr/local/bin.
    assert "systemd/*.service systemd/*.socket" in setup
    for needed in ("enable --now npcapextract.socket", "pam.d/npcapextract", "npcapextractd"):
        assert needed in setup, needed
    tmpfiles = (ROOT / "systemd" / "tmpfiles.d" / "pcapvault.conf").read_text()
    assert "/var/log/pcapvault/audit.jsonl 0640 root" in tmpfiles


def test_client_refuses_a_socket_not_served_by_root():
    """A password goes only to a listener that root (systemd) set up."""
    d = Path(tempfile.mkdtemp(prefix="pv-fake-", dir="/tmp"))
    d.chmod(0o777)
    path = d / "impostor.sock"
    pid = os.fork()
    if pid == 0:  # an impostor listening as nobody
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(path) + ".tmp")
            s.listen()
            os.rename(str(path) + ".tmp", path)  # connectable once visible
            s.accept()
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        r = subprocess.run([*CLIENT, "-t", "/nonexistent", "-b", "-1h", "-e", "now", "-O",
                            "--service", "--service-socket", str(path),
                            "--password-stdin"], input=b"secret\n", capture_output=True)
        assert r.returncode == 2
        assert b"it is served by uid 65534, not by root" in r.stderr
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        shutil.rmtree(d)


def flows(world, user, *args: str) -> subprocess.CompletedProcess:
    """npcapflows run by `user`, who types the right password (the service chosen by
    itself: the dump set is unreadable to them)."""
    b, e = world.window
    return user.run([sys.executable, "-m", "pcapvault.extract.npcapflows", "-t",
                     str(world.dumpset), "-b", b, "-e", e, "--service-socket",
                     str(world.service.socket), "--password-stdin", *args],
                    input=f"{user.password}\n".encode())


def table_of(world, expr: str, by: str) -> dict:
    """The table root computes directly over the dump set."""
    from pcapvault.extract.conversations import conversations
    from pcapvault.extract.request import Request
    from pcapvault.index.times import parse_window

    t = conversations(Request([str(world.dumpset)], *parse_window(*world.window), expr), by)
    return {"rows": t.rows, "total_rows": t.total_rows, "packets": t.packets, "bytes": t.bytes}


@pytest.mark.parametrize("by, expr", [("conversation", ""), ("port", "tcp or udp")])
def test_flows_through_the_service(world, by, expr):
    """npcapflows for a member who cannot read the dump set: the table root computes, from
    the service, audited as a table of the window."""
    want = table_of(world, expr, by)
    assert want["total_rows"] > 3
    before = world.audit_count()
    r = flows(world, world.member, "--by", by, "-f", expr, "-n", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    got = json.loads(r.stdout)
    assert {k: got[k] for k in want} == want
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "allowed" and a["pam_user"] == world.member.name
    assert a["options"]["table"] == by and (a["packets"], a["bytes"]) == (
        want["packets"], want["bytes"])


def test_restricted_member_flows_hold_only_the_groups_traffic(world):
    want = table_of(world, NET_FILTER, "endpoint")
    assert want["packets"] < table_of(world, "", "endpoint")["packets"]
    r = flows(world, world.restricted, "--by", "endpoint", "-n", "0", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {k: got[k] for k in want} == want
    assert r.stderr == (f"npcapflows: warning: as a member of {world.net_group} your tables "
                        f"hold only packets matching {NET_FILTER}\n").encode()


def test_flows_of_a_user_outside_the_group_are_denied(world):
    before = world.audit_count()
    r = flows(world, world.outsider)
    assert r.returncode == 1 and r.stdout == b""
    assert b"not a member of the group" in r.stderr and r.stderr.count(b"\n") == 1
    (a,) = world.audit_lines()[before:]
    assert a["outcome"] == "denied"


def test_flows_of_a_dump_set_the_service_does_not_serve_are_refused(world):
    """A table asked through a link the member controls, leading to a dump set the service
    does not serve: refused as an extraction would be, nothing of it sent, audited."""
    other = world.base / "home-other-flows"
    shutil.copytree(world.dumpset, other, symlinks=True)
    other.chmod(0o700)
    link = world.member.home / "to-other"
    link.symlink_to(other)
    try:
        before = world.audit_count()
        b, e = world.window
        r = world.member.run([sys.executable, "-m", "pcapvault.extract.npcapflows", "-t",
                              str(link), "-b", b, "-e", e, "--service-socket",
                              str(world.service.socket), "--password-stdin", "--json"],
                             input=f"{world.member.password}\n".encode())
        assert r.returncode != 0 and r.stdout == b""
        assert r.stderr.count(b"\n") == 1 and b"not a dump set this service serves" in r.stderr
        (a,) = world.audit_lines()[before:]
        assert a["outcome"] == "denied" and a["options"]["table"] == "conversation"
    finally:
        link.unlink()
        shutil.rmtree(other)
