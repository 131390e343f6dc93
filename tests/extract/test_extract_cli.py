"""npcapextract as a command: merges, pcapng, pipes, options, damaged files and errors."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from extract_helpers import NS, build_dumpset, read_pcap_records, synthetic_traffic

from pcapvault.index.times import TimeError, parse_time

START = 1763737200 * NS + 5_000_000
B, E = str(START // NS - 10), str(START // NS + 7200)
EXE = [sys.executable, "-m", "pcapvault.extract.cli"]


def cmd(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, **kw)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    a = build_dumpset(base / "a", synthetic_traffic(600, START, seed=1, span_s=1500),
                      per_file=150, interface="eth0")
    b = build_dumpset(base / "b", synthetic_traffic(500, START + 777, seed=2, span_s=1500),
                      per_file=150, interface="eth1", nanosecond=False)
    return a, b


def test_merge_in_timestamp_order(two, tmp_path):
    a, b = two
    out = tmp_path / "m.pcap"
    r = cmd("-t", str(a.root), "-t", str(b.root), "-b", B, "-e", E, "-f", "tcp", "-o", str(out))
    assert r.returncode == 0, r.stderr
    recs = read_pcap_records(out.read_bytes())
    ts = [p[0] for p in recs]
    assert ts == sorted(ts)
    one = [read_pcap_records(cmd("-t", str(d.root), "-b", B, "-e", E, "-f", "tcp", "-O").stdout)
           for d in (a, b)]
    assert len(recs) == len(one[0]) + len(one[1])
    assert sorted(recs) == sorted(one[0] + one[1])
    # the nanosecond set keeps nanoseconds, the microsecond one is exact in ns
    assert out.read_bytes()[:4] == bytes.fromhex("4d3cb2a1")


def test_pcapng_interfaces_in_tshark(two, tmp_path):
    a, b = two
    out = tmp_path / "m.pcapng"
    r = cmd("-t", str(a.root), "-t", str(b.root), "-b", B, "-e", E, "-f", "udp", "--pcapng",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    t = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.interface_id",
                        "-e", "frame.interface_name", "-e", "frame.time_epoch"],
                       capture_output=True, text=True, check=True)
    rows = [ln.split("\t") for ln in t.stdout.splitlines()]
    names = {r[0]: r[1] for r in rows}
    assert set(names) == {"0", "1"}
    assert names["0"].startswith("eth0") and names["1"].startswith("eth1")
    ts = [float(r[2]) for r in rows]
    assert ts == sorted(ts)
    n = [len(read_pcap_records(cmd("-t", str(d.root), "-b", B, "-e", E, "-f", "udp",
                                   "-O").stdout)) for d in (a, b)]
    assert len(rows) == sum(n)
    assert sum(1 for r in rows if r[0] == "1") == n[1]


def test_pipe_into_tcpdump_and_tshark(two):
    a, _ = two
    p1 = subprocess.Popen([*EXE, "-t", str(a.root), "-b", B, "-e", E, "-f", "icmp", "-o", "-"],
                          stdout=subprocess.PIPE)
    t = subprocess.run(["tcpdump", "-nr", "-"], stdin=p1.stdout, capture_output=True, text=True)
    p1.stdout.close()
    assert p1.wait() == 0 and t.returncode == 0
    want = read_pcap_records(cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "icmp", "-O").stdout)
    assert len(t.stdout.splitlines()) == len(want) > 0
    p2 = subprocess.Popen([*EXE, "-t", str(a.root), "-b", B, "-e", E, "-f", "icmp", "-O"],
                          stdout=subprocess.PIPE)
    s = subprocess.run(["tshark", "-r", "-"], stdin=p2.stdout, capture_output=True, text=True)
    p2.stdout.close()
    assert p2.wait() == 0 and s.returncode == 0
    assert len(s.stdout.splitlines()) == len(t.stdout.splitlines())


def test_closed_pipe_exits_quietly(two):
    a, _ = two
    r = subprocess.run(f"{' '.join(EXE)} -t {a.root} -b {B} -e {E} -O | head -c 100 >/dev/null",
                       shell=True, capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr == ""


def test_started_without_stdout(two, tmp_path):
    """`>&-`: the file is written and the run ends quietly; `-O` says in one line that there
    is no stdout (the next file or socket opened must not take fd 1 and get the pcap)."""
    a, _ = two
    entry = [sys.executable, "-m", "pcapvault.extract"]  # npcapextract's own entry point
    out = tmp_path / "x.pcap"
    run = ["bash", "-c", 'exec "$@" >&-', "_", *entry, "-t", str(a.root), "-b", B, "-e", E]
    r = subprocess.run([*run, "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""
    assert len(read_pcap_records(out.read_bytes())) == 600
    r = subprocess.run([*run, "-O"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == "npcapextract: error: cannot write the output: Bad file descriptor\n"


def test_outputs_are_the_extracting_users_alone(two, tmp_path):
    """Even under umask 0: a file 0600, a -N directory 0700 (the packets are what the dump
    set's permissions gate)."""
    a, _ = two
    for args, made in ((["-o", str(tmp_path / "x.pcap")], {tmp_path / "x.pcap": 0o600}),
                       (["-N", "300", "-o", str(tmp_path / "n")], {tmp_path / "n": 0o700})):
        r = cmd("-t", str(a.root), "-b", B, "-e", E, *args, umask=0)
        assert r.returncode == 0, r.stderr
        for path, mode in made.items():
            assert stat.S_IMODE(path.stat().st_mode) == mode
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "n").iterdir()} == {0o600}


def test_slice_split_caps_empty(two, tmp_path):
    a, _ = two
    full = read_pcap_records(cmd("-t", str(a.root), "-b", B, "-e", E, "-O").stdout)
    sl = read_pcap_records(cmd("-t", str(a.root), "-b", B, "-e", E, "-s", "40", "-O").stdout)
    assert [(t, w, d[:40]) for t, w, d in full] == sl
    r = cmd("-t", str(a.root), "-b", B, "-e", E, "-N", "100", "-o", str(tmp_path / "n"))
    parts = sorted((tmp_path / "n").iterdir())
    assert r.returncode == 0 and len(parts) == -(-len(full) // 100)
    assert sum((read_pcap_records(p.read_bytes()) for p in parts), []) == full
    r = cmd("-t", str(a.root), "-b", B, "-e", E, "-P", "1", "-o", str(tmp_path / "p"))
    parts = sorted((tmp_path / "p").iterdir())
    assert all(p.stat().st_size <= 1 << 20 for p in parts)
    assert sum((read_pcap_records(p.read_bytes()) for p in parts), []) == full
    capped = read_pcap_records(cmd("-t", str(a.root), "-b", B, "-e", E, "--max-packets", "7",
                                   "-O").stdout)
    assert capped == full[:7]
    capb = cmd("-t", str(a.root), "-b", B, "-e", E, "--max-bytes", "10K", "-O").stdout
    assert len(capb) <= 10240 and read_pcap_records(capb) == full[: len(read_pcap_records(capb))]
    nothing = tmp_path / "none.pcap"
    r = cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "host 203.0.113.1", "-o", str(nothing))
    assert r.returncode == 1 and not nothing.exists()
    r = cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "host 203.0.113.1", "-0", "-o",
            str(nothing))
    assert r.returncode == 1 and nothing.stat().st_size == 24


def test_list_and_verbose(two):
    a, _ = two
    r = cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "host 10.0.1.3", "-l", "-v", text=True)
    assert r.returncode == 0
    listed = [ln.split("\t") for ln in r.stdout.splitlines()]
    total = sum(int(n) for _, n in listed)
    assert total == len(read_pcap_records(
        cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "host 10.0.1.3", "-O").stdout))
    assert all(Path(p).is_file() for p, _ in listed)
    for word in ("files considered", "skipped by timeline", "skipped by summary",
                 "packets read", "matched", "bytes out", "elapsed"):
        assert word in r.stderr


def test_missing_corrupt_index_and_truncated_pcap(tmp_path):
    pk = synthetic_traffic(400, START, seed=5, span_s=300)
    ds = build_dumpset(tmp_path / "d", pk, per_file=100)
    want = read_pcap_records(cmd("-t", str(ds.root), "-b", B, "-e", E, "-f", "tcp",
                                 "-O").stdout)
    files = ds.files()
    files[0].index.unlink()
    files[1].index.write_bytes(b"garbage" * 10)
    r = cmd("-t", str(ds.root), "-b", B, "-e", E, "-f", "tcp", "-O")
    assert r.returncode == 0
    assert read_pcap_records(r.stdout) == want
    err = r.stderr.decode()
    assert "no index" in err and "index unusable" in err and "Traceback" not in err
    # A torn tail: cut the last file in the middle of a record.
    last = files[-1].pcap
    size = last.stat().st_size
    with open(last, "r+b") as f:
        f.truncate(size - 30)
    r = cmd("-t", str(ds.root), "-b", B, "-e", E, "-f", "tcp", "-O")
    got = read_pcap_records(r.stdout)
    assert r.returncode == 0 and "truncated" in r.stderr.decode()
    assert got == want[: len(got)] and len(want) - len(got) <= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["-f", "tcp port eighty"], "bad filter"),
        (["-b", "yesterday-ish"], "cannot parse time"),
        (["-b", "2025-11-21 16:00:00", "-e", "2025-11-21 15:00:00"], "is after END"),
        (["-t", "/nonexistent/dumpset"], "does not exist"),
        (["-t", "/tmp"], "not a pcapvault dump set"),
        (["-o", "x.pcap", "-O"], "contradict"),
        ([], "give -o FILE"),
    ],
)
def test_errors_are_one_line_exit_2(two, args, message):
    a, _ = two
    base = {"-t": str(a.root), "-b": B, "-e": E}
    given = set(args[::2]) if args else set()
    full = [x for k, v in base.items() if k not in given for x in (k, v)] + args
    if "-o" not in args and "-O" not in args and message != "give -o FILE":
        full += ["-O"]
    r = cmd(*full, text=True)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3 and "Traceback" not in r.stderr


def test_no_permission_message(two, tmp_path):
    if os.geteuid() == 0:
        # root reads everything: run the check as nobody through setpriv if available
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
    a, _ = two
    if os.geteuid() == 0:
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                *EXE, "--help"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("root reads everything and user nobody cannot run this Python")
    locked = tmp_path / "locked"
    shutil.copytree(a.root, locked, symlinks=True)
    os.chmod(locked, 0o700)
    os.chmod(tmp_path, 0o755)
    pre = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 \
        else []
    r = subprocess.run([*pre, *EXE, "-t", str(locked), "-b", B, "-e", E, "-O"],
                       capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    assert r.returncode == 2, r.stderr
    assert "no permission" in r.stderr and "Traceback" not in r.stderr


def test_default_dumpsets_from_configuration(two, tmp_path):
    """Without -t the sensor's configured dump sets are used; with none, a one-line hint."""
    a, b = two
    conf = tmp_path / "etc"
    conf.mkdir()
    env = {**os.environ, "PCAPVAULT_CONFIG_DIR": str(conf)}
    r = cmd("-b", B, "-e", E, "-f", "tcp", "-O", env=env, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "pass -t" in r.stderr and str(conf) in r.stderr
    (conf / "pcapvault.conf").write_text(f"dumpset = {a.root}\ndumpset={b.root}\n")
    r = cmd("-b", B, "-e", E, "-f", "tcp", "-O", env=env)
    assert r.returncode == 0, r.stderr
    explicit = cmd("-t", str(a.root), "-t", str(b.root), "-b", B, "-e", E, "-f", "tcp", "-O")
    assert r.stdout == explicit.stdout and len(read_pcap_records(r.stdout)) > 0
    # -t still wins over the configuration
    r = cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "tcp", "-O", env=env)
    assert r.stdout == cmd("-t", str(a.root), "-b", B, "-e", E, "-f", "tcp", "-O").stdout


def test_help_documents_exit_codes():
    r = cmd("--help", text=True)
    assert r.returncode == 0
    assert "Exit status" in r.stdout and "no packet matched" in r.stdout


def test_time_forms():
    now = 1763740800 * NS  # 2025-11-21T16:00:00Z
    assert parse_time("now", now) == now
    assert parse_time("-15m", now) == now - 900 * NS
    assert parse_time("-2h", now) == now - 7200 * NS
    assert parse_time("1763737200.000000001") == 1763737200 * NS + 1
    assert parse_time("2025-11-21T15:00:00Z") == 1763737200 * NS
    assert parse_time("2025-11-21T16:00:00.5+01:00") == 1763737200 * NS + NS // 2
    os.environ["TZ"] = "Europe/Rome"
    import time

    time.tzset()
    try:
        assert parse_time("2025-11-21 16:00:00.25") == 1763737200 * NS + NS // 4
    finally:
        del os.environ["TZ"]
        time.tzset()
    with pytest.raises(TimeError):
        parse_time("21/11/2025")
