"""Sizes with units."""

import pytest

from applianced.errors import InvalidArgument
from applianced.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("10G", 10 * 1024**3),
        ("10GiB", 10 * 1024**3),
        ("1.5T", 1536 * 1024**3),
        ("64 MiB", 64 * 1024**2),
        ("1GB", 10**9),
        ("2kB", 2000),
        ("4k", 4096),
        ("7B", 7),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "10X", "1.2345B", "ten", "10 G B", "1e3"])
def test_parse_size_refuses_garbage(text):
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_format_size():
    assert format_size(10 * 1024**3) == "10 GiB"
    assert format_size(1536 * 1024**2) == "1.50 GiB"
    assert format_size(100) == "100 B"
