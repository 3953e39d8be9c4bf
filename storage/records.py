"""xarray Datasets in the run store: JSON-safe attributes, MultiIndex-safe writes, and a completion flag
set last so a reader never sees a half-written result."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from storage.errors import StoreError
from storage.store import store_url

COMPLETE = "ckaflow_complete"
MULTIINDEX = "ckaflow_multiindex"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)


def json_safe(value: Any) -> Any:
    """`value` as plain JSON types (numpy scalars/arrays, tuples and sets converted; NaN kept)."""
    return json.loads(json.dumps(value, default=_json_default))


def _is_text(dtype: np.dtype) -> bool:
    return dtype.kind in ("U", "O", "T")


def _as_unicode(values: np.ndarray) -> np.ndarray:
    """Text read back (variable-length strings) as numpy fixed-width unicode, as it was written."""
    return np.array([str(v) for v in values.ravel()], dtype=str).reshape(values.shape)


def _as_objects(values: np.ndarray) -> np.ndarray:
    """Text as Python strings: stored as Zarr v3 variable-length UTF-8 strings (a specified data type)."""
    return np.array([str(v) for v in values.ravel()], dtype=object).reshape(values.shape)


def _encode(ds: xr.Dataset) -> xr.Dataset:
    levels = {dim: list(index.names) for dim, index in ds.indexes.items()
              if isinstance(index, pd.MultiIndex) and dim in ds.dims}
    if levels:
        ds = ds.reset_index(list(levels)).drop_vars(list(levels), errors="ignore")
    ds = ds.copy()
    for name in list(ds.variables):
        variable = ds.variables[name]
        if _is_text(variable.dtype):
            ds[name] = variable.copy(data=_as_objects(np.asarray(variable.values)))
    for name in ds.variables:
        ds.variables[name].attrs = json_safe(dict(ds.variables[name].attrs))
        ds.variables[name].encoding = {}
    ds.attrs = json_safe({**ds.attrs, MULTIINDEX: levels})
    return ds


def write_dataset(root: zarr.Group, path: str, ds: xr.Dataset) -> None:
    """Replace the group at `path` with `ds`; the completion flag is written last."""
    if path in root:
        del root[path]
    _encode(ds).to_zarr(root.store, group=_full(root, path), mode="w", zarr_format=3, consolidated=False)
    root[path].attrs[COMPLETE] = True


def _full(root: zarr.Group, path: str) -> str:
    return f"{root.path}/{path}" if root.path else path


def is_complete(root: zarr.Group, path: str) -> bool:
    return path in root and bool(root[path].attrs.get(COMPLETE))


def read_dataset(root: zarr.Group, path: str, what: str) -> xr.Dataset:
    """The Dataset written at `path` (lazy, dask-backed), MultiIndexes restored; `what` names it in errors."""
    if not is_complete(root, path):
        state = "incomplete" if path in root else "missing"
        raise StoreError(f"{what} is {state} in the run store {store_url(root)}")
    ds = xr.open_zarr(root.store, group=_full(root, path), zarr_format=3, consolidated=False)
    levels = ds.attrs.get(MULTIINDEX, {})
    attrs = {k: v for k, v in ds.attrs.items() if k not in (COMPLETE, MULTIINDEX)}
    for name in ds.variables:
        values = ds.variables[name]
        if _is_text(values.dtype):
            ds[name] = values.copy(data=_as_unicode(np.asarray(values.values)))
    for dim, names in levels.items():
        ds = ds.set_index({dim: names})
    ds.attrs = attrs
    return ds
