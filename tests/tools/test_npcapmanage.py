"""npcapmanage hold / release / holds: the command line over index/holds.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from dumpsets import BASE_NS, make_dumpset
from recorderproc import one_line, tool

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.holds import holds_path, load_holds


def manage(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([tool("npcapmanage"), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == code, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    if code:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("npcapmanage: error: "), r.stderr
    return r


def test_hold_list_and_release(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=4)
    files = ds.files()
    # npcapextract's time formats: epoch seconds, ISO 8601 with Z.
    r = manage("hold", "-t", str(ds.root), "-b", "1763737000.6", "-e",
               "2025-11-21T14:56:41.2Z", "--reason", "case 4711")
    assert "hold h1 placed" in r.stdout and "2 file(s) held" in r.stdout
    hs = load_holds(ds)
    assert [hs.holds(sf) for sf in files] == [False, True, True, False]
    h = hs.list()[0]
    assert (h.begin_ns, h.end_ns) == (BASE_NS + 600_000_000, BASE_NS + 1_200_000_000)
    assert h.user  # the caller's login name
    out = manage("holds", "-t", str(ds.root)).stdout.splitlines()
    assert out[0].split()[:4] == ["ID", "BEGIN", "(UTC)", "END"]
    assert out[1].startswith("h1 ") and out[1].endswith("case 4711")
    doc = json.loads(manage("holds", "-t", str(ds.root), "--json").stdout)
    assert doc[0]["id"] == "h1" and doc[0]["files"] == list(h.files)
    assert doc[0]["dumpset"] == str(ds.root) and doc[0]["reason"] == "case 4711"
    manage("hold", "-t", str(ds.root), "-b", "-1h", "-e", "now", "--reason", "recent")
    assert "released" in manage("release", "h1", "-t", str(ds.root)).stdout
    assert [h.id for h in load_holds(ds).list()] == ["h2"]
    assert not any(load_holds(ds).holds(sf) for sf in files)
    manage("release", "h2", "-t", str(ds.root))
    assert manage("holds", "-t", str(ds.root)).stdout.strip() == "no holds"
    assert json.loads(manage("holds", "-t", str(ds.root), "--json").stdout) == []


def test_bad_input_is_one_line_and_the_right_exit_status(tmp_path):
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    t = ("-t", str(ds.root))
    manage("hold", *t, "-b", "yesterday", "-e", "now", "--reason", "x", code=2)
    manage("hold", *t, "-b", "now", "-e", "-1h", "--reason", "x", code=2)
    manage("hold", *t, "-b", "-1h", "-e", "-1h", "--reason", "x", code=2)
    manage("hold", *t, "-b", "-1h", "-e", "now", code=2)  # no reason
    manage("hold", *t, "-b", "-1h", "-e", "now", "--reason", " ", code=1)
    manage("hold", "-t", str(tmp_path / "nope"), "-b", "-1h", "-e", "now", "--reason", "x",
           code=1)
    r = manage("release", "h9", *t, code=1)
    assert "no hold 'h9'" in r.stderr
    holds_path(ds).write_text("{ not json")
    r = manage("holds", *t, code=1)
    assert "damaged" in r.stderr
    assert holds_path(ds).read_text() == "{ not json"


@contextmanager
def nobodys_dumpset() -> Iterator[DumpSet]:
    """A dump set owned by nobody (65534), under a world-traversable parent: the account
    npcapmanage becomes must reach it."""
    base = Path(tempfile.mkdtemp(prefix="pv-hold-", dir="/tmp"))
    try:
        base.chmod(0o755)
        ds = make_dumpset(base / "ds", nfiles=1)
        (ds.root / ".links.lock").unlink()  # made by npcapmanage, as the owner
        for dirpath, dirs, files in os.walk(ds.root):
            for n in [*dirs, *files]:
                os.lchown(os.path.join(dirpath, n), 65534, 65534)
        os.chown(ds.root, 65534, 65534)
        yield ds
    finally:
        shutil.rmtree(base)


def test_root_writes_the_holds_as_the_dump_sets_owner():
    with nobodys_dumpset() as ds:
        manage("hold", "-t", str(ds.root), "-b", "-1h", "-e", "now", "--reason", "x")
        for p in (holds_path(ds), ds.root / ".links.lock"):
            assert p.stat().st_uid == 65534, p


def test_root_reads_the_holds_as_the_dump_sets_owner():
    """`holds` never dropped privileges (and `release` read before dropping): the owner's hard
    link to a file only root may read was read, and listed, as root."""
    with nobodys_dumpset() as ds:
        secret = ds.root.parent / "secret"
        secret.write_text(json.dumps({"format": "pcapvault-holds", "version": 1, "next_id": 2,
                                      "holds": [{"id": "h1", "begin_ns": 1, "end_ns": 2,
                                                 "reason": "root's secret", "user": "u",
                                                 "created_ns": 1, "files": []}]}))
        secret.chmod(0o600)
        os.link(secret, holds_path(ds))
        r = manage("holds", "-t", str(ds.root), code=1)
        assert "root's secret" not in r.stdout and "Permission denied" in r.stderr, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "zero", "symlink"])
def test_a_holds_file_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, kind):
    """A FIFO hung `npcapmanage holds`, /dev/zero (a character device) ran it out of memory,
    a symlink was followed."""
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    p = holds_path(ds)
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "zero":
        os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    else:
        p.symlink_to("/dev/zero")
    r = manage("holds", "-t", str(ds.root), code=1)
    assert "cannot read the holds file" in r.stderr, r.stderr
    r = subprocess.run([tool("npcaprepair"), str(ds.root), "-n"], capture_output=True,
                       text=True, timeout=60)
    assert "Traceback" not in r.stderr and r.returncode == 0, r.stderr


@pytest.mark.parametrize("marker", [".pcapvault", "timeline/.pcapvault-timeline"])
def test_a_marker_that_is_a_fifo_is_refused_in_one_line(tmp_path, marker):
    """npcaprepair as root hung reading a `.pcapvault` that was a FIFO."""
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    (ds.root / marker).unlink()
    os.mkfifo(ds.root / marker)
    where = ds.root / marker if marker.startswith(".") else ds.timeline
    r = subprocess.run([tool("npcaprepair"), str(where.parent if marker.startswith(".")
                                                   else where)],
                       capture_output=True, text=True, timeout=60)
    one_line(r, 1, str(ds.root / marker), "not a regular file", prog="npcaprepair")


def test_a_reason_cannot_forge_rows_in_the_listing(tmp_path):
    """A reason with a newline printed a second row, a fake hold h7 that does not exist, and
    an escape sequence went to the terminal of whoever listed the holds; a reason of any size
    was taken."""
    ds = make_dumpset(tmp_path / "ds", nfiles=2)
    t = ("-t", str(ds.root), "-b", "-1h", "-e", "now")
    forged = ("case 1\nh7  2025-11-21T14:56:40.000000000Z  2099-01-01T00:00:00.000000000Z  999"
              "  legal  court order\x1b[2K")
    for reason in (forged, "tab\tseparated", "x" * 1001):
        r = manage("hold", *t, "--reason", reason, code=1)
        assert "printable characters, on one line" in r.stderr, r.stderr
    assert not holds_path(ds).exists()
    manage("hold", *t, "--reason", "x" * 1000)
    # A holds file written by other means is listed with its control characters escaped.
    doc = json.loads(holds_path(ds).read_text())
    doc["holds"][0]["reason"] = forged
    holds_path(ds).write_text(json.dumps(doc))
    out = manage("holds", "-t", str(ds.root)).stdout
    assert len(out.splitlines()) == 2 and "\x1b" not in out, out
    assert out.splitlines()[1].endswith("court order\\x1b[2K")
    assert json.loads(manage("holds", "-t", str(ds.root), "--json").stdout)[0]["reason"] == forged
    r = manage("release", "h1", "-t", str(ds.root))
    assert len(r.stdout.splitlines()) == 1 and "\\n" in r.stdout, r.stdout


def test_holds_placed_and_released_are_audited(tmp_path):
    """A legal hold could be released, and its files then deleted by the budget, with no trace
    of who released it: only `delete` wrote the audit log."""
    ds = make_dumpset(tmp_path / "ds", nfiles=4)
    manage("hold", "-t", str(ds.root), "-b", "1763737000.6", "-e", "1763737001.2",
           "--reason", "case 4711")
    manage("release", "h1", "-t", str(ds.root))
    placed, released = [json.loads(line)
                        for line in (ds.root / "audit.log").read_text().splitlines()]
    for rec in (placed, released):
        assert rec["id"] == "h1" and rec["reason"] == "case 4711" and rec["user"] == "root"
        assert rec["dumpset"] == str(ds.root) and rec["uid"] == 0 and rec["held_files"] == 2
        assert rec["begin"] == "2025-11-21T14:56:40.600000000Z"
        assert rec["placed_by"] == "root"
    assert (placed["event"], released["event"]) == ("hold", "release")
