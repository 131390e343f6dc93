"""npcapfleet against three sensors on this machine: three npcapserve processes (TLS, tokens,
the PAM world's service account), each serving a dump set of different traffic, and a chdb
catalogue in a temporary directory.

The oracles are the sensors' own tools: `npcapextract -t ds1 -t ds2 -t ds3 --pcapng` for the
packets and their order, extract/conversations.py over the three dump sets for the tables.
"""

from __future__ import annotations

import hashlib
import json
import pwd
import ssl
import struct
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from extract_helpers import build_dumpset, epoch, ether, ipv4, synthetic_traffic, tcp, udp
from pamworld import CLIENT, PAM_MARKS
from recorderproc import tool
from serveworld import serving

from pcapvault.extract.conversations import conversations
from pcapvault.extract.request import Request
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.privileges import give_tree

pytestmark = PAM_MARKS
PROG = "npcapfleet"
START = 1_765_000_000  # seconds: the recordings' first second
END = START + 300  # every dump set's last packet is at END (so the catalogue reaches it)
NS = 10**9
WHOLE = ((START - 1) * NS, END * NS + 1)  # every packet; no catalogue row is cut
CUT = ((START + 100) * NS + 500_000_000, (START + 200) * NS + 250_000_000)  # rows are cut
MAC = bytes.fromhex("00163e000001"), bytes.fromhex("00163e000002")


def own_traffic(n: int, seed: int, net: str) -> list[tuple[int, bytes, int]]:
    """TCP and UDP among NET.0.0/16 only (no ARP, no VLAN): the third sensor's sites."""
    import random

    rnd = random.Random(seed)
    out, ts = [], START * NS + 7
    for _ in range(n):
        ts += rnd.randint(1, 2 * 290 * NS // n)
        a, b = (f"{net}.{rnd.randint(0, 3)}.{rnd.randint(1, 9)}" for _ in range(2))
        if rnd.random() < 0.7:
            l4, proto = tcp(rnd.randint(1024, 65535), rnd.choice([443, 22]), 0x18,
                            b"x" * rnd.randint(0, 300)), 6
        else:
            l4, proto = udp(rnd.randint(1024, 65535), 53, b"q" * 30), 17
        if rnd.random() < 0.1:  # a long-lived session, over every window's edges
            a, b, l4, proto = f"{net}.9.9", f"{net}.9.8", tcp(50000, 443, 0x18, b"s" * 99), 6
        frame = ether(*MAC, 0x0800, ipv4(a, b, proto, l4))
        out.append((ts, frame, len(frame)))
    return out


def traffic(k: int) -> list[tuple[int, bytes, int]]:
    """Sensor k's recording: different traffic, interleaved in time, all ending at END."""
    pkts = (synthetic_traffic(700, START * NS + k * 1000, seed=30 + k, span_s=290) if k < 2
            else own_traffic(500, 33, "172.20") if k == 2 else own_traffic(300, 34, "172.21"))
    frame = ether(*MAC, 0x0800, ipv4(f"10.9.9.{k + 1}", "10.9.9.9", 17, udp(9, 9, b"end")))
    return [*pkts, (END * NS, frame, len(frame))]


@pytest.fixture(scope="module")
def fleet(world, tmp_path_factory):
    """Three sensors serving ds1, ds2, and ds3 with ds4 (two interfaces), a fleet file (CA
    for two, a fingerprint for the second) and a catalogue directory."""
    base = tmp_path_factory.mktemp("fleet")
    roots = []
    for k in range(4):
        root = world.base / f"fleet-ds{k + 1}"
        build_dumpset(root, traffic(k), per_file=150, interface=f"eth{k + 1}")
        give_tree(root, pwd.getpwnam(world.service_account))
        roots.append(root)
    with serving(world, [roots[0]]) as s1, serving(world, [roots[1]]) as s2, \
            serving(world, [roots[2], roots[3]]) as s3:
        token = s1.token("create", world.member.name, "--note", "fleet").stdout.strip()
        der = ssl.PEM_cert_to_DER_cert(s1.cert.read_text())
        pin = hashlib.sha256(der).hexdigest()
        conf = base / "fleet.toml"
        conf.write_text(
            f'catalogue = "catalogue"\nretention_days = 3650\ntimeout = 20\n'
            f'[[sensor]]\nname = "s1"\nurl = "{s1.url}"\nca = "{s1.cert}"\ntoken = "{token}"\n'
            f'[[sensor]]\nname = "s2"\nurl = "{s2.url}"\nfingerprint = "sha256:{pin}"\n'
            f'token = "{token}"\n'
            f'[[sensor]]\nname = "s3"\nurl = "{s3.url}"\nca = "{s3.cert}"\ntoken = "{token}"\n')
        conf.chmod(0o600)
        made = {"conf": conf, "roots": roots, "servers": [s1, s2, s3], "base": base}
        made["sync"] = fleet_run(made, "sync")
        yield made


def fleet_run(fleet, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("npcapfleet"), "--config", str(fleet["conf"]), *args],
                          capture_output=True, text=True, timeout=120)


def window(b: int, e: int) -> list[str]:
    return ["-b", epoch(b), "-e", epoch(e)]


def pcapng_packets(data: bytes) -> tuple[list[str], list[tuple]]:
    """Interface names and (interface, timestamp units, lengths, bytes) of each packet."""
    names, packets, at = [], [], 0
    while at + 12 <= len(data):
        btype, blen = struct.unpack_from("<II", data, at)
        if btype == 1:
            opts, o = data[at + 16:at + blen - 4], 0
            while o + 4 <= len(opts):
                code, n = struct.unpack_from("<HH", opts, o)
                if code == 2:
                    names.append(opts[o + 4:o + 4 + n].decode())
                o += 4 + n + (-n & 3)
        elif btype == 6:
            iface, hi, lo, cap, wire = struct.unpack_from("<IIIII", data, at + 8)
            packets.append((iface, hi << 32 | lo, cap, wire, data[at + 28:at + 28 + cap]))
        at += blen
    assert at == len(data)
    return names, packets


def npcapextract(roots: list[Path], b: int, e: int, expr: str) -> bytes:
    r = subprocess.run([*CLIENT, *[a for d in roots for a in ("-t", str(d))],
                        *window(b, e), "-f", expr, "--pcapng", "-0", "-O"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def totals(rows: list[dict]) -> Counter:
    """Packets and bytes per conversation and direction, whichever end is A."""
    out: Counter = Counter()
    for r in rows:
        a, b = (r["address_a"], r["port_a"]), (r["address_b"], r["port_b"])
        out[(r["protocol"], a, b, "p")] += r["packets_a_to_b"]
        out[(r["protocol"], a, b, "b")] += r["bytes_a_to_b"]
        out[(r["protocol"], b, a, "p")] += r["packets_b_to_a"]
        out[(r["protocol"], b, a, "b")] += r["bytes_b_to_a"]
    return +out


def truth(roots: list[Path], b: int, e: int, expr: str) -> dict:
    t = conversations(Request([str(r) for r in roots], b, e, expr))
    return {"totals": totals(t.rows), "first": {_key(r): r["start_ns"] for r in t.rows}}


def _key(r: dict) -> tuple:
    ends = sorted([(r["address_a"], r["port_a"] or 0), (r["address_b"], r["port_b"] or 0)])
    return (r["protocol"], *ends)


def fleet_conversations(fleet, b: int, e: int, expr: str) -> dict:
    r = fleet_run(fleet, "conversations", *window(b, e), "-f", expr, "-n", "0", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sync_fills_the_catalogue(fleet):
    r = fleet["sync"]
    assert r.returncode == 0, r.stderr
    for k, root in enumerate(fleet["roots"]):
        files = len(DumpSet.open(root).files())
        sensor = f"s{min(k, 2) + 1}"
        assert f"{sensor} {root}: {files} files added or updated, 0 removed" in r.stderr
    again = fleet_run(fleet, "sync")  # the last minute again: the same files, replaced
    assert again.returncode == 0, again.stderr
    got = fleet_conversations(fleet, *WHOLE, "")
    assert got["sensors_asked"] == {}, "the catalogue should answer the whole recording"
    assert totals(got["rows"]) == truth(fleet["roots"], *WHOLE, "")["totals"]


# (filter, the sensors asked): a port or protocol test on IPv6 behind extension headers
# (hop-by-hop in synthetic_traffic, sensors 1 and 2) is libpcap's to decide, not the row's
@pytest.mark.parametrize("expr,asked", [
    ("host 10.0.1.3", []), ("net 172.20.0.0/16 and port 443", []), ("ip6", []),
    ("host 10.0.1.3 or host 2001:db8::1", []), ("not tcp", ["s1", "s2"]),
    ("udp or icmp", ["s1", "s2"]), ("port 53 and not host 8.8.8.8", ["s1", "s2"])])
def test_conversations_from_the_catalogue_equal_the_sensors(fleet, expr, asked):
    got = fleet_conversations(fleet, *WHOLE, expr)
    assert sorted(got["sensors_asked"]) == asked
    want = truth(fleet["roots"], *WHOLE, expr)
    assert totals(got["rows"]) == want["totals"] != Counter()
    # A is the end that sent first, fleet-wide
    assert {_key(r): r["start_ns"] for r in got["rows"]} == want["first"]


@pytest.mark.parametrize("expr,asked", [("net 172.20.0.0/16", ["s3"]),
                                        ("vlan and tcp", ["s1", "s2", "s3"]),
                                        ("tcp[13] & 2 != 0", ["s1", "s2", "s3"])])
def test_conversations_of_a_cut_window_or_a_filter_it_cannot_express(fleet, expr, asked):
    got = fleet_conversations(fleet, *CUT, expr)
    assert sorted(got["sensors_asked"]) == asked
    assert totals(got["rows"]) == truth(fleet["roots"], *CUT, expr)["totals"] != Counter()


def test_endpoint_and_port_tables(fleet):
    for by in ("endpoint", "port"):
        r = fleet_run(fleet, "conversations", *window(*WHOLE), "--by", by, "-n", "0", "--json")
        assert r.returncode == 0, r.stderr
        want = conversations(Request([str(p) for p in fleet["roots"]], *WHOLE, ""), by)
        key = ("address",) if by == "endpoint" else ("protocol", "port")
        got = json.loads(r.stdout)["rows"]
        assert ({tuple(x[k] for k in key): x for x in got}
                == {tuple(x[k] for k in key): x for x in want.rows})


@pytest.mark.parametrize("expr,b,e,asked", [
    ("host 10.0.1.3", *WHOLE, ["s1", "s2"]),  # no ARP on sensor 3, nor that host
    ("", CUT[0], CUT[0] + 30 * NS, ["s1", "s2", "s3"]),
    ("tcp[13] & 2 != 0", *CUT, ["s1", "s2", "s3"]),
])
def test_pcap_is_npcapextracts_packets_in_its_order(fleet, tmp_path, expr, b, e, asked):
    out = tmp_path / "fleet.pcapng"
    r = fleet_run(fleet, "pcap", *window(b, e), "-f", expr, "-o", str(out))
    assert r.returncode == 0, r.stderr
    names, got = pcapng_packets(out.read_bytes())
    ref_names, want = pcapng_packets(npcapextract(fleet["roots"], b, e, expr))
    assert names == ["s1:eth1", "s2:eth2", "s3:eth3", "s3:eth4"] and len(ref_names) == 4
    assert got == want and len(got) > 10
    assert [s for s in ("s1", "s2", "s3") if f"{PROG}: {s}: " in r.stderr] == asked


def test_pcap_asks_only_the_sensors_the_catalogue_names(fleet, tmp_path):
    out = tmp_path / "site3.pcapng"
    expr = "net 172.20.0.0/16 and tcp"  # no ARP can match: sensors 1 and 2 have nothing
    r = fleet_run(fleet, "pcap", *window(*WHOLE), "-f", expr, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "s3: " in r.stderr and "s1: " not in r.stderr and "2 sensors skipped" in r.stderr
    _, got = pcapng_packets(out.read_bytes())
    _, want = pcapng_packets(npcapextract(fleet["roots"], *WHOLE, expr))
    assert got == want and got


def test_deleted_files_leave_the_catalogue(fleet):
    root = fleet["roots"][1]
    ds = DumpSet.open(root)
    oldest = ds.files()[0]
    ds.delete(oldest)
    r = fleet_run(fleet, "sync", "--sensor", "s2")
    assert r.returncode == 0, r.stderr
    assert f"s2 {root}: " in r.stderr and ", 1 removed" in r.stderr
    got = fleet_conversations(fleet, *WHOLE, "")
    assert got["sensors_asked"] == {}  # the catalogue alone, without the deleted file
    assert totals(got["rows"]) == truth(fleet["roots"], *WHOLE, "")["totals"]


def test_a_sensor_with_another_certificate_gets_no_token(world, fleet, tmp_path):
    """A fingerprint that does not match: the sensor is named, nothing is sent to it (the
    token would go to whoever holds that certificate), the others sync."""
    text = fleet["conf"].read_text()
    pin = text.split('fingerprint = "sha256:')[1][:64]
    wrong = tmp_path / "fleet.toml"
    wrong.write_text(text.replace(pin, "00" * 32).replace('"catalogue"',
                                                           f'"{fleet["base"] / "catalogue"}"'))
    wrong.chmod(0o600)
    def asked_s2() -> int:
        return sum(1 for x in world.audit_lines() if x.get("dumpsets") == [str(fleet["roots"][1])])

    before = asked_s2()
    assert before > 0  # the first sync asked it
    r = subprocess.run([tool("npcapfleet"), "--config", str(wrong), "sync"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert "s2: the certificate of https://127.0.0.1:" in r.stderr
    assert "not the fleet file's fingerprint" in r.stderr
    assert "s1 " in r.stderr and "s3 " in r.stderr  # the others synced
    assert asked_s2() == before


def test_a_stopped_sensor_gives_a_partial_result(fleet, tmp_path):
    s3 = fleet["servers"][2]
    s3.proc.terminate()
    s3.proc.wait(30)
    out = tmp_path / "partial.pcapng"
    r = fleet_run(fleet, "pcap", *window(*WHOLE), "-f", "udp", "-o", str(out))
    assert r.returncode == 3, r.stderr
    assert "s3" in r.stderr and "partial" in r.stderr
    _, got = pcapng_packets(out.read_bytes())
    _, want = pcapng_packets(npcapextract(fleet["roots"][:2], *WHOLE, "udp"))
    assert got == want and got  # the other sensors' packets intact
    c = fleet_run(fleet, "conversations", *window(*CUT), "-f", "udp and ip[8] > 1", "--json")
    assert c.returncode == 3 and "s3" in c.stderr and json.loads(c.stdout)["partial"]
    # sensors down that the catalogue answers for (s2's pinned certificate not even fetched)
    s2 = fleet["servers"][1]
    s2.proc.terminate()
    s2.proc.wait(30)
    got = fleet_conversations(fleet, *WHOLE, "host 10.0.1.3")
    assert got["sensors_asked"] == {} and not got["partial"]
    assert totals(got["rows"]) == truth(fleet["roots"], *WHOLE, "host 10.0.1.3")["totals"]
