"""Crafted and damaged files in a dump set: the seeded mutation fuzzer (tests/fuzzdumpset.py)
in a bounded run, and the defects it found, each reduced to a test of its own.

The rule every reader is held to: exit 0 with exactly the packets tcpdump selects from the
same pcaps, or a non-zero exit whose messages are one line each (3: incomplete, said so);
never a traceback, a hang, or memory a length field claims."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from extract_helpers import NS, SYNTH_START, epoch, synthetic_dumpset, tcpdump_window
from fuzzdumpset import fuzz, make_pristine, pcap_records, stored
from recorderproc import tool

B, E = SYNTH_START, SYNTH_START + 3600 * NS
HOST = "host 10.0.1.3"

pytestmark = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not found")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synthetic_dumpset(tmp_path_factory.mktemp("synth") / "ds")


def copy(synth, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the synthetic dump set and its pcaps (stored files, in time order)."""
    root = tmp_path / "ds"
    shutil.copytree(synth[0], root, symlinks=True)
    return root, [root / p.relative_to(synth[0]) for p in synth[1]]


def npcapextract(root: Path, expr: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("npcapextract"), "-t", str(root), "-b", epoch(B), "-e", epoch(E),
                           "-f", expr, "-O"], capture_output=True, timeout=120)


# Mutations 8, 17 and 78 of seeds 1 and 2: a pcap's global header damaged. libpcap refuses
# a major version other than 2, a minor one above 4, an unknown magic; mutation 40 of seed 2:
# a link type (0) tcpdump reads the records as, where the index and the filter read Ethernet;
# mutation 95 of seed 3: a snapshot length (64) below the records' lengths, which tcpdump cuts
# the records to, where the index has them whole.
@pytest.mark.parametrize("at, fmt, value", [(4, "<H", 0x7FFF), (6, "<H", 0xFFFF),
                                            (6, "<H", 5), (0, "<I", 0xA1B27C4D),
                                            (20, "<I", 0), (16, "<I", 64)])
@pytest.mark.parametrize("expr", ["", HOST])
def test_a_pcap_header_tcpdump_refuses_skips_the_file(synth, tmp_path, at, fmt, value, expr):
    """The host query's fast path read the records of such a file by its index and answered
    exit 0 (the engine skipped it, exit 3); every reader took a version 2.5 to 2.65535 for
    2.4, which tcpdump refuses; and the engine read a file of another link type as the dump
    set's, where tcpdump selects other packets. Both paths now skip the file and say so."""
    root, files = copy(synth, tmp_path)
    damaged = files[1]
    with open(damaged, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))
    r = npcapextract(root, expr)
    assert r.returncode == 3, r.stderr
    assert f"{damaged.name}: unreadable, skipped".encode() in r.stderr, r.stderr
    got, whole = pcap_records(r.stdout)
    assert whole
    want = tcpdump_window([f for f in files if f != damaged], expr, B, E)
    assert got == want and want


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The fuzzer's small dump sets: plain and compressed, the same packets."""
    return make_pristine(tmp_path_factory.mktemp("pristine"))


def test_a_seek_table_entry_one_byte_short_is_not_a_cut_file(pristine, tmp_path):
    """Mutation 18 of seed 1: the last frame's seek-table entry one byte short. The reader
    took the file as one byte shorter, and extraction dropped its last record as past the
    end of the file, exit 0; now that frame is damage, reported (exit 3)."""
    root = tmp_path / "ds"
    shutil.copytree(pristine["zst"], root, symlinks=True)
    victim = stored(root, ".pcap.zst")[1]
    data = bytearray(victim.read_bytes())
    frames = struct.unpack_from("<I", data, len(data) - 9)[0]
    at = len(data) - 9 - 8 + 4  # the last entry's decompressed size (no checksums)
    assert frames and not data[-5] & 0x80
    struct.pack_into("<I", data, at, struct.unpack_from("<I", data, at)[0] - 1)
    victim.write_bytes(bytes(data))
    r = npcapextract(root, "")
    assert r.returncode == 3, r.stderr
    assert b"damaged compressed data" in r.stderr and victim.name.encode() in r.stderr


@pytest.mark.parametrize("marker, key, value", [
    (".pcapvault", "timeline", None), (".pcapvault", "timeline", 5),
    (".pcapvault", "files_per_dir", "x"), (".pcapvault", "linktype", "x"),
    (".pcapvault", "snaplen", []), (".pcapvault", "precision", "ms"),
    ("timeline/.pcapvault-timeline", "dumpset", 5),
    ("timeline/.pcapvault-timeline", "dumpset", None),
])
def test_a_marker_field_of_another_type(pristine, tmp_path, marker, key, value):
    """Mutation 50 of seed 3 and its kind: a marker's field of another type made every
    reader fail with a traceback (TypeError, ValueError, KeyError); one line now."""
    root = tmp_path / "ds"
    shutil.copytree(pristine["plain"], root, symlinks=True)
    meta = json.loads((root / marker).read_text())
    meta[key] = value
    (root / marker).write_text(json.dumps(meta))
    for argv in ([tool("npcapextract"), "-t", str(root / "timeline"), "-b", epoch(B), "-e",
                  epoch(E), "-O"], [tool("npcaprepair"), "-n", str(root)]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{marker.split('/')[-1]} is damaged" in lines[0], r.stderr


@pytest.mark.parametrize("where", ["year", "slot", "link"])
def test_names_of_other_digits_and_stray_slots(pristine, tmp_path, where):
    """Seed 1 mutation 26, seed 3 mutation 42 and their kind: a timeline directory or link
    whose name has a digit int() refuses ("²": str.isdigit() takes it) made extraction fail
    with a traceback; a copy of a slot under another minute made it take those files twice.
    Neither is a file of the dump set: the result is tcpdump's over its pcaps."""
    root = tmp_path / "ds"
    shutil.copytree(pristine["plain"], root, symlinks=True)
    slot = root / "timeline/2025/11/21/15/00"
    if where == "year":
        (root / "timeline/\u00b2025").mkdir()
    elif where == "slot":
        shutil.copytree(slot, slot.with_name("13"), symlinks=True)
    else:
        link = next(slot.glob("*.pcap"))
        (slot / ("\u00b2" + link.name[1:])).symlink_to(os.readlink(link))
    r = npcapextract(root, "")
    assert r.returncode == 0, r.stderr
    got, _ = pcap_records(r.stdout)
    assert got == tcpdump_window(stored(root), "", B, E)


def test_fuzz_dumpset(tmp_path):
    """A bounded, seeded run of the fuzzer: 28 mutations, each checked by about 15 runs of
    the tools, under a minute on two cores. Longer runs by hand, with the venv's Python:
    `python tests/fuzzdumpset.py SEED COUNT`."""
    problems = fuzz(20251121, range(28), tmp_path)
    assert not problems, "\n\n".join(problems)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
