"""Byte sizes: the one parser (memory budgets) and the one formatter (disk space, store sizes)."""

from __future__ import annotations

import pytest

from storage import format_size, parse_size


def test_format_size_uses_binary_units():
    assert [format_size(n) for n in (0, 1023, 1024, 3 * 2**20 // 2, 5 * 2**30, 2**50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 GiB", "1024.0 TiB"]


def test_parse_size_names_the_setting():
    assert parse_size("1.5 KiB") == 1536 and parse_size(7) == 7
    with pytest.raises(ValueError, match="memory_budget: not a memory size: 'lots'"):
        parse_size("lots")
    with pytest.raises(ValueError, match="memory_budget must be positive"):
        parse_size(0)
