"""summary.json's form of an analysis' long table: one entry per pair (or other key), its sites and values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xarray as xr


def per_pair(ds: xr.Dataset, keys: Sequence[str], site_var: str, values: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per distinct `keys` (in stored order): those keys, `sites` (the `site_var` values) and
    each variable of `values` that `ds` holds, as lists."""
    if not ds.sizes.get(ds[values[0]].dims[0], 0):
        return []
    frame = ds.reset_coords().to_dataframe()
    return [dict(zip(keys, key)) | {"sites": group[site_var].tolist()}
            | {v: group[v].tolist() for v in values if v in group}
            for key, group in frame.groupby(list(keys), sort=False)]
