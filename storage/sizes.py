"""Byte sizes as people write them: one parser (`compute.memory_budget`) and one formatter (disk space,
store sizes, memory needs). Standard library only: the config schema uses it without heavy imports."""

from __future__ import annotations

import re

_SIZE = re.compile(r"([0-9.eE+-]*)([a-zA-Z]*)")
_UNITS = {"": 1, "b": 1} | {prefix + suffix: base ** power for power, prefix in enumerate("kmgtp", start=1)
                            for suffix, base in (("", 1000), ("b", 1000), ("i", 1024), ("ib", 1024))}


def _bytes(text: str) -> int:
    match = _SIZE.fullmatch(text.replace(" ", ""))
    if match is None or match[2].lower() not in _UNITS:
        raise ValueError(text)
    return int(float(match[1] or 1) * _UNITS[match[2].lower()])


def parse_size(size: str | int) -> int:
    """'2GiB' -> 2147483648, '512MB' -> 512000000: dask's units (kB, MB, ... decimal; KiB, MiB, ... binary;
    any case, spaces ignored), without importing dask; plain integers are bytes."""
    try:
        value = size if isinstance(size, int) else _bytes(str(size))
    except ValueError:
        raise ValueError(f"memory_budget: not a memory size: {size!r} (use e.g. '512MiB', '2GiB')") from None
    if value <= 0:
        raise ValueError(f"memory_budget must be positive, got {size!r}")
    return value


def format_size(n: float) -> str:
    """Bytes in binary units, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
