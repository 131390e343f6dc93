"""Legal holds (index/holds.py): which files a hold covers, its file format, and that neither a
damaged file nor npcaprepair can make held data deletable."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from dumpsets import BASE_NS, make_dumpset
from recorderproc import tool

from pcapvault.index import compressed
from pcapvault.index.dumpset import StoredFile
from pcapvault.index.errors import FormatError
from pcapvault.index.holds import (
    HoldError,
    HoldWatcher,
    holds_path,
    load_holds,
    place_hold,
    release_hold,
)
from pcapvault.recorder.budget import DiskBudget, Limit

MS = 1_000_000
# A hold whose begin_ns is given (bytes, %-formatted), the rest as written.
HOLD = (b'{"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": [{"id": "h1", '
        b'"end_ns": 5, "reason": "r", "user": "u", "created_ns": 1, "files": [], '
        b'"begin_ns": %s')


def rel(ds, sf: StoredFile) -> str:
    return sf.pcap.relative_to(ds.root).as_posix()


def test_a_hold_names_the_files_overlapping_its_window_and_holds_only_them(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=4)  # file f: BASE + f*500ms .. + 490ms
    files = ds.files()
    # From the middle of file 1 to the very first packet of file 2 (END is exclusive).
    h = place_hold(ds, BASE_NS + 700 * MS, BASE_NS + 1000 * MS + 1, "incident 42", "alice")
    assert h.files == (rel(ds, files[1]), rel(ds, files[2]))
    assert (h.reason, h.user, h.id) == ("incident 42", "alice", "h1")
    hs = load_holds(ds)
    assert hs.list() == [h]
    assert [hs.holds(sf) for sf in files] == [False, True, True, False]
    # A window between two files' packets (the gap after file 1's last one) holds nothing.
    gap = place_hold(ds, BASE_NS + 995 * MS, BASE_NS + 999 * MS, "gap", "bob")
    assert gap.files == ()
    assert gap.id == "h2"


def test_release_removes_one_hold_and_ids_are_never_reused(tmp_path):
    ds = make_dumpset(tmp_path / "ds")
    first = ds.files()[0]
    a = place_hold(ds, BASE_NS, BASE_NS + 1, "a", "u")
    b = place_hold(ds, BASE_NS, BASE_NS + 1, "b", "u")
    assert release_hold(ds, a.id) == a
    assert load_holds(ds).holds(first)  # b still holds it
    assert release_hold(ds, b.id) == b
    assert not load_holds(ds).holds(first)
    assert place_hold(ds, BASE_NS, BASE_NS + 1, "c", "u").id == "h3"
    with pytest.raises(HoldError, match="no hold 'h1'.*npcapmanage holds"):
        release_hold(ds, "h1")


def test_files_recorded_or_compressed_after_the_hold_are_held(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=2)
    place_hold(ds, BASE_NS + 2000 * MS, BASE_NS + 3000 * MS, "ongoing", "u")
    assert load_holds(ds).list()[0].files == ()
    later = make_dumpset(tmp_path / "more", nfiles=6).files()[5]  # BASE + 2.5 s
    assert load_holds(ds).holds(later)
    first = ds.files()[0]
    held = place_hold(ds, BASE_NS, BASE_NS + 1, "x", "u")
    assert held.files == (rel(ds, first),)
    # Compression renames the pcap to .pcap.zst: it stays held by name.
    zst = StoredFile(first.first_ns, first.pcap.with_name(first.pcap.name + compressed.SUFFIX))
    assert load_holds(ds).holds(zst, last_ns=BASE_NS + 490 * MS)


@pytest.mark.parametrize("content", [
    b'{"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": [{"id": "h1"',
    b"",
    b'{"format": "something-else", "version": 1}',
    b'{"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": [{"id": "h1"}]}',
    b'{"format": "pcapvault-holds", "version": 2, "next_id": 1, "holds": []}',
    # OverflowError (int of inf), RecursionError, and values int() took silently
    HOLD % b'1e400' + b'}]}',
    b'{"format": "pcapvault-holds", "version": 1, "next_id": 1e400, "holds": []}',
    b'{"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": '
    + b"[" * 100000 + b"]" * 100000 + b"}",
    HOLD % b'"5"' + b'}]}',
    HOLD % b'5.5' + b'}]}',
    HOLD % b'-1' + b'}]}',
    b'{"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": 5}',
    b'{"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": [5]}',
    b'[]',
])
def test_a_damaged_or_newer_holds_file_is_an_error_never_no_holds(tmp_path, content):
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    holds_path(ds).write_bytes(content)
    with pytest.raises(FormatError, match="holds"):
        load_holds(ds)
    with pytest.raises(FormatError):
        HoldWatcher(ds).current()
    with pytest.raises(FormatError):  # nor is it overwritten by the next hold
        place_hold(ds, BASE_NS, BASE_NS + 1, "x", "u")
    assert holds_path(ds).read_bytes() == content
    # The running recorder's budget holds everything meanwhile (it caught FormatError only).
    keep = DiskBudget(ds, Limit("1G", bytes=1 << 30), 1 << 20).keep()
    assert keep(ds.files()[0])


def test_the_watcher_sees_holds_placed_and_released_by_another_process(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    w = HoldWatcher(ds)
    sf = ds.files()[0]
    assert not w.current().holds(sf)
    h = place_hold(ds, BASE_NS, BASE_NS + 1, "x", "u")
    assert w.current().holds(sf)
    same = w.current()
    assert w.current() is same  # unchanged file: not read again
    release_hold(ds, h.id)
    assert not w.current().holds(sf)


def test_the_holds_file_is_documented_json_owned_like_the_dump_set(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    os.chown(ds.root, 65534, 65534)
    h = place_hold(ds, BASE_NS, BASE_NS + 1, "x", "u")
    st = holds_path(ds).stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65534, 65534, 0o640)
    doc = json.loads(holds_path(ds).read_text())
    assert doc == {"format": "pcapvault-holds", "version": 1, "next_id": 2, "holds": [{
        "id": "h1", "begin_ns": BASE_NS, "end_ns": BASE_NS + 1, "reason": "x", "user": "u",
        "created_ns": h.created_ns, "files": list(h.files)}]}


def test_holds_survive_npcaprepair(tmp_path):
    ds = make_dumpset(tmp_path / "ds")
    place_hold(ds, BASE_NS, BASE_NS + 1, "x", "u")
    before = holds_path(ds).read_bytes()
    os.unlink(ds.files()[1].index)  # something for repair to do
    r = subprocess.run([tool("npcaprepair"), str(ds.root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "index" in r.stdout
    assert holds_path(ds).read_bytes() == before
    assert load_holds(ds).holds(ds.files()[0])
