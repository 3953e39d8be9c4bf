"""samples/: the sampled images (index, source key, label, label name, view id) and their fingerprint."""

from __future__ import annotations

import xarray as xr

from storage.errors import StoreError
from storage.records import is_complete, read_dataset, write_dataset
from storage.store import StoreLike, takes_store

SAMPLES = "samples"


@takes_store("a")
def write_samples(root: StoreLike, samples: xr.Dataset) -> None:
    """Record the sample manifest (dim `sample`, attrs with a `fingerprint`); unchanged manifests are kept."""
    if "fingerprint" not in samples.attrs:
        raise StoreError("samples to write have no attrs['fingerprint']")
    if "sample" not in samples.dims:
        raise StoreError(f"samples to write need a 'sample' dimension, got dims {tuple(samples.dims)}")
    try:
        if samples_fingerprint(root) == samples.attrs["fingerprint"]:
            return
    except StoreError:
        pass
    write_dataset(root, SAMPLES, samples)


@takes_store("r")
def read_samples(root: StoreLike) -> xr.Dataset:
    """The sample manifest, loaded in memory (strings as numpy unicode, attrs as written)."""
    return read_dataset(root, SAMPLES, "samples/ (run the sample stage first)").load()


@takes_store("r")
def samples_fingerprint(root: StoreLike) -> str:
    """The fingerprint of the recorded sample manifest (StoreError when none is recorded)."""
    if not is_complete(root, SAMPLES) or "fingerprint" not in root[SAMPLES].attrs:
        raise StoreError("the run store has no samples/ yet; run the sample stage first")
    return str(root[SAMPLES].attrs["fingerprint"])
