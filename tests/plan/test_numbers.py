"""Numbers as users type them: suffixes per API.md, one-line errors for everything else."""
from __future__ import annotations

import pytest

from shrink.plan.numbers import format_bytes, parse_bytes, parse_count, parse_rate


@pytest.mark.parametrize("text, value", [
    ("7B", 7_000_000_000), ("7b", 7_000_000_000), (" 7 B ", 7_000_000_000),
    ("350M", 350_000_000), ("1.5T", 1_500_000_000_000), ("6.7B", 6_700_000_000),
    ("125k", 125_000), ("4096", 4096), ("1_000", 1000), ("7e9", 7_000_000_000), ("0.5K", 500),
    ("8GB", 8_000_000_000), ("8G", 8_000_000_000), ("8GiB", 8 * 2**30), ("512KiB", 512 * 1024),
    ("1.5GiB", 3 * 2**29), (".5M", 500_000),
    (4096, 4096), (7e9, 7_000_000_000),
])
def test_count(text, value):
    got = parse_count(text)
    assert got == value and isinstance(got, int)


@pytest.mark.parametrize("text, value", [
    ("8GB", 8 * 10**9), ("8gb", 8 * 10**9), ("8GiB", 8 * 2**30), ("24 GiB", 24 * 2**30),
    ("512KB", 512_000), ("512KiB", 524_288), ("1MiB", 2**20), ("2TB", 2 * 10**12), ("1TiB", 2**40),
    ("1000", 1000), (8 * 2**30, 8 * 2**30), ("0.1GiB", 107_374_182),  # fractions of a byte round
])
def test_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text, value", [
    ("2TB/s", 2e12), ("2039GB/s", 2.039e12), ("1008 GB/s", 1.008e12), ("3.35TB/s", 3.35e12),
    ("17.07GB/sec", 17.07e9), ("2e12", 2e12), ("2TB", 2e12), (936.2e9, 936.2e9),
])
def test_rate(text, value):
    assert parse_rate(text) == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("bad, words", [
    ("0", "must be positive"), ("-7B", "must be positive"), ("0GB", "must be positive"), (0, "must be positive"),
    (-1, "must be positive"), ("", "is not a number"), ("abc", "is not a number"), ("B", "is not a number"),
    ("7 billion", "unknown suffix"), ("7X", "unknown suffix"), ("7BB", "unknown suffix"), ("8GiBs", "unknown suffix"),
    ("1,000", "is not a number"), ("nan", "is not a number"), ("inf", "is not a number"),
    (float("nan"), "finite"), (float("inf"), "finite"), (True, "is not a number"), (None, "is not a number"),
    ([7], "is not a number"), ("1.5", "whole number"), ("1.23456789012B", "whole number"),
    ("8GB/s", "is a rate"),
])
def test_count_rejects(bad, words):
    with pytest.raises(ValueError, match=words) as e:
        parse_count(bad, "params")
    msg = str(e.value)
    assert msg.startswith("params") and "\n" not in msg


def test_bytes_and_rate_reject():
    for parse in (parse_bytes, parse_rate):
        for bad in ("0", "-8GB", "eight", "", "1e999999"):
            with pytest.raises(ValueError):
                parse(bad)
    with pytest.raises(ValueError, match="implausibly large"):
        parse_count("1e999999999999")
    with pytest.raises(ValueError, match="at least one byte"):
        parse_bytes("0.4")
    with pytest.raises(ValueError, match="memory: '24GB/s' is a rate"):
        parse_bytes("24GB/s", "memory")


def test_error_message_names_the_value_and_examples():
    with pytest.raises(ValueError) as e:
        parse_count("seven", "--params")
    assert str(e.value) == "--params: 'seven' is not a number; write e.g. 7B, 350M, 8GB, 8GiB, 1.5T or a plain number"


def test_format_bytes():
    assert format_bytes(13_476_831_232) == "13.48 GB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(2.5e12) == "2.50 TB"
