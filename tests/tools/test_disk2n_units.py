"""disk2n's pieces without a network: schedules, the timing-error histogram, playlists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pcapvault.tools.replay_pace import NS, Pace, Schedule, TimingErrors
from pcapvault.tools.replay_source import InputError, read_playlist
from pcapvault.tools.replay_tx import TransmitError, TxRing, max_frame_len


def chunks(s: Schedule, ts: list[int], lengths: list[int] | None = None,
           cut: int = 2) -> list[int]:
    """Schedule `ts` in two calls, as the replay does chunk by chunk."""
    t = np.array(ts, np.int64)
    n = np.array(lengths or [100] * len(ts), np.int64)
    return np.concatenate([s.times(t[:cut], n[:cut]), s.times(t[cut:], n[cut:])]).tolist()


def test_original_timing_keeps_gaps_across_chunks():
    s = Schedule(Pace())
    base = 1_700_000_000 * NS
    assert chunks(s, [base, base + 10, base + 30, base + 1000]) == [0, 10, 30, 1000]


def test_steps_back_in_time_go_right_after_the_previous_frame():
    s = Schedule(Pace())
    assert chunks(s, [100, 200, 150, 260]) == [0, 100, 100, 160]


def test_segments_start_right_after_the_previous_one():
    s = Schedule(Pace())
    assert s.times(np.array([5_000, 6_000]), np.array([1, 1])).tolist() == [0, 1000]
    s.new_segment()  # a capture from years before: no negative wait, no years of waiting
    assert s.times(np.array([10, 510]), np.array([1, 1])).tolist() == [1000, 1500]


def test_speed_and_max_gap():
    s = Schedule(Pace(speed=4))
    assert chunks(s, [0, 400, 4000, 4400]) == [0, 100, 1000, 1100]
    s = Schedule(Pace(max_gap_ns=1000))
    assert chunks(s, [0, 10, 60 * NS, 60 * NS + 5]) == [0, 10, 1010, 1015]


def test_rate_schedules():
    s = Schedule(Pace(pps=4))
    assert chunks(s, [9, 3, 7, 1, 0]) == [0, NS // 4, NS // 2, 3 * NS // 4, NS]
    s = Schedule(Pace(mbps=8))  # 1 byte per microsecond
    assert chunks(s, [0, 0, 0, 0], [100, 1000, 10, 10]) == [0, 100_000, 1_100_000, 1_110_000]


def test_timing_errors_quantiles_within_one_percent():
    rng = np.random.default_rng(3)
    errors = rng.lognormal(9, 2, 100_000).astype(np.int64)
    h = TimingErrors()
    for part in np.array_split(errors, 7):
        h.add(part)
    for q in (0.5, 0.99):
        exact = np.quantile(errors, q, method="inverted_cdf")
        assert abs(h.quantile(q) - exact) <= 0.01 * exact + 1
    assert h.max == errors.max() and h.n == len(errors)
    assert "median" in h.summary() and TimingErrors().summary() == "timing error n/a"


def test_playlist(tmp_path):
    (tmp_path / "sub").mkdir()
    pl = tmp_path / "sub" / "list.txt"
    pl.write_text("# incident 42\n\n  a.pcap  \n/abs/b.pcap\n../c.pcap\n")
    assert read_playlist(pl) == [tmp_path / "sub" / "a.pcap", Path("/abs/b.pcap"),
                                 tmp_path / "sub" / "../c.pcap"]
    pl.write_text("# nothing\n")
    with pytest.raises(InputError, match="names no pcap"):
        read_playlist(pl)
    with pytest.raises(InputError, match="cannot read playlist"):
        read_playlist(tmp_path / "missing.txt")
    for binary in (b"a.pcap\nb\x00.pcap\n", b"\xd4\xc3\xb2\xa1"):
        pl.write_bytes(binary)
        with pytest.raises(InputError, match="not a text playlist"):
            read_playlist(pl)


def test_frame_limits_follow_the_kernel():
    assert max_frame_len(1500, False) == 1514
    assert max_frame_len(1500, True) == 1518
    with pytest.raises(TransmitError, match="unknown interface 'nosuch0'"):
        TxRing("nosuch0")
