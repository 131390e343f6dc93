"""The dump-set layout: markers, versions, and finding files by time through the timeline."""

from __future__ import annotations

import json

import pytest
from dumpsets import BASE_NS, make_dumpset

from pcapvault.index import timeline
from pcapvault.index.dumpset import DumpSet, file_name, parse_name
from pcapvault.index.errors import DumpSetError


def test_names_round_trip():
    assert file_name(1_763_737_200_123_456_789) == "1763737200.123456"
    assert parse_name("1763737200.123456.pcap") == 1_763_737_200_123_456_000
    assert parse_name("1763737200.123456.pcap.idx") == 1_763_737_200_123_456_000
    assert parse_name("notes.txt") is None and parse_name("12.34.pcap") is None


def test_open_by_dumpset_or_timeline(tmp_path):
    ds = make_dumpset(tmp_path / "ds")
    assert DumpSet.open(ds.timeline).root == ds.root
    assert DumpSet.open(tmp_path / "ds").timeline == ds.timeline


@pytest.mark.parametrize("which", ["dumpset", "timeline"])
def test_newer_version_is_refused(tmp_path, which):
    ds = make_dumpset(tmp_path / "ds", nfiles=1)
    marker = ds.root / ".pcapvault" if which == "dumpset" else ds.timeline / timeline.MARKER
    meta = json.loads(marker.read_text())
    meta["version"] = 2
    marker.write_text(json.dumps(meta))
    with pytest.raises(DumpSetError, match="version 2 is not supported"):
        DumpSet.open(ds.timeline if which == "timeline" else ds.root)


def test_not_a_dumpset(tmp_path):
    with pytest.raises(DumpSetError, match="does not exist"):
        DumpSet.open(tmp_path / "nope")
    with pytest.raises(DumpSetError, match="not a pcapvault dump set"):
        DumpSet.open(tmp_path)
    (tmp_path / ".pcapvault").write_text("{broken")
    with pytest.raises(DumpSetError, match="damaged"):
        DumpSet.open(tmp_path)


def test_files_in_window_uses_first_packet_names(tmp_path):
    # Three files of 0.5 s each (50 packets, 10 ms apart), back to back.
    ds = make_dumpset(tmp_path / "ds", nfiles=3, per_file=50)
    names = [sf.name for sf in ds.files()]
    sec = 10**9

    def win(b: float, e: float) -> list[str]:
        return [sf.name for sf in ds.files_in_window(BASE_NS + int(b * sec),
                                                     BASE_NS + int(e * sec))]

    assert win(0, 3) == names
    # Inside the second file: it is found, the third (starting later) is not.
    inside = win(0.7, 0.8)
    assert names[1] in inside and names[2] not in inside
    # After the last file's start: the last file is open-ended, so it may hold the window.
    assert win(2.6, 3) == names[2:]
    # Long before the first packet (beyond the one-second slack): nothing.
    assert win(-100, -50) == []
    # Found through links in the timeline, never through the storage directories.
    assert all(ds.timeline in sf.pcap.parents
               for sf in ds.files_in_window(0, 2**62))


def test_two_files_starting_in_the_same_microsecond_get_two_names(tmp_path):
    """A SIGUSR1 right after a packet: the next file's first packet may fall in the same
    microsecond. Both are kept, and both are found by a window around them."""
    ds = DumpSet.create(tmp_path / "ds", interface="t0", linktype=1, snaplen=1536,
                        nanosecond=True)
    first = 1_700_000_000_123_456_100
    placed = []
    for i in range(3):
        tmp = ds.temp_path(i)
        tmp.write_bytes(b"x")
        sf = ds.place(tmp, first + 200 * i)  # three first packets within one microsecond
        ds.link(sf)
        placed.append(sf)
    names = [sf.name for sf in placed]
    assert len(set(names)) == 3 and names == sorted(names)
    assert [sf.pcap.read_bytes() for sf in placed] == [b"x"] * 3
    # A window ending just after the last first packet still finds the file whose name was
    # moved past it.
    found = ds.files_in_window(first, first + 500)
    assert [sf.name for sf in found] == names
