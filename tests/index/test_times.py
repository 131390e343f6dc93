"""Local times on the command line around daylight-saving changes, and times out of range.

npcapextract runs with TZ in its environment, over a dump set whose packets span both of
Europe/Berlin's 2025 changes: 2025-03-30 02:00 CET jumps to 03:00 CEST (00:00-02:00 UTC
recorded), 2025-10-26 03:00 CEST goes back to 02:00 CET (00:00-02:00 UTC recorded).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from extract_helpers import NS, build_dumpset, read_pcap_records, synthetic_traffic
from recorderproc import one_line

from pcapvault.index.times import TimeError, parse_time

EXE = [sys.executable, "-m", "pcapvault.extract.cli"]
BERLIN = {**os.environ, "TZ": "Europe/Berlin"}


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()) * NS


SPRING, AUTUMN = utc("2025-03-30T00:00:00"), utc("2025-10-26T00:00:00")


@pytest.fixture(scope="module")
def berlin(tmp_path_factory):
    """(dump set root, packet timestamps): 700 packets over each change's two UTC hours."""
    packets = synthetic_traffic(700, SPRING, seed=3, span_s=7200)
    packets += synthetic_traffic(700, AUTUMN, seed=4, span_s=7200)
    packets = [p for p in packets if p[0] < SPRING + 7200 * NS or p[0] >= AUTUMN]
    packets = [p for p in packets if p[0] < AUTUMN + 7200 * NS]
    ds = build_dumpset(tmp_path_factory.mktemp("dst") / "ds", packets, per_file=100)
    return ds.root, [p[0] for p in packets]


def extract(root: Path, begin: str, end: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, "-t", str(root), "-b", begin, "-e", end, "-O"],
                          capture_output=True, env=BERLIN, timeout=60)


def count(ts: list[int], b: int, e: int) -> int:
    return sum(b <= t < e for t in ts)


def test_times_either_side_of_the_spring_gap_are_exact(berlin):
    root, ts = berlin
    # 01:30 CET is 00:30 UTC, 03:30 CEST is 01:30 UTC: the hour between holds the change.
    r = extract(root, "2025-03-30 01:30:00", "2025-03-30 03:30:00")
    assert r.returncode == 0, r.stderr
    want = count(ts, SPRING + 1800 * NS, SPRING + 5400 * NS)
    assert len(read_pcap_records(r.stdout)) == want > 300


@pytest.mark.parametrize("begin, end, bad", [
    ("2025-03-30 01:30:00", "2025-03-30 02:30:00", "2025-03-30 02:30:00"),
    ("2025-03-30 02:30:00", "2025-03-30 03:30:00", "2025-03-30 02:30:00"),
    ("2025-03-30 01:59:59", "2025-03-30 02:30:00", "2025-03-30 02:30:00"),
    ("2025-03-30 02:00:00.5", "2025-03-30 04:00:00", "2025-03-30 02:00:00.5"),
])
def test_a_time_in_the_spring_gap_is_refused_naming_both_meanings(berlin, begin, end, bad):
    root, ts = berlin
    err = one_line(extract(root, begin, end), 2, prog="npcapextract")
    assert f"local time '{bad}' does not exist" in err and "BEGIN" not in err
    assert "CET +01:00" in err and "CEST +02:00" in err
    choices = re.findall(r"give '([^']+)' \(CET \+01:00\) or '([^']+)' \(CEST \+02:00\)", err)
    assert len(choices) == 1, err
    # Each choice is the reading under one of the two offsets, an hour apart, and is accepted.
    first, second = choices[0]
    assert parse_in_berlin(second) - parse_in_berlin(first) == 3600 * NS
    for choice in choices[0]:
        r = extract(root, choice, "2025-03-30 05:00:00")
        assert r.returncode == 0, r.stderr


def parse_in_berlin(text: str) -> int:
    r = subprocess.run([sys.executable, "-c", "import sys; from pcapvault.index.times import "
                        "parse_time; print(parse_time(sys.argv[1]))", text],
                       capture_output=True, text=True, env=BERLIN, check=True)
    return int(r.stdout)


def test_the_repeated_autumn_hour_is_refused_unless_an_offset_says_which(berlin):
    root, ts = berlin
    err = one_line(extract(root, "2025-10-26 02:00:00", "2025-10-26 02:30:00"), 2,
                   prog="npcapextract")
    assert "local time '2025-10-26 02:00:00' happens twice" in err
    assert ("give '2025-10-26 02:00:00+02:00' (CEST +02:00, the first) or "
            "'2025-10-26 02:00:00+01:00' (CET +01:00, the second)") in err
    for offset, start in (("+02:00", AUTUMN), ("+01:00", AUTUMN + 3600 * NS)):
        r = extract(root, f"2025-10-26 02:00:00{offset}", f"2025-10-26 02:30:00{offset}")
        assert r.returncode == 0, r.stderr
        assert len(read_pcap_records(r.stdout)) == count(ts, start, start + 1800 * NS) > 100
    # Just outside the repeated hour a local time is unique again.
    r = extract(root, "2025-10-26 01:59:59", "2025-10-26 03:00:00")
    assert r.returncode == 0, r.stderr
    assert len(read_pcap_records(r.stdout)) == count(ts, AUTUMN - NS, AUTUMN + 7200 * NS)


@pytest.mark.parametrize("begin", [
    "0001-01-01", "1969-12-31 23:59:59Z", "2025-11-21T15:00:00+24:00",
    "2025-11-21T15:00:00-12:60", "99999999999999999999999", "-999999999d", "9999-12-31",
])
def test_times_out_of_range_are_one_line_errors(berlin, begin):
    root, _ = berlin
    err = one_line(extract(root, begin, "now"), 2, prog="npcapextract")
    assert "out of range" in err or "bad UTC offset" in err


@pytest.mark.parametrize("zone, gap, repeated", [
    ("America/New_York", "2025-03-09 02:30", "2025-11-02 01:30"),
    ("Australia/Lord_Howe", "2025-10-05 02:15", "2025-04-06 01:45"),  # half-hour changes
])
def test_other_zones(monkeypatch, zone, gap, repeated):
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        with pytest.raises(TimeError, match="does not exist"):
            parse_time(gap)
        with pytest.raises(TimeError, match="happens twice"):
            parse_time(repeated)
        assert parse_time(gap[:-5] + "12:00") > 0
    finally:
        monkeypatch.undo()
        time.tzset()
