"""npcapflows as a command: the human table, --json and --csv against the library's result,
options, default dump sets, and one-line errors with their exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from extract_helpers import NS, SYNTH_START, build_dumpset, epoch, synthetic_traffic

from pcapvault.extract.conversations import FIELDS, conversations
from pcapvault.extract.request import Request

EXE = [sys.executable, "-m", "pcapvault.extract.npcapflows"]
B, E = SYNTH_START + 100 * NS, SYNTH_START + 1500 * NS


def flows(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows") / "ds"
    build_dumpset(root, synthetic_traffic(1200, SYNTH_START, seed=21, span_s=1800), per_file=200)
    return root


def window(ds) -> list[str]:
    return ["-t", str(ds), "-b", epoch(B), "-e", epoch(E)]


@pytest.mark.parametrize("by", ["conversation", "endpoint", "port"])
def test_json_is_the_library_table(ds, by):
    r = flows(*window(ds), "-f", "tcp or udp", "--by", by, "-n", "0", "--sort", "packets",
              "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = conversations(Request([str(ds)], B, E, "tcp or udp"), by, "packets")
    assert got["rows"] == want.rows and got["total_rows"] == want.total_rows > 5
    assert (got["packets"], got["bytes"], got["read_packets"], got["by"]) == (
        want.packets, want.bytes, want.read_packets, by)


def test_csv_rows(ds):
    r = flows(*window(ds), "--by", "endpoint", "-n", "7", "--csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    want = conversations(Request([str(ds)], B, E, ""), "endpoint", limit=7).rows
    assert list(rows[0]) == FIELDS["endpoint"] and len(rows) == 7
    assert [{k: int(v) if k != "address" else v for k, v in row.items()} for row in rows] == want


def test_human_table(ds):
    r = flows(*window(ds), "-n", "5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    head, rows, total = lines[0], lines[1:-1], lines[-1]
    assert head.split()[:4] == ["Address", "A", "Port", "A"] and len(rows) == 5
    t = conversations(Request([str(ds)], B, E, ""), limit=5)
    for line, row in zip(rows, t.rows, strict=True):
        assert line.split()[:5] == [row["address_a"], str(row["port_a"] or "-"), "<->",
                                    row["address_b"], str(row["port_b"] or "-")]
    # aligned: the Packets column ends at the same place on every line
    col = head.index("Packets") + len("Packets")
    assert all(line[col - 1] != " " and line[col:col + 1] in (" ", "") for line in rows)
    assert total.startswith(f"{t.total_rows} conversations (the first 5 shown); "
                            f"{t.packets} packets")
    assert "from the indexes, no packet read" in total
    r = flows(*window(ds), "-f", "tcp[13] & 2 != 0", "--by", "port")
    assert r.returncode == 0 and "packets the index could not decide were read" in r.stdout


def test_default_dump_sets_from_configuration(ds, tmp_path):
    conf = tmp_path / "etc"
    conf.mkdir()
    env = {**os.environ, "PCAPVAULT_CONFIG_DIR": str(conf)}
    r = flows("-b", epoch(B), "-e", epoch(E), "--json", env=env)
    assert r.returncode == 2 and "pass -t" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    (conf / "pcapvault.conf").write_text(f"dumpset = {ds}\n")
    r = flows("-b", epoch(B), "-e", epoch(E), "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == json.loads(flows(*window(ds), "--json").stdout)["rows"]


@pytest.mark.parametrize("args,code,words", [
    (["-f", "tcp and"], 2, "bad filter"),
    (["-b", "yesterday-ish"], 2, "cannot parse time"),
    (["-b", "now", "-e", "-1h"], 2, "is after END"),
    (["--by", "hosts"], 2, "hosts"),
    (["-n", "-3"], 2, "-3"),
    (["--json", "--csv"], 2, "contradict"),
    (["-t", "/nonexistent/ds"], 2, "does not exist"),
])
def test_bad_input_one_line(ds, args, code, words):
    base = {"-t": str(ds), "-b": epoch(B), "-e": epoch(E)}
    given = set(args[::2])
    full = [x for k, v in base.items() if k not in given for x in (k, v)] + args
    r = flows(*full)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert words in r.stderr and r.stderr.startswith("npcapflows: error: ")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_no_permission_turns_to_the_service(ds, tmp_path):
    """A dump set this user cannot read: the table is asked of the extraction service (the
    PAM-gated path, tests/extract/service/test_pam_service.py); without one, one line says
    both."""
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                *EXE, "--help"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("root reads everything and user nobody cannot run this Python")
    locked = tmp_path / "locked"
    shutil.copytree(ds, locked, symlinks=True)
    os.chmod(locked, 0o700)
    os.chmod(tmp_path, 0o755)
    pre = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 \
        else []
    r = subprocess.run([*pre, *EXE, "-t", str(locked), "-b", epoch(B), "-e", epoch(E),
                        "--service-socket", str(tmp_path / "no-service.sock")],
                       capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    assert r.returncode == 1, r.stderr
    assert "no permission" in r.stderr and "extraction service is not available" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
