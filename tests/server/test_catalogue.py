"""/api/v1/catalogue: each file's own conversations, paged by index time, deletions visible.

Per-file sums equal the whole dump set's conversations (extract/conversations.py over every
file at once), even where a file's last packet is stamped after the next file's first."""

from __future__ import annotations

import os
import pwd
import time
from collections import Counter
from pathlib import Path

import pytest
from extract_helpers import build_dumpset, synthetic_traffic
from pamworld import PAM_MARKS
from serveworld import serving

from pcapvault.extract.conversations import FILE_FIELDS, conversations, file_conversations
from pcapvault.extract.request import Request
from pcapvault.index.dumpset import DumpSet
from pcapvault.index.privileges import give_tree
from pcapvault.server import catalogue
from pcapvault.server.catalogue import VIEWS

pytestmark = PAM_MARKS
FAR = (0, 1 << 62)


def stepped_dumpset(root: Path, start_s: int) -> Path:
    """600 packets in files of 200 whose boundaries step back in time: each file's last
    packet is stamped after the next file's first (timestamps of records 199/200 and
    399/400 swapped, as kernel timestamps across CPUs may be)."""
    pkts = synthetic_traffic(600, start_s * 10**9, seed=21, span_s=60)
    for i in (199, 399):
        (a, da, wa), (b, db, wb) = pkts[i], pkts[i + 1]
        pkts[i], pkts[i + 1] = (b, da, wa), (a, db, wb)
    build_dumpset(root, pkts, per_file=200, interface="eth7")
    return root


def totals(rows: list[dict]) -> Counter:
    """Packets and bytes per conversation and direction, whichever end is A."""
    out: Counter = Counter()
    for r in rows:
        a = (r["address_a"], r["port_a"])
        b = (r["address_b"], r["port_b"])
        out[(r["protocol"], a, b, "p")] += r["packets_a_to_b"]
        out[(r["protocol"], a, b, "b")] += r["bytes_a_to_b"]
        out[(r["protocol"], b, a, "p")] += r["packets_b_to_a"]
        out[(r["protocol"], b, a, "b")] += r["bytes_b_to_a"]
    return +out


def rows_of(columns: dict[str, list]) -> list[dict]:
    """A catalogue file's conversations, a dict per row."""
    return [dict(zip(columns, values, strict=True))
            for values in zip(*columns.values(), strict=True)]


def test_file_conversations_count_each_packet_once(tmp_path):
    root = stepped_dumpset(tmp_path / "ds", 1_700_000_000)
    files = DumpSet.open(root).files()
    assert len(files) == 3
    whole = conversations(Request([str(root)], *FAR))
    per_file = [file_conversations(str(root), sf) for sf in files]
    assert sum(t.packets for t in per_file) == whole.packets == 600
    assert sum(t.bytes for t in per_file) == whole.bytes
    assert totals([r for t in per_file for r in rows_of(t.columns)]) == totals(whole.rows)
    # a window over each file's own span counts the stepped packets twice
    naive = 0
    for t in per_file:
        first, last = min(t.columns["first_ns"]), max(t.columns["last_ns"])
        naive += conversations(Request([str(root)], first, last + 1)).packets
    assert naive > 600


def test_an_answer_stops_after_its_work_budget(tmp_path):
    """Big files take seconds each: an answer holds what fits its budget (at least one file)
    and says more, so a client's timeout never stops a first sync for good."""
    root = stepped_dumpset(tmp_path / "ds", 1_700_000_000)
    first = catalogue.page(str(root), catalogue.Cursor(), 100, time.time_ns(), work_s=0)
    assert len(first["files"]) == 1 and first["more"]
    rest = catalogue.page(str(root), catalogue.Cursor.parse(first["cursor"]), 100,
                          time.time_ns())
    assert len(rest["files"]) == 2 and not rest["more"]
    assert {f["name"] for f in first["files"] + rest["files"]} == set(first["names"])
    # and after enough conversations (what the client holds in memory at once)
    one = catalogue.page(str(root), catalogue.Cursor(), 100, time.time_ns(), max_rows=1)
    assert len(one["files"]) == 1 and one["more"]
    two = catalogue.page(str(root), catalogue.Cursor(), 100, time.time_ns(),
                         max_rows=len(one["files"][0]["conversations"]["view"]) + 1)
    assert len(two["files"]) == 2 and two["more"]


@pytest.fixture(scope="module")
def dumpset(world) -> Path:
    root = stepped_dumpset(world.base / "cat", int(world.window[0]) + 7200)
    hour_ago = os.stat(root).st_mtime - 3600
    for sf in DumpSet.open(root).files():  # indexed long before the first sync
        os.utime(sf.index, (hour_ago, hour_ago))
    give_tree(root, pwd.getpwnam(world.service_account))
    return root


@pytest.fixture(scope="module")
def served(world, dumpset):
    with serving(world, [dumpset, world.dumpset]) as s:
        yield s


def pages(client, dumpset: Path, since: str = "", limit: int = 2) -> tuple[list[dict], dict]:
    """Every page from `since` on: the files, and the last answer."""
    files = []
    while True:
        r = client.get("/api/v1/catalogue", params={"dumpset": str(dumpset), "since": since,
                                                     "limit": limit})
        assert r.status_code == 200, r.text
        answer = r.json()
        files += answer["files"]
        since = answer["cursor"]
        if not answer["more"]:
            return files, answer


def test_catalogue_pages_sum_to_the_dump_sets_conversations(world, served, dumpset):
    token = served.token("create", world.member.name).stdout.strip()
    with served.client(token=token) as c:
        files, last = pages(c, dumpset)
    names = [f.name for f in DumpSet.open(dumpset).files()]
    assert sorted(f["name"] for f in files) == sorted(last["names"]) == sorted(names)
    assert last["interface"] == "eth7" and last["linktype"] == 1 and last["nanosecond"]
    assert sum(f["packets"] for f in files) == 600
    whole = conversations(Request([str(dumpset)], *FAR))
    rows = [r for f in files for r in rows_of(f["conversations"])]
    assert set(rows[0]) == {*FILE_FIELDS, "view"}
    assert totals(rows) == totals(whole.rows)
    for view, expr in VIEWS.items():
        want = conversations(Request([str(dumpset)], *FAR, expr))
        assert totals([r for r in rows if r["view"] == view]) == totals(want.rows) != Counter()
    for f in files:
        assert f["first_ns"] <= min(f["conversations"]["first_ns"])
        assert max(f["conversations"]["last_ns"]) <= f["last_ns"]
    line = world.audit_lines()[-1]
    assert line["endpoint"] == "catalogue" and line["outcome"] == "allowed"
    assert line["method"] == "token"


def test_catalogue_sends_reindexed_files_again_and_names_what_is_left(world, served, dumpset):
    with served.client(world.member) as c:
        _, first = pages(c, dumpset, limit=100)
        again, _ = pages(c, dumpset, first["cursor"])
        assert again == []  # nothing indexed since (and the cursor is older than a minute)
        ds = DumpSet.open(dumpset)
        oldest, newer = ds.files()[0], ds.files()[1]
        os.utime(newer.index)  # indexed again, now
        ds.delete(oldest)
        files, last = pages(c, dumpset, first["cursor"])
    assert [f["name"] for f in files] == [newer.name]
    assert oldest.name not in last["names"] and newer.name in last["names"]


def test_catalogue_refusals(world, served, dumpset):
    with served.client(world.restricted) as c:
        r = c.get("/api/v1/catalogue", params={"dumpset": str(dumpset)})
        assert r.status_code == 403 and "group-filter" in r.json()["error"]
    with served.client(world.member) as c:
        r = c.get("/api/v1/catalogue")
        assert r.status_code == 400 and "dumpset=" in r.json()["error"]
        r = c.get("/api/v1/catalogue", params={"dumpset": str(dumpset), "since": "x; drop"})
        assert r.status_code == 400 and "cursor" in r.json()["error"]
    with served.client() as c:
        assert c.get("/api/v1/catalogue", params={"dumpset": str(dumpset)}).status_code == 401
