"""index/sizes.py: one meaning of a size for every command."""

from __future__ import annotations

import pytest

from pcapvault.index.sizes import SizeError, format_size, human_size, parse_size

KB = 1 << 10
MB = 1 << 20


@pytest.mark.parametrize("text, n", [
    ("1500", 1500), ("64K", 64 * KB), ("256M", 256 * MB), ("256mb", 256 * MB),
    ("1.5GiB", 3 * MB * 512), (" 2 GB ", 2 << 30), ("1T", 1 << 40), ("0.5M", MB // 2),
])
def test_a_size_is_bytes_with_an_optional_binary_unit(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text, needle", [
    ("12XB", "e.g. 500MB"), ("", "e.g. 500MB"), ("-1M", "e.g. 500MB"), ("1e3", "e.g. 500MB"),
    ("0", "above zero"), ("0.0001K", "above zero"),
])
def test_bad_sizes_say_what_to_write(text, needle):
    with pytest.raises(SizeError, match=needle):
        parse_size(text, "-p")


def test_a_bare_number_below_the_minimum_names_the_missing_unit():
    with pytest.raises(SizeError, match=r"at least 16K \(a number without a unit is bytes: "
                                        r"write e.g. 256M\)"):
        parse_size("256", "-p", 16 * KB)
    with pytest.raises(SizeError, match=r"at least 16K$"):
        parse_size("8K", "-p", 16 * KB)
    assert parse_size("16K", "-p", 16 * KB) == 16 * KB


def test_format_size_is_what_parse_size_reads():
    for n in (1, 1500, 16 * KB, MB, 3 << 30, 1 << 40, MB + 1):
        assert parse_size(format_size(n)) == n


def test_human_size_says_binary_units_parse_size_reads_back():
    assert human_size(999) == "999 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(12_900_000) == "12.3 MiB"
    assert human_size(3 << 30) == "3.0 GiB"
    assert parse_size(human_size(5 * MB)) == 5 * MB
