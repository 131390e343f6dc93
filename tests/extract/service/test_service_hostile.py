"""The extraction service against a hostile member of the extractors' group: a raw client
that speaks the framing directly (tests/rawclient.py, run as that user), paths and symbolic
links the member controls, dump sets the member built, requests that trickle, filters that
take minutes to compile, clients that leave. Real PAM and the real service (pamworld.py).

Besides the module's dump set (`world.dumpset`, not served here) the `hostile` fixture lays
out, under a directory the service is started with as --allow:
  allowed/x/y     plain directories, for `..` after a link
  allowed/sec     the service account's, empty: what `.../y/../../sec` names for root
  allowed/drop    world-writable (an administrator's mistake): where a member builds one
and, outside --allow, `secret`: a copy of the dump set the member must never get.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from extract_helpers import build_dumpset, flip_caplen, records, synthetic_traffic
from pamworld import CLIENT, FAIL_DELAY, PAM_MARKS, Service, World, raw_client

pytestmark = PAM_MARKS

CPU_LIMIT = 1.0
TIMEOUT = 3.0
STALL = 1.5
# libpcap's optimiser takes about 15 s of CPU on this one here, its parser about 2 s.
COSTLY_FILTER = " or ".join(f"port {i}" for i in range(1, 401))


@dataclass
class Hostile:
    allowed: Path
    secret: Path
    drop: Path
    service: Service  # --allow allowed and the world's dump set, --timeout TIMEOUT,
    # --filter-cpu-limit CPU_LIMIT, --stall-timeout STALL
    patient: Service  # the same with no practical CPU limit


def _service(world: World, name: str, allowed: Path, cpu: float, *more: str) -> Service:
    return Service(world.base / f"{name}.sock", world.base / f"{name}.log", [
        "-u", world.service_account, "--group", world.group, "--pam-service", world.pam_service,
        "--audit-log", str(world.audit), "--allow", str(allowed), "--allow",
        str(world.dumpset), "--fail-delay",
        str(FAIL_DELAY), "--timeout", str(TIMEOUT), "--filter-cpu-limit", str(cpu),
        "--group-filter", f"{world.net_group}=net 10.0.0.0/16", *more,
    ]).start()


@pytest.fixture(scope="module")
def hostile(world: World):
    svc = world.dumpset.stat().st_uid
    allowed = world.base / "allowed"
    (allowed / "x" / "y").mkdir(parents=True)
    (allowed / "sec").mkdir()
    os.chown(allowed / "sec", svc, svc)
    drop = allowed / "drop"
    drop.mkdir()
    drop.chmod(0o1777)
    secret = world.base / "secret"
    subprocess.run(["cp", "-a", str(world.dumpset), str(secret)], check=True)
    services = [_service(world, "hostile", allowed, CPU_LIMIT, "--stall-timeout", str(STALL)),
                _service(world, "patient", allowed, 3600)]
    try:
        yield Hostile(allowed, secret, drop, *services)
        for s in services:
            assert "Traceback" not in s.log.read_text()
    finally:
        for s in services:
            s.stop()


def window(world: World) -> dict:
    b, e = (int(t) * 1_000_000_000 for t in world.window)
    return {"begin_ns": b, "end_ns": e}


def last_audit(world: World, before: int, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while world.audit_count() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = world.audit_lines()[before:]
    assert len(lines) == 1, lines
    return lines[0]


def refused(result: dict) -> bool:
    """Nothing but a refusal came back: no `ok`, no pcap bytes."""
    return result["data_bytes"] == 0 and all(r["status"] != "ok" for r in result["replies"])


@pytest.fixture
def open_home(world: World):
    """The member's home searchable by others, as most homes are: the service account could
    follow the member's links."""
    world.member.home.chmod(0o711)
    yield
    world.member.home.chmod(0o700)


def test_a_path_root_and_the_service_account_would_resolve_apart_is_opened_once(world, hostile,
                                                                               open_home):
    """The reproduction: root may search D, the account may not; `D/L/../../sec` is
    allowed/sec for root and, were it resolved again by the account, the secret dump set."""
    m = world.member
    att = m.home / "att"
    (att / "D").mkdir(parents=True)
    for p in (att, att / "D"):
        os.chown(p, m.pw.pw_uid, m.pw.pw_gid)
    att.chmod(0o755)
    (att / "D").chmod(0o700)
    (att / "D" / "L").symlink_to(hostile.allowed / "x" / "y")
    (att / "sec").symlink_to(hostile.secret)
    asked = f"{att}/D/L/../../sec"
    before = world.audit_count()
    (r,) = raw_client(m, hostile.service, payload={"dumpsets": [asked], **window(world)})
    assert refused(r), r
    assert "is not a pcapvault dump set" in r["replies"][0]["message"]
    a = last_audit(world, before)
    assert a["outcome"] == "error" and a["packets"] == 0
    assert a["dumpsets"] == [asked] and a["resolved"] == [str(hostile.allowed / "sec")]
    assert "/proc/self/fd" not in a["reason"]


def test_a_link_flipped_between_checks_never_serves_another_dump_set(world, hostile, open_home):
    """The member swaps a link between an allowed directory and the secret dump set as fast
    as it can while asking for it again and again."""
    link = world.member.home / "flip"
    targets = [hostile.allowed / "sec", hostile.secret]
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            tmp = link.with_name(f".flip{i % 2}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(targets[i % 2])
            os.replace(tmp, link)
            i += 1

    t = threading.Thread(target=flip, daemon=True)
    before = world.audit_count()
    both = {(str(hostile.allowed / "sec"),), (str(hostile.secret),)}
    results: list = []
    t.start()
    try:
        # Rounds of 4 s until the race has run both ways (on a loaded machine one round may
        # meet one target only), at most five.
        for _ in range(5):
            results += raw_client(world.member, hostile.service, repeat_seconds=4,
                                  payload={"dumpsets": [str(link)], **window(world)})
            lines = world.audit_lines()[before:]
            if len(results) >= 5 and {tuple(a["resolved"]) for a in lines} == both:
                break
    finally:
        stop.set()
        t.join()
    assert len(results) >= 5
    assert all(refused(r) for r in results), [r for r in results if not refused(r)]
    lines = world.audit_lines()[before:]
    assert len(lines) == len(results)
    assert {a["outcome"] for a in lines} <= {"denied", "error"}
    # Both targets were met: the race really ran both ways.
    assert {tuple(a["resolved"]) for a in lines} == both


@pytest.mark.parametrize("with_index", [True, False], ids=["hand-made-index", "no-index"])
def test_a_dump_set_a_member_built_is_refused(world, hostile, with_index):
    """A dump set in a directory the member may write, whose pcap is a link to a recorded
    file: its index would be trusted, so it must not be read at all."""
    m = world.member
    evil = hostile.drop / f"evil-{with_index}"
    start = int(world.window[0]) * 1_000_000_000 + 600 * 1_000_000_000
    build_dumpset(evil, synthetic_traffic(1, start, seed=3, span_s=1.0))
    (pcap,) = evil.glob("*/*.pcap")
    recorded = sorted(world.dumpset.glob("*/*.pcap"))[0]
    pcap.unlink()
    pcap.symlink_to(recorded)
    if not with_index:
        pcap.with_name(pcap.name + ".idx").unlink()
    subprocess.run(["chown", "-hR", f"{m.pw.pw_uid}:{m.pw.pw_gid}", str(evil)], check=True)
    before = world.audit_count()
    (r,) = raw_client(m, hostile.service, payload={"dumpsets": [str(evil)], **window(world)})
    assert refused(r), r
    assert r["replies"][0]["message"] == f"{evil} is not a dump set this service serves"
    a = last_audit(world, before)
    assert a["outcome"] == "denied" and a["resolved"] == [str(evil)]
    assert f"belongs to uid {m.pw.pw_uid}, not to the service account" in a["reason"]


def test_a_refused_path_tells_a_member_nothing_root_alone_could_see(world, hostile):
    """The service resolves a client's path as root: whether a name exists in a directory
    the member may not search, or where a link there leads, is said in the audit only."""
    private = world.base / "private"
    (private / "hidden-dir-name").mkdir(parents=True)
    (private / "secret-file.key").write_text("x")
    (private / "link").symlink_to(private / "hidden-dir-name")
    private.chmod(0o700)
    try:
        for name in ("secret-file.key", "nosuch.key", "link"):
            asked = str(private / name)
            before = world.audit_count()
            (r,) = raw_client(world.member, hostile.service,
                              payload={"dumpsets": [asked], **window(world)})
            assert refused(r)
            assert r["replies"][0]["message"] == f"{asked} is not a dump set this service serves"
            assert last_audit(world, before)["reason"] != r["replies"][0]["message"]
    finally:
        shutil.rmtree(private)


@pytest.mark.parametrize("damage", ["link-outside", "foreign-pcap", "foreign-index", "fifo"])
def test_every_file_the_timeline_names_is_checked(world, hostile, damage):
    """The service account's own dump set with one file that is not what it should be
    (a storage directory writable by others, a link made by hand): the request is refused
    before a byte is sent, and the audit says which file and why."""
    ds = hostile.allowed / f"copy-{damage}"
    subprocess.run(["cp", "-a", str(world.dumpset), str(ds)], check=True)
    try:
        link = sorted((ds / "timeline").rglob("*.pcap"))[0]
        real = link.resolve()
        m = world.member
        if damage == "link-outside":
            link.unlink()
            link.symlink_to(hostile.secret / real.relative_to(ds))
            why = f"{link} leads to {hostile.secret / real.relative_to(ds)}, outside the dump set"
        elif damage == "foreign-pcap":
            os.chown(real, m.pw.pw_uid, -1)
            why = f"belongs to uid {m.pw.pw_uid}, not to the service account"
        elif damage == "foreign-index":
            os.chown(real.with_name(real.name + ".idx"), m.pw.pw_uid, -1)
            why = f"{real}.idx belongs to uid {m.pw.pw_uid}, not to the service account"
        else:
            st = real.stat()
            real.unlink()
            os.mkfifo(real, 0o640)
            os.chown(real, st.st_uid, st.st_gid)
            why = f"{link} is not a regular file"
        before = world.audit_count()
        b, e = world.window
        r = m.run([*CLIENT, "-t", str(ds), "-b", b, "-e", e, "-O", "--password-stdin",
                   "--service-socket", str(hostile.service.socket)],
                  input=f"{m.password}\n".encode())
        assert r.returncode == 2 and r.stdout == b"", r.stderr
        assert why in r.stderr.decode() and "/proc/self/fd" not in r.stderr.decode()
        a = last_audit(world, before)
        assert a["outcome"] == "denied" and why in a["reason"]
        assert a["packets"] == a["bytes"] == 0
    finally:
        shutil.rmtree(ds)


def test_the_request_deadline_covers_the_whole_request(world, hostile):
    """One byte every half second: each read is quick, the request never ends."""
    before = world.audit_count()
    (r,) = raw_client(world.member, hostile.service, trickle_every=0.5,
                      payload={"dumpsets": [str(world.dumpset)], **window(world)})
    assert [x["message"] for x in r["replies"]] == [f"no complete request within {TIMEOUT:g} s"]
    assert r["elapsed"] < TIMEOUT + 2.5
    a = last_audit(world, before)
    assert a["outcome"] == "rejected" and a["reason"].startswith("no complete request")


def test_a_filter_too_costly_to_compile_is_refused_at_the_cpu_limit(world, hostile):
    m = world.member
    before = world.audit_count()
    b, e = world.window
    t0 = time.monotonic()
    r = m.run([*CLIENT, "-t", str(world.dumpset), "-b", b, "-e", e, "-O", "--password-stdin",
               "-f", COSTLY_FILTER, "--service-socket", str(hostile.service.socket)],
              input=f"{m.password}\n".encode())
    elapsed = time.monotonic() - t0
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode() == (
        f"npcapextract: error: the filter takes more than {CPU_LIMIT:g} s of CPU time to "
        "compile here; shorten it (fewer terms, or ranges such as portrange and net instead "
        "of long or-lists)\n")
    assert elapsed < CPU_LIMIT + 4
    a = last_audit(world, before)
    assert a["outcome"] == "error" and a["cpu_s"] < CPU_LIMIT + 1.5


def instances(service: Service) -> set[int]:
    pid = service.proc.pid
    return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


def test_a_client_that_hangs_up_during_compilation_stops_the_work(world, hostile):
    """With no practical CPU limit, the instance still ends within a second of the hang-up."""
    earlier = instances(hostile.patient)
    before = world.audit_count()
    (r,) = raw_client(world.member, hostile.patient, close_after_send=True, wait_after_send=1.5,
                      payload={"dumpsets": [str(world.dumpset)], "filter": COSTLY_FILTER,
                               **window(world)})
    hung_up = time.monotonic()
    assert r["closed"]
    while instances(hostile.patient) - earlier and time.monotonic() < hung_up + 5:
        time.sleep(0.02)
    assert not instances(hostile.patient) - earlier
    assert time.monotonic() - hung_up < 1.0
    a = last_audit(world, before)
    assert a["outcome"] == "error" and a["reason"] == "the client hung up; work stopped"


@pytest.mark.parametrize("ask", [{"table": "conversation"}, {}])
def test_a_result_nobody_reads_frees_the_instance_after_the_stall_timeout(world, hostile, ask):
    """A table (or pcap) larger than the socket's buffer, and a member who never reads it:
    the instance ends at --stall-timeout, audited as incomplete, not when the client goes."""
    dumpsets = [str(world.dumpset)] * 16  # a result larger than the socket's buffer
    before = world.audit_count()
    (r,) = raw_client(world.member, hostile.service, hold_for=STALL + 4,
                      payload={"dumpsets": dumpsets, **ask, **window(world)})
    a = last_audit(world, before, timeout=0)  # written while the client still held on
    assert a["outcome"] == "error"
    assert a["reason"] == "the client stopped reading; result incomplete"
    assert r["trailer"] is None


def test_a_list_whose_client_left_is_not_audited_as_given(world, hostile):
    before = world.audit_count()
    raw_client(world.member, hostile.service, close_after_send=True,
               payload={"dumpsets": [str(world.dumpset)], "list_only": True, **window(world)})
    a = last_audit(world, before)
    assert a["outcome"] == "error"


def test_the_failure_delay_runs_from_the_request_not_the_connection(world, hostile):
    """A client that waits before asking must not learn at once that it is refused."""
    (r,) = raw_client(world.outsider, hostile.service, wait_before_send=2 * FAIL_DELAY + 0.5,
                      payload={"dumpsets": [str(world.dumpset)], **window(world)})
    assert [x["status"] for x in r["replies"]] == ["denied"]
    assert "is not a member of the group" in r["replies"][0]["message"]
    assert r["after_send"] >= FAIL_DELAY


def test_a_client_that_keeps_sending_after_a_bad_header_still_reads_the_error(world, hostile):
    before = world.audit_count()
    (r,) = raw_client(world.member, hostile.service, raw="GET / HTTP/1.0\r\n\r\n",
                      garbage_for=0.5)
    assert r["error"] is None, r
    assert [x["message"] for x in r["replies"]] == [
        "malformed request: frame type b'G', expected b'Q'"]
    assert last_audit(world, before)["outcome"] == "rejected"


@pytest.mark.parametrize("member", ["member", "restricted"])
def test_a_result_damage_left_incomplete_exits_3_through_the_service(world, hostile, member):
    """A record whose stored header disagrees with its index is left out, as in a direct
    extraction, and the client's exit status says the result is incomplete (a restricted
    member learns that, not how much was read)."""
    user = getattr(world, member)
    ds = hostile.allowed / f"damaged-{member}"
    subprocess.run(["cp", "-a", str(world.dumpset), str(ds)], check=True)
    try:
        pcap = sorted(p for p in ds.glob("*/*.pcap"))[0]
        data = pcap.read_bytes()
        # A record inside the restriction (IPv4 from or to 10.0.0.0/16), so that both members
        # would have been given it.
        k = next(i for i, at in enumerate(records(pcap))
                 if data[at + 28 : at + 30] == b"\x08\x00"
                 and b"\x0a\x00" in (data[at + 42 : at + 44], data[at + 46 : at + 48]))
        flip_caplen(pcap, k)
        b, e = world.window
        direct = subprocess.run([*CLIENT, "-t", str(ds), "-b", b, "-e", e, "-O"],
                                capture_output=True, timeout=60)
        assert direct.returncode == 3
        r = user.run([*CLIENT, "-t", str(ds), "-b", b, "-e", e, "-O", "--password-stdin",
                      "--service-socket", str(hostile.service.socket)],
                     input=f"{user.password}\n".encode())
        assert r.returncode == 3, r.stderr
        assert len(r.stdout) > 1000
        if member == "member":
            assert r.stdout == direct.stdout
    finally:
        shutil.rmtree(ds)
