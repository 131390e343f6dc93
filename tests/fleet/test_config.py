"""The fleet file: checked key by key, refused when others may read it; bad input is one line
and exit 2 before any sensor is asked."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from recorderproc import tool

from pcapvault.fleet.config import FleetFileError, load

GOOD = """catalogue = "cat"
[[sensor]]
name = "s1"
url = "https://127.0.0.1:1"
token = "t0ken"
fingerprint = "sha256:{fp}"
"""
FP = ":".join(["AB"] * 32)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_a_good_file(tmp_path):
    c = load(write(tmp_path, GOOD.format(fp=FP)))
    s = c.sensor("s1")
    assert s.fingerprint == bytes([0xAB] * 32) and s.token == "t0ken" and s.ca is None
    assert c.catalogue == str(tmp_path / "cat") and c.retention_days == 30
    assert "t0ken" not in repr(c)  # tokens stay out of logs and tracebacks


@pytest.mark.parametrize("text,mode,needle", [
    (GOOD.format(fp=FP), 0o644, "chmod 600"),
    (GOOD.format(fp="12:34"), 0o600, "64 hex digits"),
    (GOOD.format(fp=FP).replace("https://127.0.0.1:1", "http://10.1.1.1:80"), 0o600,
     "plain http only to a loopback"),
    (GOOD.format(fp=FP).replace("https://", "https://u:p@"), 0o600, "no user or password"),
    (GOOD.format(fp=FP).replace('token = "t0ken"\n', ""), 0o600, "token"),
    (GOOD.format(fp=FP) + "colour = 1\n", 0o600, "unknown key"),
    ('catalogue = "cat"\n', 0o600, "no [[sensor]]"),
    (GOOD.format(fp=FP) + GOOD.format(fp=FP).split("\n", 1)[1], 0o600, "given twice"),
    ("[[sensor", 0o600, "not a TOML"),
    *((GOOD.format(fp=FP).replace("https://127.0.0.1:1", url), 0o600, needle) for url, needle in [
        ("http://localhost.example.com:8080", "plain http only to a loopback"),
        ("http://127.evil.example", "plain http only to a loopback"),
        ("https://h:99999", "give https://HOST:PORT"),
        ("https://h:abc", "give https://HOST:PORT"),
        ("https://[::1", "give https://HOST:PORT"),
        ("https://h:8443/?x=1", "give https://HOST:PORT"),
        ("ftp://h", "give https://HOST:PORT")]),
    (GOOD.format(fp=FP).replace('"cat"', '"http://ch.example:8123"'), 0o600,
     "catalogue: plain http only to a loopback"),
])
def test_bad_files(tmp_path, text, mode, needle):
    with pytest.raises(FleetFileError, match=needle.replace("[", r"\[")):
        load(write(tmp_path, text, mode))


@pytest.mark.parametrize("args,needle", [
    (["conversations", "-b", "-1h", "-e", "now", "-f", "host"], "filter"),
    (["pcap", "-b", "now", "-e", "-1h", "-o", "x.pcapng"], "after END"),
    (["sync", "--sensor", "nope"], "no sensor 'nope'"),
    (["--catalogue", "https://fleet:secret@ch:8443", "sync"], "no user or password"),
    (["--catalogue", "http://ch.example:8123", "sync"], "plain http only to a loopback"),
    (["--catalogue", "https://ch:0", "sync"], "give https://HOST:PORT"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, needle):
    conf = write(tmp_path, GOOD.format(fp=FP))
    r = subprocess.run([tool("npcapfleet"), "--config", str(conf), *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.pcapng").exists()


def test_a_world_readable_file_is_refused_on_the_command_line(tmp_path):
    conf = write(tmp_path, GOOD.format(fp=FP), 0o644)
    r = subprocess.run([tool("npcapfleet"), "--config", str(conf), "sync"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "chmod 600" in r.stderr and r.stderr.count("\n") == 1


def test_an_unreadable_fleet_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(FleetFileError, match="cannot read the fleet file: Is a directory"):
        load(tmp_path)
