"""results.nc: the matrices and analyses as one xarray Dataset."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import xarray as xr

from storage import STDERR_SUFFIX
from tasks.report.data import ReportData
from tasks.report.summary import plain


def _netcdf_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(plain(v))
            for k, v in attrs.items()}


def _prefixed(ds: xr.Dataset, prefix: str) -> xr.Dataset:
    names = {n: f"{prefix}__{n}" for n in list(ds.variables) + list(ds.dims)}
    ds = ds.rename(names)
    for var in ds.variables.values():
        var.attrs = _netcdf_attrs(var.attrs)
    return ds.assign_attrs({})


def results_dataset(data: ReportData) -> xr.Dataset:
    """One Dataset for xarray users: `similarity_<name>__cka` etc. and `<analysis>__<var>`, names
    prefixed so different site lists never clash. Attrs JSON-encoded where not scalar."""
    parts = [_prefixed(da.to_dataset(name="cka" if not n.endswith(STDERR_SUFFIX) else "stderr"), f"similarity_{n}")
             for n, da in data.similarity.items()]
    parts += [_prefixed(ds, name) for name, ds in data.analyses.items()]
    merged = xr.merge(parts, combine_attrs="drop") if parts else xr.Dataset()
    return merged.assign_attrs(_netcdf_attrs({"run": data.run, "store": data.store_url}))
