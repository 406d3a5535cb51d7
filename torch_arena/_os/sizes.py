"""Byte counts as people write them: ``format_bytes`` for messages, ``parse_bytes`` for settings."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]


def format_bytes(n: int) -> str:
    """``n`` bytes as a short human-readable string (``'32.0 MiB'``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: object, name: str) -> int:
    """A positive byte count from an int, an integral float (``1.5e9``) or a
    string with an optional unit (``"4GiB"``, ``"512 MB"``, ``"1.5e9"``).

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB,
    GiB, TiB, and the bare K, M, G, T) powers of 1024. Raises ValueError
    naming ``name`` and the accepted forms.
    """
    number: float | int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = value if value.is_integer() else None
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match and match.group(2).lower() in _UNITS:
            scaled = float(match.group(1)) * _UNITS[match.group(2).lower()]
            number = scaled if scaled.is_integer() else None
    if number is None or not number > 0 or number >= 1 << 62:
        raise ValueError(
            f"{name} must be a positive number of bytes: an int, an integral float such as "
            f"1.5e9, or a string such as '4GiB' or '512MB'; got {value!r}"
        )
    return int(number)
