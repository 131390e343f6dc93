"""index/timeline.py: slots, the UTC directory tree, links, pruning and markers."""

from __future__ import annotations

import calendar
import json
import os

import pytest

from pcapvault.index import timeline
from pcapvault.index.errors import DumpSetError

T = calendar.timegm((2026, 12, 31, 23, 55, 7))  # the last slot of a year


def test_slots_are_ten_utc_minutes_in_n2disk_tree(tmp_path):
    assert timeline.slot_of(T) == calendar.timegm((2026, 12, 31, 23, 50, 0))
    assert timeline.slot_of(timeline.slot_of(T)) == timeline.slot_of(T)
    assert timeline.slot_dir(tmp_path, timeline.slot_of(T)) == tmp_path / "2026/12/31/23/50"
    assert timeline.slot_dir(tmp_path, T + 300) == tmp_path / "2027/01/01/00/00"


def test_pcap_names():
    assert timeline.is_pcap_name("1.2.pcap") and timeline.is_pcap_name("1.2.pcap.zst")
    for n in (".1.2.pcap.part", ".1.2.pcap", "1.2.pcap.idx", "1.2.pcap.zst.idx", "x.txt"):
        assert not timeline.is_pcap_name(n)


def make_slots(root, slots):
    for s in slots:
        timeline.slot_dir(root, s).mkdir(parents=True)


def test_existing_slots_across_year_month_and_day_boundaries(tmp_path):
    step = timeline.SLOT_SECONDS
    slots = [timeline.slot_of(T) - step, timeline.slot_of(T), timeline.slot_of(T) + step,
             calendar.timegm((2027, 2, 28, 12, 0, 0)), calendar.timegm((2025, 1, 1, 0, 0, 0))]
    make_slots(tmp_path, slots)
    (tmp_path / "2026" / "notes").mkdir()  # not a number: not a slot
    (tmp_path / "2026" / "13").mkdir()     # no such month: skipped, not an error
    assert list(timeline.existing_slots(tmp_path, 0, 2**40)) == sorted(slots)
    # A window overlapping a slot's ten minutes finds it, even when starting inside it.
    assert list(timeline.existing_slots(tmp_path, T, T)) == [timeline.slot_of(T)]
    assert list(timeline.existing_slots(tmp_path, slots[0], slots[2] - 1)) == slots[:2]
    assert list(timeline.existing_slots(tmp_path, slots[3] + step, 2**40)) == []
    assert list(timeline.existing_slots(tmp_path / "none", 0, 2**40)) == []


def test_link_is_relative_and_replaces_a_stale_one(tmp_path):
    root, store = tmp_path / "tl", tmp_path / "ds" / "1"
    store.mkdir(parents=True)
    target = store / "1767225307.000000.pcap"
    target.write_bytes(b"pcap")
    slot = timeline.slot_of(T)
    dest = timeline.link(root, slot, target)
    assert dest == timeline.slot_dir(root, slot) / target.name
    assert not os.path.isabs(os.readlink(dest)) and dest.read_bytes() == b"pcap"
    # A link to somewhere else (left by a crash) is replaced, atomically, no .part left.
    dest.unlink()
    dest.symlink_to("/nonexistent")
    timeline.link(root, slot, target)
    assert dest.read_bytes() == b"pcap"
    assert os.listdir(dest.parent) == [target.name]
    # The whole tree moves with the dump set: relative links still resolve.
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    moved = tmp_path.with_name(tmp_path.name + "-moved")
    try:
        assert (moved / dest.relative_to(tmp_path)).read_bytes() == b"pcap"
    finally:
        os.rename(moved, tmp_path)


def test_unlink_frees_and_prunes_empty_directories(tmp_path):
    root = tmp_path / "tl"
    (tmp_path / "f.pcap").write_bytes(b"x")
    (tmp_path / "f.pcap.idx").write_bytes(b"y")
    slot, other = timeline.slot_of(T), timeline.slot_of(T) - 3600
    timeline.link(root, slot, tmp_path / "f.pcap")
    timeline.link(root, slot, tmp_path / "f.pcap.idx")
    timeline.link(root, other, tmp_path / "f.pcap")
    assert timeline.slot_entries(root, slot) == ["f.pcap"]  # the index link is not a pcap
    size = timeline.link_size(root)
    d = timeline.slot_dir(root, slot)
    links = (d / "f.pcap").lstat().st_size + (d / "f.pcap.idx").lstat().st_size
    assert size > links > 0
    assert timeline.unlink(root, slot, "f.pcap") == links
    assert timeline.slot_entries(root, slot) == []
    assert not (root / "2026/12/31/23").exists()  # its hour held nothing else
    assert timeline.slot_dir(root, other).exists()  # the other slot, same day, stays
    assert timeline.unlink(root, slot, "f.pcap") == 0  # already gone: nothing freed
    assert timeline.link_size(root) < size
    timeline.unlink(root, other, "f.pcap")
    assert root.exists() and os.listdir(root) == []  # the root itself is never removed


def test_marker_versions_and_damage(tmp_path):
    root = tmp_path / "tl"
    with pytest.raises(DumpSetError, match="not a pcapvault timeline"):
        timeline.read_marker(root)
    timeline.ensure_marker(root, tmp_path)
    assert timeline.read_marker(root)["dumpset"] == ".."
    timeline.ensure_marker(root, tmp_path)  # again: read, not rewritten
    marker = root / timeline.MARKER
    for content, needle in (("{broken", "unreadable or damaged .*; run npcaprepair"),
                            (json.dumps({"format": "other"}), "not a pcapvault timeline"),
                            (json.dumps({"format": "pcapvault-timeline", "version": 9}),
                             "version 9 is not supported")):
        marker.write_text(content)
        with pytest.raises(DumpSetError, match=needle):
            timeline.ensure_marker(root, tmp_path)
