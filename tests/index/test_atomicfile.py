"""index/atomicfile.py and its users: a file appears whole or not at all, even on a full disk."""

from __future__ import annotations

import json
import os
import stat

import pytest
from fsutil import fill

from pcapvault.index import timeline
from pcapvault.index.atomicfile import atomic_write, temp_path, write_atomic


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
