"""Sizes written for people ("10G", "512MiB", "1.5TB") to bytes and back.

Binary suffixes (K, M, G, T, P, optionally followed by "iB") are powers of 1024, and the
SI suffixes (kB, MB, GB, TB, PB) powers of 1000, as in coreutils.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from applianced.errors import InvalidArgument

SECTOR_SIZE = 512

_BINARY = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SI = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "PB": 1000**5}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str) -> int:
    """Return the number of bytes that ``text`` stands for; raise InvalidArgument if none."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise InvalidArgument(f"size {text!r} is not a number with an optional unit such as 10G")
    number, unit = match.groups()
    multiplier = _unit_multiplier(unit, text)
    try:
        value = Decimal(number) * multiplier
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise InvalidArgument(f"size {text!r} is not a number") from exc
    if value != value.to_integral_value():
        raise InvalidArgument(f"size {text!r} is not a whole number of bytes")
    return int(value)


def _unit_multiplier(unit: str, text: str) -> int:
    upper = unit.upper()
    if upper in ("B", ""):
        return 1
    if upper.endswith("IB") and upper[:-2] in _BINARY:
        return _BINARY[upper[:-2]]
    if upper in _BINARY:
        return _BINARY[upper]
    # "kB" and "KB" are both read as SI kilobytes, the way people write them.
    if upper in _SI:
        return _SI[upper]
    raise InvalidArgument(f"size {text!r} has an unknown unit {unit!r} (use K, M, G, T, P or KB, MB, …)")


def format_size(size: int) -> str:
    """Write ``size`` bytes with the largest binary unit that keeps it readable."""
    for suffix, multiplier in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= multiplier:
            value = size / multiplier
            return f"{value:.0f} {suffix}" if value == int(value) else f"{value:.2f} {suffix}"
    return f"{size} B"
