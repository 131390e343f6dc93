"""recorder/budget.py on a real dump set: limits, oldest-first room, pending files."""

from __future__ import annotations

import os

import pytest

from pcapvault.index.dumpset import DumpSet
from pcapvault.index.sizes import SizeError
from pcapvault.recorder.budget import (
    FIXED_OVERHEAD,
    INDEX_RESERVE,
    BudgetError,
    DiskBudget,
    Limit,
    parse_limit,
)

KB = 1 << 10
MB = 1 << 20
FIRST_NS = 1_763_737_200_000_000_000


def test_limits(tmp_path):
    assert parse_limit("2GB") == Limit("2GB", bytes=2 << 30)
    share = parse_limit("50%")
    st = os.statvfs(tmp_path)
    assert share.resolve(tmp_path) == int(st.f_blocks * st.f_frsize * 0.5)
    for bad, needle in (("0%", "above 0%"), ("101%", "at most 100%"), ("500000", "at least 1M"),
                        ("x%", "above 0%")):
        with pytest.raises(SizeError if "least" in needle else BudgetError, match=needle):
            parse_limit(bad)


def dumpset(root, sizes: list[int]) -> tuple[DumpSet, list[str]]:
    """A real dump set holding one placed, linked pcap per size, one second apart."""
    ds = DumpSet.create(root, interface="t0", linktype=1, snaplen=1536, nanosecond=True)
    names = []
    for i, size in enumerate(sizes):
        tmp = ds.temp_path(i)
        tmp.write_bytes(b"\0" * size)
        sf = ds.place(tmp, FIRST_NS + i * 10**9)
        ds.link(sf)
        names.append(sf.name)
    return ds, names


def test_make_room_deletes_the_oldest_until_a_new_file_fits(tmp_path):
    ds, names = dumpset(tmp_path / "ds", [100 * KB] * 6)
    used = ds.usage()
    reserve = int(100 * KB * (1 + INDEX_RESERVE))
    # Room for the new file once about two and a half files are gone.
    limit = used + reserve + FIXED_OVERHEAD - 250 * KB
    budget = DiskBudget(ds, Limit("x", bytes=limit), 100 * KB)
    after = budget.make_room()
    left = [sf.name for sf in ds.files()]
    assert left == names[3:]  # the three oldest, and only they
    assert budget.deleted_files == 3
    assert after == ds.usage()
    assert after + reserve + FIXED_OVERHEAD <= limit
    assert not list(ds.timeline.rglob(names[0]))  # its link went with it


def test_pending_files_get_room_only_up_to_what_the_indexer_has_in_hand(tmp_path):
    deleted = []
    for pending in (0, 100 * KB, 200 * KB, 10 * MB):
        ds, _ = dumpset(tmp_path / f"ds{pending}", [100 * KB] * 8)
        limit = ds.usage() + int(150 * KB) + FIXED_OVERHEAD
        budget = DiskBudget(ds, Limit("x", bytes=limit), 100 * KB)
        budget.make_room(pending)
        deleted.append(budget.deleted_files)
        assert budget.backlog(pending) == max(0, pending - 200 * KB)
    # Nothing pending: it fits as is. An index's room per pending byte; a backlog beyond the
    # two files in hand (a dead indexer) deletes nothing more.
    assert deleted[0] == 0
    assert 0 < deleted[1] <= deleted[2]
    assert deleted[3] == deleted[2]


def test_a_limit_that_cannot_hold_one_file_is_refused(tmp_path):
    ds, _ = dumpset(tmp_path / "ds", [])
    with pytest.raises(BudgetError, match="cannot hold even one 4194304-byte file"):
        DiskBudget(ds, Limit("4M", bytes=4 * MB), 4 * MB)


def test_free_oldest(tmp_path):
    ds, names = dumpset(tmp_path / "ds", [KB] * 2)
    budget = DiskBudget(ds, Limit("1G", bytes=1 << 30), MB)
    assert budget.free_oldest() and [sf.name for sf in ds.files()] == names[1:]
    assert budget.free_oldest() and ds.files() == []
    assert not budget.free_oldest()
    assert budget.deleted_files == 2
