"""The catalogue's SQL (fleet/store.py, sync.py, query.py, filters.py) on hand-made pages of
/api/v1/catalogue answers, through chdb always and through a ClickHouse server when one is
named: PCAPVAULT_TEST_CLICKHOUSE=https://HOST:8443 with PCAPVAULT_TEST_CLICKHOUSE_USER,
PCAPVAULT_TEST_CLICKHOUSE_PASSWORD and PCAPVAULT_TEST_CLICKHOUSE_CA (docs/FLEET.md)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest
from frames import eth, ipv4, ipv6, ports

from pcapvault.fleet import filters, query
from pcapvault.fleet.config import ClickHouse
from pcapvault.fleet.rows import SENSOR_COLUMNS, Merged
from pcapvault.fleet.store import StoreError, open_store
from pcapvault.fleet.sync import Page, Synced, checked, cursors, store_page, sync
from pcapvault.index.libpcap import compile_filter

T = (int(time.time()) // 86400 - 1) * 86400 * 10**9 + 3600 * 10**9  # yesterday 01:00 UTC
S = 10**9
SERVER = os.environ.get("PCAPVAULT_TEST_CLICKHOUSE")


def conv(a: str, pa: int | None, b: str, pb: int | None, proto: str, ab: int, ba: int,
         first: int, last: int, view: str = "ip") -> dict:
    return {"address_a": a, "port_a": pa, "address_b": b, "port_b": pb, "protocol": proto,
            "packets_a_to_b": ab, "bytes_a_to_b": 100 * ab, "packets_b_to_a": ba,
            "bytes_b_to_a": 100 * ba, "first_ns": T + first * S, "last_ns": T + last * S,
            "view": view}


def answer(files: list[tuple[str, int, int, int, list[dict]]], names: list[str]) -> dict:
    """An /api/v1/catalogue answer: each file's conversations as columns."""
    return {"dumpset": "/d", "interface": "eth0", "linktype": 1, "snaplen": 262144,
            "nanosecond": True, "cursor": "1/x", "more": False, "names": names,
            "files": [{"name": n, "first_ns": T + f * S, "last_ns": T + la * S,
                       "index_mtime_ns": 1, "packets": p,
                       "conversations": {k: [r[k] for r in c] for k in (*SENSOR_COLUMNS, "view")}}
                      for n, f, la, p, c in files]}


FILE1 = ("f1.pcap", 0, 100, 9, [conv("10.0.0.1", 1000, "10.0.0.2", 80, "tcp", 3, 2, 1, 50),
                                conv("2001:db8::1", 7, "2001:db8::2", 53, "udp", 1, 1, 2, 3,
                                     "ip6ext")])
FILE2 = ("f2.pcap", 200, 300, 3, [conv("10.0.0.2", 80, "10.0.0.1", 1000, "tcp", 1, 0, 210, 210),
                                  conv("10.0.0.1", 5, "10.0.0.3", 6, "udp", 1, 0, 220, 220,
                                       "tagged")])
FILE3 = ("f3.pcap", 150, 170, 4, [conv("10.0.0.1", 1000, "10.0.0.2", 80, "tcp", 4, 0, 150, 160)])


@pytest.fixture(params=["chdb", "server"])
def store(request, tmp_path: Path):
    if request.param == "server":
        if not SERVER:
            pytest.skip("no ClickHouse server named (PCAPVAULT_TEST_CLICKHOUSE)")
        ca = os.environ.get("PCAPVAULT_TEST_CLICKHOUSE_CA")
        login = ClickHouse(os.environ.get("PCAPVAULT_TEST_CLICKHOUSE_USER", "default"),
                           os.environ.get("PCAPVAULT_TEST_CLICKHOUSE_PASSWORD", ""),
                           f"pvtest_{secrets.token_hex(4)}", Path(ca) if ca else None)
        s = open_store(SERVER, login, 30)
        yield s
        s.command(f"DROP DATABASE {s.db}")
    else:
        s = open_store(str(tmp_path / "catalogue"), ClickHouse(), 30)
        yield s
    s.close()


def load(store, *pages: tuple[str, dict]) -> list[Synced]:
    done = []
    for sensor, a in pages:
        s = Synced(sensor, a["dumpset"])
        store_page(store, Page(sensor, 0, checked(a), True), s)
        done.append(s)
    return done


def rows(store, expr: str, b: int, e: int, skip=frozenset()) -> list[dict]:
    m = Merged()
    for r in query.catalogue_rows(store, filters.conditions(filters.parse(expr)), b, e,
                                  ["a", "b"], set(skip)):
        m.add(r)
    return sorted(m.conversations(), key=lambda r: (r["address_a"], r["address_b"]))


def test_rows_sum_over_files_and_sensors(store):
    load(store, ("a", answer([FILE1, FILE2], ["f1.pcap", "f2.pcap"])),
         ("b", answer([FILE3], ["f3.pcap"])))
    day = (T, T + 1000 * S)
    got = rows(store, "host 10.0.0.1", *day)
    assert got == [{
        "address_a": "10.0.0.1", "port_a": 1000, "address_b": "10.0.0.2", "port_b": 80,
        "protocol": "tcp", "packets_a_to_b": 7, "bytes_a_to_b": 700, "packets_b_to_a": 3,
        "bytes_b_to_a": 300, "packets": 10, "bytes": 1000, "start_ns": T + S,
        "duration_s": 209.0}]
    # the tagged row: a filter without vlan is a constant for it
    assert [r["address_b"] for r in rows(store, "not host 10.0.0.2", *day)] == [
        "10.0.0.3", "2001:db8::2"]
    assert rows(store, "udp", *day) == []  # tagged: false; ip6ext: unsure
    cond = filters.conditions(filters.parse("udp"))
    assert query.straddling(store, cond, *day, ["a", "b"]) == {("a", "/d")}
    assert query.straddling(store, filters.conditions(filters.parse("ip6")), *day,
                            ["a", "b"]) == set()
    # a window that cuts sensor a's first row, and one that holds only sensor b's
    cond = filters.conditions(filters.parse("tcp"))
    assert query.straddling(store, cond, T + 10 * S, T + 1000 * S, ["a", "b"]) == {("a", "/d")}
    assert query.straddling(store, cond, T + 140 * S, T + 180 * S, ["a", "b"]) == set()
    assert rows(store, "tcp", T + 140 * S, T + 180 * S)[0]["packets"] == 4
    assert rows(store, "host 10.0.0.1", *day, skip={("b", "/d")})[0]["packets"] == 6
    # the files a pcap asks for
    assert query.candidates(store, filters.parse("port 80"), True, T + 180 * S, T + 250 * S,
                            ["a", "b"]) == {("a", "/d")}
    assert query.candidates(store, filters.parse("host 10.0.0.9"), True, *day,
                            ["a", "b"]) == {("a", "/d")}  # file 1 holds non-IP packets
    assert query.candidates(store, None, False, T + 150 * S, T + 151 * S,
                            ["a", "b"]) == {("b", "/d")}
    ks = query.known(store, ["b", "a"])
    assert [(k.sensor, k.interface, k.reach_ns) for k in ks] == [
        ("b", "eth0", T + 170 * S), ("a", "eth0", T + 300 * S)]
    assert cursors(store) == {("a", "/d"): "1/x", ("b", "/d"): "1/x"}


def test_files_sent_again_replace_and_unnamed_files_leave(store):
    load(store, ("a", answer([FILE1, FILE2], ["f1.pcap", "f2.pcap"])))
    again = load(store, ("a", answer([FILE2], ["f2.pcap"])))  # f1 deleted on the sensor
    assert (again[0].added, again[0].removed) == (1, 1)
    got = rows(store, "", T, T + 1000 * S)
    assert [(r["address_a"], r["packets"]) for r in got] == [("10.0.0.1", 1), ("10.0.0.2", 1)]
    names = store.query(f"SELECT file, count() FROM {store.db}.files GROUP BY file")
    assert names == [("f2.pcap", 1)]


@pytest.mark.parametrize("path", ["/data/cap\\tx", "/data/x\\", "/d\tnew\nline", "/d'q"])
def test_dump_set_paths_are_data_whatever_they_hold(store, path):
    """A sensor's dump set path is text ClickHouse must not read escapes in: a file indexed
    again replaces its rows, a file deleted leaves (a backslash made both fail)."""
    first = answer([FILE1, FILE2], ["f1.pcap", "f2.pcap"])
    again = answer([FILE2], ["f2.pcap"])  # f2 indexed again, f1 deleted on the sensor
    for a in (first, again):
        a["dumpset"] = path
    load(store, ("a", first))
    done = load(store, ("a", again))
    assert (done[0].added, done[0].removed) == (1, 1)
    assert store.query(f"SELECT dumpset, file FROM {store.db}.files") == [(path, "f2.pcap")]
    assert cursors(store) == {("a", path): "1/x"}


def test_a_page_larger_than_one_insert(store):
    """60,001 conversations of 3,000 hosts (inserted in parts of 50,000, each distinct
    address converted once): every row arrives, with its addresses and counts."""
    convs = [conv(f"10.1.{i % 3000 // 250}.{i % 250}", 1024 + i % 50000, "2001:db8::9", 443,
                  "tcp", 1 + i % 7, i % 3, 1 + i % 90, 95) for i in range(60_001)]
    load(store, ("a", answer([("big.pcap", 0, 100, 10**6, convs)], ["big.pcap"])))
    db = store.db
    got = store.query(f"SELECT count(), sum(packets_lo_hi), sum(packets_hi_lo), "
                      f"uniqExact(addr_lo), uniqExact(addr_hi) FROM {db}.conversations")
    assert got == [(60_001, sum(1 + i % 7 for i in range(60_001)),
                    sum(i % 3 for i in range(60_001)), 3000, 1)]
    one = rows(store, "host 10.1.11.249 and port 4023", T, T + 1000 * S)
    assert [(r["address_a"], r["address_b"], r["packets"]) for r in one] == [
        ("10.1.11.249", "2001:db8::9", (1 + 2999 % 7) + 2999 % 3)]


@pytest.mark.parametrize("expr", ["src host 10.0.0.1", "vlan 100", "host a.example",
                                  "host 10.0.0.1 or 10.0.0.2", "port http", "tcp[13] & 2 != 0",
                                  "ether host 00:11:22:33:44:55", "(host 10.0.0.1"])
def test_filters_the_catalogue_leaves_to_the_sensors(expr):
    with pytest.raises(filters.NotExpressible):
        filters.parse(expr)


# Rows of the ip view and a real frame of each, for libpcap to judge (the catalogue must
# answer exactly what tcpdump selects, or a sensor holding packets is not asked).
ORACLE_ROWS = [
    (conv("10.0.0.1", 40000, "10.0.0.9", 22, "tcp", 1, 0, 1, 2),
     eth(0x0800, ipv4(6, ports(40000, 22), "10.0.0.1", "10.0.0.9"))),
    (conv("2001:db8::1", 53, "2001:db8::2", 5353, "udp", 1, 0, 1, 2),
     eth(0x86DD, ipv6(17, ports(53, 5353), "2001:db8::1", "2001:db8::2"))),
    (conv("::ffff:10.0.0.1", 80, "2001:db8::2", 8080, "tcp", 1, 0, 1, 2),
     eth(0x86DD, ipv6(6, ports(80, 8080), "::ffff:10.0.0.1", "2001:db8::2"))),
]
HOSTS = " or ".join(f"host 10.1.{i // 250}.{i % 250 + 1}" for i in range(299))


@pytest.mark.parametrize("expr", [
    "host 10.0.0.1 or host 10.0.0.2 and port 80",  # libpcap: (a or b) and c
    "not (host 10.0.0.1 or host 10.0.0.2 and port 80)",
    "tcp and not port 22 or udp", "! tcp || port 53 && udp", "port 026", "port 0x16",
    "port 026 or port 0x35", "host ::ffff:10.0.0.1", "not host ::ffff:10.0.0.1", "net ::/0",
    "not net ::/0", "net 10.0.0.0/8", "not net ::ffff:0:0/96", "ip6 and net 2001:db8::/32",
    f"{HOSTS} or host 10.0.0.9", f"not ({HOSTS})",
    "tcp" + "".join(f" {'and' if i % 2 else 'or'} port {i}" for i in range(39)),
])
def test_the_catalogue_selects_what_libpcap_selects(store, expr):
    load(store, ("a", answer([("f.pcap", 0, 10, 3, [r for r, _ in ORACLE_ROWS])], ["f.pcap"])))
    with compile_filter(expr) as f:
        want = sorted(r["port_a"] for r, frame in ORACLE_ROWS if f.match(frame))
    got = {r["port_a"]: ip_address(r["address_a"]) for r in rows(store, expr, T, T + 100 * S)}
    assert sorted(got) == want
    assert all(got[r["port_a"]] == ip_address(r["address_a"]) for r, _ in ORACLE_ROWS
               if r["port_a"] in got)


@pytest.mark.parametrize("expr", [
    " or ".join(["tcp"] * 700), "not " * 1000 + "tcp", "(" * 400 + "tcp" + ")" * 400,
    "port 08", "port 99999999999999999999"])
def test_filters_too_long_or_deep_for_the_catalogue_go_to_the_sensors(expr):
    with pytest.raises(filters.NotExpressible):
        filters.parse(expr)


def test_filter_values_are_parameters_not_text():
    c = filters.conditions(filters.parse("host 10.0.0.1 and (port 443 or net 192.168.0.0/16)"))
    for sql in (c.match, c.possible, c.unsure):
        assert "10.0.0.1" not in sql.text and "443" not in sql.text and "192.168" not in sql.text
    assert set(c.match.params.values()) == {"::ffff:a00:1", 443, "::ffff:c0a8:0",
                                            "::ffff:c0a8:ffff"}


def test_windows_the_catalogue_may_not_hold_are_asked_of_the_sensors(store):
    load(store, ("a", answer([FILE1, FILE2], ["f1.pcap", "f2.pcap"])),
         ("b", answer([FILE3], ["f3.pcap"])))
    ks = query.known(store, ["a", "b"])
    kept = query.horizon(30, time.time_ns())
    assert query.stale(ks, T, T + 170 * S, kept) == set()
    assert query.stale(ks, T, T + 250 * S, kept) == {("b", "/d")}  # b's files end at 170 s
    month_ago = T - 31 * 86400 * S  # before the TTL keeps: every dump set
    assert query.stale(ks, month_ago, T + 100 * S, kept) == {("a", "/d"), ("b", "/d")}
    assert query.stale(ks, month_ago, T + 100 * S, query.horizon(40, time.time_ns())) == set()


def _good() -> dict:
    return answer([FILE1], ["f1.pcap"])


def _broken(change) -> dict:
    a = _good()
    change(a, a["files"][0]["conversations"])
    return a


BROKEN = {
    "rows as objects": lambda a, c: a["files"][0].update(conversations=[{"address_a": "x"}]),
    "no view": lambda a, c: c.pop("view"),
    "unknown view": lambda a, c: c["view"].__setitem__(0, "other"),
    "columns of unequal length": lambda a, c: c["port_a"].append(9),
    "not an address": lambda a, c: c["address_a"].__setitem__(0, "10.0.0.999"),
    "port past 65535": lambda a, c: c["port_b"].__setitem__(0, 70000),
    "port as text": lambda a, c: c["port_b"].__setitem__(0, "80"),
    "count as text": lambda a, c: c["packets_a_to_b"].__setitem__(0, "many"),
    "file time as a list": lambda a, c: a["files"][0].update(first_ns=[1]),
    "dump set not text": lambda a, c: a.update(dumpset=7),
    "files not a list of objects": lambda a, c: a.update(files=["f1.pcap"]),
    "file time past the catalogue's days": lambda a, c: a["files"][0].update(first_ns=10**30),
    "file time as a fraction": lambda a, c: a["files"][0].update(first_ns=1.5),
    "link type past 32 bits": lambda a, c: a.update(linktype=1 << 40),
    "snapshot length below zero": lambda a, c: a.update(snaplen=-1),
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_a_sensor_answer_no_sensor_sends_is_refused(how):
    checked(_good())
    with pytest.raises((KeyError, TypeError, ValueError, AttributeError)):
        checked(_broken(BROKEN[how]))


class _Crafted:
    """A sensor's answers as a hostile or broken one might craft them (the network part of
    SensorClient is tested against real npcapserve instances in test_fleet.py)."""

    def __init__(self, name: str, answer: dict):
        self.name, self.answer = name, answer

    def dumpsets(self) -> list[dict]:
        return [{"path": "/d"}]

    def catalogue(self, dumpset: str, since: str, limit: int) -> dict:
        return self.answer


def test_a_broken_sensor_fails_alone(tmp_path):
    store = open_store(str(tmp_path / "catalogue"), ClickHouse(), 30)
    try:
        done = sync(store, [_Crafted("bad", _broken(BROKEN["not an address"])),
                            _Crafted("good", _good())], lambda s: None)
        by = {s.sensor: s for s in done}
        assert "bad: unexpected answer" in by["bad"].error
        assert by["good"].error is None and by["good"].conversations == 2
        assert store.query(f"SELECT DISTINCT sensor FROM {store.db}.conversations") == [
            ("good",)]
    finally:
        store.close()


def test_a_broken_sensor_answer_to_conversations_fails_that_sensor(tmp_path):
    good_row = {"address_a": "10.0.0.1", "port_a": 1000, "address_b": "10.0.0.2", "port_b": 80,
                "protocol": "tcp", "packets_a_to_b": 3, "bytes_a_to_b": 300,
                "packets_b_to_a": 2, "bytes_b_to_a": 200, "packets": 5, "bytes": 500,
                "start_ns": T, "duration_s": 1.5}
    answers = {"good": {"rows": [good_row], "total_rows": 1},
               "bad": {"rows": [dict(good_row, port_b=-80)], "total_rows": 1},
               "worse": {"rows": "none", "total_rows": 1}}

    class Crafted:
        def __init__(self, name: str):
            self.name = name

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def conversations(self, *args) -> dict:
            return answers[self.name]

    store = open_store(str(tmp_path / "catalogue"), ClickHouse(), 30)
    try:
        t = query.conversations(store, list(answers), Crafted, "tcp[13] & 2 != 0", T,
                                T + 10 * S, 0)
    finally:
        store.close()
    assert sorted(m.split(":")[0] for m in t.failed) == ["bad", "worse"]
    assert all("unexpected answer" in m for m in t.failed)
    assert [(c["address_a"], c["packets"], c["duration_s"]) for c in t.conversations] == [
        ("10.0.0.1", 5, 1.5)]


_OPEN = """import sys
from pcapvault.fleet import store
store.LOCK_WAIT_S = float(sys.argv[2])
try:
    store.open_store(sys.argv[1], store.ClickHouse(), 30).close()
except store.StoreError as e:
    print(e)
    sys.exit(3)
print("opened")
"""


def test_a_chdb_catalogue_in_use_is_waited_for_then_named(tmp_path):
    """chdb opens a directory in one process at a time: a second npcapfleet waits for the
    first (a query meeting the timer's sync), then says what is going on."""
    path = str(tmp_path / "catalogue")
    held = open_store(path, ClickHouse(), 30)
    try:
        r = subprocess.run([sys.executable, "-c", _OPEN, path, "0.5"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 3, r.stderr
        assert r.stdout.startswith(f"the catalogue {path} is in use by another npcapfleet")
        waiting = subprocess.Popen([sys.executable, "-c", _OPEN, path, "60"],
                                   stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert waiting.poll() is None  # still waiting
    finally:
        held.close()
    out, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and out.strip() == "opened"


def test_a_catalogue_lock_that_leads_away_is_refused(tmp_path):
    path = tmp_path / "catalogue"
    path.mkdir()
    (path / ".npcapfleet.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="cannot lock the catalogue"):
        open_store(str(path), ClickHouse(), 30)
    assert not (tmp_path / "elsewhere").exists()
