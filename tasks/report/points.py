"""Selecting rows of the analyses' long tables: `points(matched, similarity="lin", model_a="vit")`."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import xarray as xr

Table = TypeVar("Table", xr.Dataset, xr.DataArray)


def points(table: Table, **equal: Any) -> Table:
    """The rows of `table` whose coordinates equal the given values, in stored order, along the one
    dimension those coordinates share (`point` for the analyses' long tables, `site` for per-site
    results); `table` itself when nothing is asked."""
    if not equal:
        return table
    dims = {table[name].dims for name in equal}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"coordinates {sorted(equal)} do not share one dimension: {sorted(dims)}")
    (dim,) = dims.pop()
    keep = np.ones(table.sizes[dim], dtype=bool)
    for name, value in equal.items():
        keep &= np.asarray(table[name].values == value)
    return table.isel({dim: np.flatnonzero(keep)})
