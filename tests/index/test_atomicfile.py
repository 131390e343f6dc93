"""index/atomicfile.py and its users: a file appears whole or not at all, even on a full disk."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import numpy as np
import pytest
from fsutil import fill
from recorderproc import one_line, tool

from pcapvault.index import timeline
from pcapvault.index.atomicfile import (
    NotASmallFile,
    atomic_write,
    read_small_file,
    temp_path,
    write_atomic,
)
from pcapvault.index.compressed import compress_file
from pcapvault.index.errors import PcapVaultError
from pcapvault.index.pcapfile import pcap_bytes


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f"
    write_atomic(p, b"old")
    write_atomic(p, b"new content")
    assert p.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["f"]


def test_mode_is_exact_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "f", b"x", mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640


def test_failure_inside_keeps_the_old_file(tmp_path):
    p = tmp_path / "f"
    write_atomic(p, b"old")
    with pytest.raises(KeyboardInterrupt), atomic_write(p) as f:
        f.write(b"half")
        raise KeyboardInterrupt
    assert p.read_bytes() == b"old"
    assert not temp_path(p).exists()


def test_full_disk_keeps_the_old_file_and_no_temporary(small_ext4):
    p = small_ext4 / "f"
    write_atomic(p, b"old")
    fill(small_ext4)
    with pytest.raises(OSError) as e:
        write_atomic(p, os.urandom(1 << 20))
    assert e.value.errno == 28
    assert p.read_bytes() == b"old"
    assert not temp_path(p).exists()


def test_timeline_marker_on_a_full_disk_leaves_no_partial_marker(small_ext4):
    """The marker was written with write_text: a full disk left a half `.part` behind."""
    root = small_ext4 / "timeline"
    root.mkdir()
    fill(small_ext4)
    with pytest.raises(OSError) as e:
        timeline.write_json_atomic(root / timeline.MARKER, {"pad": "x" * (1 << 16)})
    assert e.value.errno == 28
    assert os.listdir(root) == []


def test_timeline_marker_round_trip(tmp_path):
    timeline.ensure_marker(tmp_path / "tl", tmp_path)
    meta = json.loads((tmp_path / "tl" / timeline.MARKER).read_text())
    assert meta["format"] == "pcapvault-timeline"
    assert timeline.read_marker(tmp_path / "tl") == meta


def test_planted_symlink_at_the_temporary_name_is_not_followed(tmp_path):
    """The temporary name is predictable: a symlink planted there by the directory's owner
    made a root writer overwrite the link's target."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    p = tmp_path / "d" / "f"
    p.parent.mkdir()
    temp_path(p).symlink_to(victim)
    with pytest.raises(PcapVaultError, match="remove it and run again"):
        write_atomic(p, b"new content")
    assert victim.read_bytes() == b"precious"
    assert not p.exists()


def test_hard_link_at_the_temporary_name_is_refused(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    p = tmp_path / "f"
    os.link(victim, temp_path(p))
    with pytest.raises(PcapVaultError):
        write_atomic(p, b"new content")
    assert victim.read_bytes() == b"precious"


def test_a_leftover_temporary_of_ours_is_replaced(tmp_path):
    p = tmp_path / "f"
    temp_path(p).write_bytes(b"left by a stop, longer than the new content")
    write_atomic(p, b"new", mode=0o600)
    assert p.read_bytes() == b"new"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f"]


@pytest.mark.parametrize("tool_name", ["npcapindex", "npcapdecompress"])
def test_tools_do_not_write_through_a_planted_temporary_link(tmp_path, tool_name):
    """`npcapindex -i dir/cap.pcap` (and npcapdecompress -o) as root in a user's directory."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = tmp_path / "user"
    d.mkdir()
    cap = d / "cap.pcap"
    cap.write_bytes(pcap_bytes([(1_700_000_000_000_000_000 + i, bytes(60)) for i in range(3)]))
    if tool_name == "npcapindex":
        argv, out = ["-i", str(cap)], d / "cap.pcap.idx"
    else:
        z = d / "cap.pcap.zst"
        compress_file(cap, z)
        argv, out = ["-i", str(z), "-o", str(d / "out.pcap")], d / "out.pcap"
    temp_path(out).symlink_to(victim)
    r = subprocess.run([tool(tool_name), *argv], capture_output=True, text=True)
    one_line(r, None, str(temp_path(out)), prog=tool_name)
    assert victim.read_bytes() == b"precious"
    assert not out.exists()


def test_write_synced_does_not_write_through_a_planted_link(tmp_path):
    """npcapimport's and range deletion's temporaries (tools/rangedelete.write_synced)."""
    from pcapvault.tools.rangedelete import write_synced

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    tmp = tmp_path / ".import-1-0.pcap.part"
    tmp.symlink_to(victim)
    with pytest.raises(PcapVaultError):
        write_synced(tmp, np.zeros(4, np.uint8), 0o640)
    assert victim.read_bytes() == b"precious"


def test_read_small_file_reads_only_a_small_regular_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    assert read_small_file(p, 100) == b"x" * 100
    with pytest.raises(NotASmallFile, match="larger than 99 bytes"):
        read_small_file(p, 99)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NotASmallFile, match="not a regular file"):
        read_small_file(fifo)  # at once: no writer is waited for
    link = tmp_path / "link"
    link.symlink_to(p)
    with pytest.raises(OSError) as e:
        read_small_file(link)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "none")
