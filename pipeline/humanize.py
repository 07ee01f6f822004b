"""Sizes and durations for people: the one formatter of each (irgl plan, irgl publish), and the size parser of
`--max-size`."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
    "tb": 10**12, "p": 10**15, "pb": 10**15, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}  # fmt: skip


def format_size(nbytes: float | None) -> str:
    """Decimal units, one decimal: `812.4 GB`, `1,234.5 TB`, `512 B`; None (not known) is `n/a`."""
    if nbytes is None:
        return "n/a"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:.0f} B"


def parse_size(text: str) -> int:
    """Bytes from a human size: `300GB`, `1.5TB`, `500 GiB`, `300000000000`: a number with an optional unit (B, kB,
    MB, GB, TB, PB decimal; KiB ... PiB binary; case-insensitive; `1,000` and `1_000` allowed). ValueError if not."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", text.replace(",", "").replace("_", ""))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r}: expected a size such as 300GB, 1.5TB, 500GiB or a number of bytes")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


def format_duration(seconds: float | None) -> str:
    """`45 s`, `90 min`, `5.2 h`, `3.1 days`; None (not known) is `n/a`."""
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
