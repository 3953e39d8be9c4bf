"""similarity/, analyses/ and the partial sums kept while a matrix is being computed."""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr

from storage.errors import StoreError
from storage.layout import site_ids, site_index
from storage.records import is_complete, read_dataset, write_dataset
from storage.store import StoreLike, open_store, takes_store

SIMILARITY = "similarity"
ANALYSES = "analyses"
PARTIALS = "_partials"
STDERR_SUFFIX = "_stderr"  # similarity/<name>_stderr: the standard errors of a minibatch matrix <name>


def _check_name(kind: str, name: str) -> None:
    if not name or "/" in name or name.startswith("_"):
        raise StoreError(f"{kind} name {name!r} must be non-empty, without '/', not starting with '_'")


@takes_store("a")
def write_similarity(root: StoreLike, name: str, matrix: xr.DataArray) -> None:
    """Store a complete (site_a, site_b) matrix (site ids '<model>/<layer>/<sublayer>') with its attrs."""
    _check_name("similarity", name)
    if tuple(matrix.dims) != ("site_a", "site_b"):
        raise StoreError(f"similarity {name!r}: expected dims (site_a, site_b), got {tuple(matrix.dims)}")
    flat = xr.DataArray(np.asarray(matrix.values, dtype=np.float64), dims=("site_a", "site_b"),
                        coords={"site_a": site_ids(matrix, "site_a"), "site_b": site_ids(matrix, "site_b")},
                        attrs=dict(matrix.attrs))
    write_dataset(root, f"{SIMILARITY}/{name}", flat.to_dataset(name="cka"))


@takes_store("r")
def list_similarity(root: StoreLike) -> list[str]:
    """Names of the complete matrices under similarity/."""
    if SIMILARITY not in root:
        return []
    return sorted(n for n in root[SIMILARITY].group_keys()
                  if not n.startswith("_") and is_complete(root, f"{SIMILARITY}/{n}"))


def open_similarity(store: StoreLike, name: str) -> xr.DataArray:
    """A complete matrix, loaded, with (model, layer, sublayer) MultiIndexes on site_a and site_b,
    so that `.sel(model_a=..., sublayer_b="attn")` works."""
    root = open_store(store, mode="r")
    ds = read_dataset(root, f"{SIMILARITY}/{name}", f"similarity matrix {name!r}").load()
    cka = ds["cka"]
    matrix = xr.DataArray(cka.values, dims=("site_a", "site_b"), name=name, attrs=dict(cka.attrs))
    return matrix.assign_coords(site_index(list(map(str, cka.site_a.values)), "a")).assign_coords(
        site_index(list(map(str, cka.site_b.values)), "b"))


@takes_store("a")
def partials_group(root: StoreLike, name: str) -> zarr.Group:
    """The group holding the finished tasks' partial sums of matrix `name` (created when missing)."""
    _check_name("similarity", name)
    return root.require_group(f"{SIMILARITY}/{PARTIALS}/{name}")


@takes_store("a")
def write_analysis(root: StoreLike, name: str, result: xr.Dataset) -> None:
    """Store one analysis result (a Dataset) under analyses/<name>, replacing an older one."""
    _check_name("analysis", name)
    write_dataset(root, f"{ANALYSES}/{name}", result)


@takes_store("r")
def read_analysis(root: StoreLike, name: str) -> xr.Dataset:
    """A stored analysis (lazy); StoreError when it was not computed."""
    return read_dataset(root, f"{ANALYSES}/{name}", f"analysis {name!r}")


@takes_store("r")
def list_analyses(root: StoreLike) -> list[str]:
    if ANALYSES not in root:
        return []
    return sorted(n for n in root[ANALYSES].group_keys() if is_complete(root, f"{ANALYSES}/{n}"))
