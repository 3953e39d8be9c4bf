"""Reading activations/: models, their metadata and progress, raw Zarr arrays, labelled xarray views."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from storage.errors import StoreError
from storage.layout import ACTIVATIONS, DONE, NONFINITE, model_path, site_path
from storage.runs import model_order
from storage.samples import read_samples
from storage.store import StoreLike, open_store, store_url, takes_store
from storage.writer import DIGESTS

SAMPLE_COORDS = ("image_index", "key", "label", "label_name", "view")


@takes_store("r")
def list_models(root: StoreLike) -> list[str]:
    """Models with (at least partly) extracted activations, in config order: as the latest run's config lists
    them, then earlier runs' (`runs.model_order`); models no run recorded (written directly) last, by name."""
    if ACTIVATIONS not in root:
        return []
    group = root[ACTIVATIONS]
    stored = {name for name in group.group_keys() if group[name].attrs.get("initialized")}
    ordered = [name for name in model_order(root) if name in stored]
    return ordered + sorted(stored - set(ordered))


def _model_group(root: zarr.Group, model: str) -> zarr.Group:
    path = model_path(model)
    if path not in root or not root[path].attrs.get("initialized"):
        known = ", ".join(list_models(root)) or "none"
        raise StoreError(f"no activations of model {model!r} in {store_url(root)} (models: {known})")
    return root[path]


@takes_store("r")
def model_progress(root: StoreLike, model: str) -> tuple[int, int]:
    """(shards done, shards total) of a model."""
    done = np.asarray(_model_group(root, model)[DONE][:])
    return int(done.sum()), int(done.size)


@takes_store("r")
def model_attrs(root: StoreLike, model: str) -> dict[str, Any]:
    """A model's metadata (arch, weights, fingerprint, sites in forward order, widths, dtype, ...) plus
    `nonfinite`: {site: count of NaN/Inf values} over done shards, for sites that have any."""
    group = _model_group(root, model)
    attrs = dict(group.attrs)
    done = np.asarray(group[DONE][:]).astype(bool)
    counts = np.asarray(group[NONFINITE][:])[done].sum(axis=0)
    attrs["nonfinite"] = {site: int(c) for site, c in zip(attrs["sites"], counts) if c}
    return attrs


@takes_store("r")
def shard_digests(root: StoreLike, model: str) -> dict[str, list[str | None]]:
    """Site -> per-shard SHA-256 (hex) of its stored bytes, recorded when the shard was written; None for
    shards not done or written before digests were recorded."""
    group = _model_group(root, model)
    done = np.asarray(group[DONE][:]).astype(bool)
    words = np.asarray(group[DIGESTS][:]) if DIGESTS in group else np.zeros((done.size, len(group.attrs["sites"]), 1),
                                                                         dtype=np.uint64)
    return {site: [words[shard, i].tobytes().hex() if done[shard] and words[shard, i].any() else None
                   for shard in range(done.size)]
            for i, site in enumerate(group.attrs["sites"])}


@takes_store("r")
def activation_arrays(root: StoreLike, model: str, *, require_complete: bool = True) -> dict[str, zarr.Array]:
    """Site name -> its (sample, feature) Zarr array, in forward order. By default StoreError unless
    every shard of the model is done (unwritten rows would read as NaN)."""
    attrs = _model_group(root, model).attrs
    if require_complete:
        done, total = model_progress(root, model)
        if done < total:
            raise StoreError(f"model {model!r} in {store_url(root)}: only {done}/{total} shards extracted; "
                             "run (or resume) the extract stage")
    return {site: root[site_path(model, site)] for site in attrs["sites"]}


def open_activations(store: StoreLike, model: str, *, require_complete: bool = True) -> xr.Dataset:
    """A lazy (dask) Dataset: one variable per site (dims `sample`, `<site>/feature`; attrs layer,
    sublayer, module, reduction, ...), the `sample` dim labelled with the sample manifest."""
    root = open_store(store, mode="r")
    arrays = activation_arrays(root, model, require_complete=require_complete)
    attrs = model_attrs(root, model)
    variables = {
        site: xr.Variable(("sample", f"{site}/feature"), da.from_zarr(array), attrs=dict(array.attrs))
        for site, array in arrays.items()}
    n = attrs["n_samples"]
    coords: dict[str, Any] = {"sample": np.arange(n)}
    samples = read_samples(root)
    if samples.sizes["sample"] != n:
        raise StoreError(f"model {model!r}: {n} activation rows but {samples.sizes['sample']} samples in "
                         f"{store_url(root)}; re-run the extract stage")
    coords |= {name: ("sample", samples[name].values) for name in SAMPLE_COORDS if name in samples}
    return xr.Dataset(variables, coords=coords, attrs={"model": model, **attrs})
