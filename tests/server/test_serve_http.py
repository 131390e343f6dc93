"""npcapserve as its unit runs it: TLS, real PAM users, real group filters, tokens, audit.

The pcap equals npcapextract's bytes; conversations and endpoints equal tshark's tables over
the packets the API returns; volume sums equal the same extraction's packets and bytes."""

from __future__ import annotations

import pwd
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
from extract_helpers import build_dumpset, read_pcap_records, synthetic_traffic
from pamworld import CLIENT, NET_FILTER, PAM_MARKS, UDP_FILTER
from prometheus_client.parser import text_string_to_metric_families
from recorderproc import RecorderProc, synthetic_pcap
from serveworld import serving

from pcapvault.index.privileges import give_tree

pytestmark = PAM_MARKS


@pytest.fixture(scope="module")
def second(world) -> Path:
    """A second dump set (another interface) of the service account, in the same window."""
    root = world.base / "ds2"
    now = int(world.window[0]) + 3600
    build_dumpset(root, synthetic_traffic(800, (now - 30) * 10**9, seed=8, span_s=20),
                  per_file=200, interface="eth9")
    give_tree(root, pwd.getpwnam(world.service_account))
    return root


@pytest.fixture(scope="module")
def served(world, second):
    with serving(world, [world.dumpset, second]) as s:
        yield s


def window(world, **params: str) -> dict[str, str]:
    b, e = world.window
    return {"begin": b, "end": e, **params}


def direct(world, roots: list[Path], *args: str) -> bytes:
    """npcapextract over the same dump sets and window (as root, who may read them)."""
    b, e = world.window
    r = subprocess.run([*CLIENT, *[a for d in roots for a in ("-t", str(d))], "-b", b, "-e", e,
                        "-0", "-O", *args], capture_output=True, timeout=120)
    assert r.returncode in (0, 1), r.stderr
    return r.stdout


def last_audit(world, n: int = 1) -> list[dict]:
    return world.audit_lines()[-n:]


@pytest.mark.parametrize("expr", ["", "tcp", "udp port 53", "host 10.0.1.3", "vlan"])
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_pcap_is_npcapextracts_bytes(world, second, served, expr, fmt):
    with served.client(world.member) as c:
        r = c.get("/api/v1/pcap", params=window(world, filter=expr, format=fmt))
    assert r.status_code == 200, r.text
    want = direct(world, [world.dumpset, second], "-f", expr,
                  *(["--pcapng"] if fmt == "pcapng" else []))
    assert r.content == want
    name = re.fullmatch(r'attachment; filename="pcapvault-\d{8}T\d{6}Z-\d{8}T\d{6}Z\.(\w+)"',
                        r.headers["content-disposition"])
    assert name and name.group(1) == fmt
    line = last_audit(world)[0]
    assert line["endpoint"] == "pcap" and line["outcome"] == "allowed"
    assert line["pam_user"] == world.member.name and line["method"] == "password"
    assert line["bytes"] == len(want) and line["filter"] == expr


def test_pcap_of_one_dump_set_snaplen_and_no_match(world):
    with serving(world) as s, s.client(world.member) as c:
        r = c.get("/api/v1/pcap", params=window(world, filter="tcp", snaplen="60"))
        assert r.status_code == 200
        assert r.content == direct(world, [world.dumpset], "-f", "tcp", "-s", "60")
        r = c.get("/api/v1/pcap", params=window(world, filter="host 203.0.113.77"))
        assert r.status_code == 200 and len(r.content) == 24
        assert r.content == direct(world, [world.dumpset], "-f", "host 203.0.113.77")


def test_refusals_are_json_and_audited(world, served):
    before = world.audit_count()
    with served.client() as c:
        r = c.get("/api/v1/pcap", params=window(world))
        assert r.status_code == 401 and r.json()["error"]
        assert r.headers["www-authenticate"] == 'Basic realm="pcapvault"'
    with served.client(world.member, password="wrong") as c:
        r = c.get("/api/v1/conversations", params=window(world))
        assert r.status_code == 401
    with served.client(world.outsider) as c:
        r = c.get("/api/v1/volume", params=window(world))
        assert r.status_code == 403 and world.group in r.json()["error"]
    lines = world.audit_lines()[before:]
    assert [(x["endpoint"], x["outcome"]) for x in lines] == [
        ("pcap", "denied"), ("conversations", "denied"), ("volume", "denied")]
    assert lines[1]["pam_user"] == world.member.name and lines[2]["pam_user"] == \
        world.outsider.name
    assert all("wrong" not in str(x) for x in lines)


@pytest.mark.parametrize("params, needle", [
    ({"filter": "tcp port"}, "bad filter"),
    ({"filter": "tcp\0udp"}, "NUL"),
    ({"filter": "\0"}, "NUL"),
    ({"begin": "yesterday"}, "yesterday"),
    ({"format": "erf"}, "format"),
    ({"snaplen": "0"}, "snaplen"),
])
def test_bad_parameters_are_400(world, served, params, needle):
    with served.client(world.member) as c:
        r = c.get("/api/v1/pcap", params={**window(world), **params})
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert "Traceback" not in r.text
    assert last_audit(world)[0]["outcome"] == "error"


def test_a_nul_in_a_filter_is_400_everywhere(world, served):
    """libpcap would read `tcp\0udp` as `tcp` and `\0` as everything."""
    with served.client(world.member) as c:
        for path in ("/api/v1/conversations", "/api/v1/volume"):
            r = c.get(path, params=window(world, filter="\0"))
            assert r.status_code == 400 and "NUL" in r.json()["error"], r.text
        r = c.get("/api/v1/filter", params={"expr": "\0"})
        assert r.status_code == 400 and "NUL" in r.json()["error"], r.text
    with served.client(world.restricted) as c:
        r = c.get("/api/v1/pcap", params=window(world, filter="tcp\0udp"))
        assert r.status_code == 400 and "NUL" in r.json()["error"], r.text


def test_bounds_on_rows_steps_and_query(world, served):
    with served.client(world.member) as c:
        r = c.get("/api/v1/conversations", params=window(world, limit="10001"))
        assert r.status_code == 400 and "limit" in r.json()["error"]
        r = c.get("/api/v1/volume", params=window(world, step="0.01s"))
        assert r.status_code == 400 and "steps" in r.json()["error"]
        # a float of 400 nines is inf (once a 500); 2**63 ns passed the count of steps
        # (one) and overflowed in the worker
        for step in ("9" * 400, "9" * 400 + "d", str(2**63 // 10**9 + 1), "106752d"):
            r = c.get("/api/v1/volume", params=window(world, step=step))
            assert r.status_code == 400 and "at most" in r.json()["error"], (step, r.text)
        r = c.get("/api/v1/pcap", params=window(world, filter="tcp or " * 2000 + "tcp"))
        assert r.status_code == 414
        r = c.get("/api/v1/nothing")
        assert r.status_code == 404 and r.json()["error"]


def test_costly_filter_is_400_and_the_server_goes_on(world, served):
    # About 8 s of CPU to compile here (cubic in the terms), in 7.4 KB of query string: far
    # past the limit (2 s; RLIMIT_CPU counts whole seconds, so up to 3 s pass), where 180
    # terms (about 3 to 4 s) once passed in a full run.
    costly = " or ".join(f"host 10.{i // 200}.{i % 200}.1 and port {i}" for i in range(240))
    with served.client(world.member) as c:
        t0 = time.monotonic()
        r = c.get("/api/v1/pcap", params=window(world, filter=costly))
        assert r.status_code == 400 and "CPU time" in r.json()["error"]
        assert time.monotonic() - t0 < 15
        assert c.get("/api/v1/pcap", params=window(world, filter="icmp")).status_code == 200


def tshark_conv(pcap: Path, proto: str) -> dict:
    """{frozenset of endpoints: {(src, dst): (frames, bytes)}} from tshark -z conv,PROTO."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-q", "-z", f"conv,{proto}"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+<->\s+(\S+)\s+(\d+) (\d+) bytes\s+(\d+) (\d+) bytes", line)
        if m:
            a, b = m.group(1), m.group(2)
            found[frozenset((a, b))] = {(b, a): (int(m.group(3)), int(m.group(4))),
                                        (a, b): (int(m.group(5)), int(m.group(6)))}
    return found


def api_conv(rows: list[dict], proto: str) -> dict:
    found = {}
    for r in rows:
        if r["protocol"] != proto:
            continue
        a, b = f"{r['address_a']}:{r['port_a']}", f"{r['address_b']}:{r['port_b']}"
        found[frozenset((a, b))] = {(a, b): (r["packets_a_to_b"], r["bytes_a_to_b"]),
                                    (b, a): (r["packets_b_to_a"], r["bytes_b_to_a"])}
    return found


def tshark_endpoints(pcap: Path, kind: str) -> dict:
    out = subprocess.run(["tshark", "-r", str(pcap), "-q", "-z", f"endpoints,{kind}"],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", line)
        if m:
            found[m.group(1)] = tuple(int(x) for x in m.groups()[1:])
    return found


def api_endpoints(rows: list[dict], v6: bool) -> dict:
    return {r["address"]: (r["packets"], r["bytes"], r["tx_packets"], r["tx_bytes"],
                           r["rx_packets"], r["rx_bytes"])
            for r in rows if (":" in r["address"]) == v6 and re.match(r"^[0-9a-f.:]+$",
                                                                      r["address"])}


# Packets whose TCP or UDP header is whole and not a fragment's: tshark leaves sliced
# headers and fragments out of its TCP and UDP tables (the synthetic traffic has both).
WHOLE = ("((tcp and tcp[19] >= 0) or (udp and udp[7] >= 0)) "
         "and not (ip[6:2] & 0x3fff != 0)")


@pytest.mark.parametrize("user_kind", ["member", "restricted"])
def test_conversations_endpoints_and_volume_agree_with_the_packets(world, served, tmp_path,
                                                                   user_kind):
    user = getattr(world, user_kind)
    with served.client(user) as c:
        everything = c.get("/api/v1/pcap", params=window(world))
        vol = c.get("/api/v1/volume", params=window(world, step="10m"))
        whole = c.get("/api/v1/pcap", params=window(world, filter=WHOLE))
        conv = c.get("/api/v1/conversations", params=window(world, filter=WHOLE,
                                                            limit="10000"))
        ends = c.get("/api/v1/conversations", params=window(world, filter=WHOLE,
                                                            by="endpoint", limit="10000"))
    for r in (everything, vol, whole, conv, ends):
        assert r.status_code == 200, r.text
    records = read_pcap_records(everything.content)
    assert sum(vol.json()["packets"]) == len(records)
    assert sum(vol.json()["bytes"]) == sum(w for _, w, _ in records)
    path = tmp_path / "whole.pcap"
    path.write_bytes(whole.content)
    rows = conv.json()["rows"]
    assert conv.json()["total_rows"] == len(rows) > 20
    assert conv.json()["read_packets"]  # tcp[19] needs the packets' bytes
    for proto in ("tcp", "udp"):
        assert api_conv(rows, proto) == tshark_conv(path, proto)
    erows = ends.json()["rows"]
    assert api_endpoints(erows, False) == tshark_endpoints(path, "ip")
    v6 = tshark_endpoints(path, "ipv6")
    assert api_endpoints(erows, True) == v6
    if user_kind == "member":
        return
    assert everything.headers["x-pcapvault-restricted-to"] == NET_FILTER
    assert records and all(_in_net_10_0(data) for _, _, data in records)
    lines = last_audit(world, 5)
    assert {x["endpoint"] for x in lines} == {"pcap", "conversations", "volume"}
    assert all(x["restricted_by"] == [world.net_group] for x in lines)
    assert lines[-1]["effective_filter"] == f"({NET_FILTER}) and ({WHOLE})"


def _in_net_10_0(frame: bytes) -> bool:
    """Whether an Ethernet frame (VLAN tags skipped) carries an IPv4 or ARP address in
    10.0.0.0/16 (what the restriction's `net` matches)."""
    at = 12
    while struct.unpack_from("!H", frame, at)[0] in (0x8100, 0x88A8):
        at += 4
    etype = struct.unpack_from("!H", frame, at)[0]
    body = frame[at + 2:]
    if etype == 0x0800:
        return body[12:14] == b"\x0a\x00" or body[16:18] == b"\x0a\x00"
    if etype == 0x0806:
        return body[14:16] == b"\x0a\x00" or body[24:26] == b"\x0a\x00"
    return False


@pytest.mark.parametrize("path", ["/api/v1/conversations", "/api/v1/volume", "/api/v1/pcap"])
def test_a_restricted_users_filter_must_be_whole_on_its_own(world, served, path):
    """`udp) or (ip` inside the restriction would read `(ALLOWED) and (udp) or (ip)`: all
    traffic. Every endpoint checks the user's filter alone first (policy.checked_filter)."""
    before = world.audit_count()
    with served.client(world.restricted) as c:
        r = c.get(path, params=window(world, filter="udp) or (ip", step="10m"))
        assert r.status_code == 400 and "bad filter" in r.json()["error"], r.text
        check = c.get("/api/v1/filter", params={"expr": "udp) or (ip"})
        assert check.status_code == 400 and "bad filter" in check.json()["error"]
    line = world.audit_lines()[before]
    assert line["outcome"] == "error" and "bad filter" in line["reason"]
    assert line["pam_user"] == world.restricted.name


def test_doubly_restricted_user_gets_the_union(world, second, served):
    with served.client(world.doubly_restricted) as c:
        r = c.get("/api/v1/pcap", params=window(world, filter="port 53"))
    assert r.status_code == 200
    union = f"({NET_FILTER}) or ({UDP_FILTER})"
    assert r.content == direct(world, [world.dumpset, second], "-f",
                               f"({union}) and (port 53)")


def test_tokens_act_as_their_user_until_revoked(world, second, served):
    made = served.token("create", world.member.name, "--note", "soar playbook")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    with served.client(token=token) as c:
        r = c.get("/api/v1/pcap", params=window(world, filter="icmp"))
        assert r.status_code == 200, r.text
        assert r.content == direct(world, [world.dumpset, second], "-f", "icmp")
    line = last_audit(world)[0]
    assert line["method"] == "token" and line["pam_user"] == world.member.name
    listed = served.token("list")
    tid = listed.stdout.split()[0]
    assert served.token("revoke", tid).returncode == 0
    with served.client(token=token) as c:
        r = c.get("/api/v1/pcap", params=window(world, filter="icmp"))
        assert r.status_code == 401
    assert last_audit(world)[0]["outcome"] == "denied"


def test_status_metrics_and_openapi_need_no_login(world, served, second):
    with served.client() as c:
        st = c.get("/api/v1/status").json()["dumpsets"]
        assert [s["interface"] for s in st] == ["pvrx", "eth9"]
        # 4 files of 200 packets, 5 when the 20 s of traffic straddle a 10-minute slot
        stored = sum(1 for p in second.rglob("*.pcap") if not p.is_symlink())
        assert st[0]["files"] >= 1 and st[1]["files"] == stored in (4, 5)
        c.get("/api/v1/pcap", params=window(world))  # a 401 to count
        text = c.get("/metrics").text
        doc = c.get("/api/v1/openapi.json").json()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    files = {s.labels["interface"]: s.value for s in fams["pcapvault_files"].samples}
    assert files["pvrx"] == st[0]["files"] and files["eth9"] == st[1]["files"]
    req = {(s.labels["endpoint"], s.labels["code"]): s.value
           for s in fams["npcapserve_requests"].samples if s.name.endswith("_total")}
    assert req[("pcap", "401")] >= 1 and req[("status", "200")] >= 1
    served_bytes = {s.labels["endpoint"]: s.value for s in fams["npcapserve_bytes_served"].samples
                    if s.name.endswith("_total")}
    assert served_bytes["pcap"] > 0
    assert set(doc["paths"]) == {"/api/v1/pcap", "/api/v1/conversations", "/api/v1/volume",
                                 "/api/v1/status", "/metrics", "/api/v1/openapi.json",
                                 "/api/v1/filter", "/login", "/logout", "/session",
                                 "/api/v1/catalogue"}


def test_a_dump_set_served_by_its_timeline_is_named_by_its_root(world):
    """-t DIR/timeline: status names it DIR, and dumpset=DIR chooses it (it was refused as
    not served); given twice, it is served once."""
    tl = world.dumpset / "timeline"
    with serving(world, [tl, world.dumpset]) as s, s.client(world.member) as c:
        paths = [d["path"] for d in c.get("/api/v1/status").json()["dumpsets"]]
        assert paths == [str(world.dumpset)]
        for path in ("/api/v1/conversations", "/api/v1/catalogue"):
            r = c.get(path, params=window(world, dumpset=str(world.dumpset)))
            assert r.status_code == 200, r.text


def test_metrics_auth(world):
    with serving(world, None, "--metrics-auth") as s:
        with s.client() as c:
            assert c.get("/metrics").status_code == 401
            assert c.get("/api/v1/status").status_code == 401
        with s.client(world.member) as c:
            assert c.get("/metrics").status_code == 200


def test_tls_key_is_not_readable_by_the_serving_account(world, served):
    """The key was read as root before the drop: the worker could not read it now."""
    pid = served.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).group(1))
    assert uid == pwd.getpwnam(world.service_account).pw_uid
    assert (world.base / "key.pem").stat().st_mode & 0o077 == 0


def test_metrics_follow_a_live_recorder_over_https(world, veth):
    """The unit's view: a recorder running as the service account, scraped through TLS."""
    live = world.base / "live"
    src = world.base / "live.pcap"
    synthetic_pcap(src, 200, 300)
    rec = RecorderProc(veth, live, "-u", world.service_account, "--stats-interval", "0.2",
                       "--disk-limit", "1GB")
    try:
        with serving(world, [live]) as s, s.client() as c:
            def written() -> dict[str, float]:
                fams = text_string_to_metric_families(c.get("/metrics").text)
                return {x.name: x.value for f in fams for x in f.samples
                        if x.labels.get("interface") == veth.rx}

            until = time.monotonic() + 15
            while written().get("pcapvault_recorder_up") != 1:
                assert time.monotonic() < until
                time.sleep(0.2)
            assert written()["pcapvault_packets_written_total"] == 0
            for n in (200, 400):
                veth.send([src])
                until = time.monotonic() + 15
                while (m := written())["pcapvault_packets_written_total"] < n:
                    assert time.monotonic() < until, m
                    time.sleep(0.2)
                assert m["pcapvault_packets_written_total"] == n
                assert m["pcapvault_bytes_written_total"] == n * (300 + 16)
    finally:
        assert rec.stop() == 0, rec.stderr


def test_guessing_is_limited_per_address(world):
    """Ten failures from one address within a minute: 429 with Retry-After, audited; even
    the right password waits (its own server: the limit would hold up the other tests)."""
    with serving(world) as s:
        with s.client(world.member, password="guess") as c:
            codes = [c.get("/api/v1/volume", params=window(world)).status_code
                     for _ in range(10)]
        assert codes == [401] * 10
        with s.client(world.member) as c:
            r = c.get("/api/v1/volume", params=window(world))
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert "too many failed logins" in r.json()["error"]
        line = last_audit(world)[0]
        assert line["outcome"] == "denied" and "too many" in line["reason"]


def test_session_idle_time_is_the_servers_option(world):
    """--session-idle: a login unused for longer ends on the server; used, it lives on."""
    with serving(world, None, "--session-idle", "1") as short, short.client() as c:
        r = c.post("/login", json={"user": world.member.name,
                                   "password": world.member.password},
                   headers={"Origin": short.url})
        assert r.status_code == 200
        for _ in range(3):  # used every 0.5 s: alive past one idle period
            time.sleep(0.5)
            assert c.get("/session").status_code == 200
        time.sleep(1.5)
        r = c.get("/session")
        assert r.status_code == 401 and "log in again" in r.json()["error"]


def test_a_dead_index_worker_costs_one_request(world):
    """A worker killed (out of memory, by hand): the request that finds the pool broken is
    a 503 JSON error saying to ask again (no traceback), and the next one is served by a
    new pool."""
    import os
    import signal

    from proctree import descendants

    with serving(world) as s, s.client(world.member) as c:
        assert c.get("/api/v1/conversations", params=window(world)).status_code == 200
        workers = [p for p in descendants(s.proc.pid)
                   if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        time.sleep(0.5)  # the pool sees its worker gone
        r = c.get("/api/v1/conversations", params=window(world))
        assert r.status_code == 503 and "ask again" in r.json()["error"]
        r = c.get("/api/v1/volume", params=window(world, step="10s"))
        assert r.status_code == 200 and sum(r.json()["packets"]) > 0
