"""The similarity stage's unit of work: one named CKA matrix computed over the run store's activations
and stored under similarity/, incremental and resumable.

Incremental: every matrix written records attrs["model_fingerprints"]. On the next run, the entries of
the stored matrix of the same name between sites of models whose fingerprint is unchanged are reused
(`known=` of the engine) and only the rows/columns of new or changed models are computed. Resumable:
block-pair partial sums live in the store (`storage.partials_group`) until the matrix is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr
import zarr

import storage
from storage import STDERR_SUFFIX
from tasks.cka.exact import cka_matrix
from tasks.cka._known import IncompatibleKnownError
from tasks.cka.minibatch import minibatch_cka_matrix
from tasks.cka.options import VIEWS, CkaOptions, Views


def site_arrays(root: zarr.Group, models: list[str]) -> dict[str, zarr.Array]:
    """Site id -> stored activation array, for every site of the given models, in their order."""
    return {f"{model}/{site}": array for model in models
            for site, array in storage.activation_arrays(root, model).items()}


def view_rows(samples: xr.Dataset, views: Views) -> np.ndarray:
    """Row numbers of the samples that `views` selects: `clean` the plain images (view 0), `all` every row.
    A manifest without a `view` variable has one view per image."""
    view = np.asarray(samples["view"].values) if "view" in samples else np.zeros(samples.sizes["sample"], int)
    if views not in VIEWS:
        raise ValueError(f"views must be one of {', '.join(VIEWS)}; got {views!r}")
    rows = np.flatnonzero(view == 0) if views == "clean" else np.arange(view.size)
    if rows.size == 0:
        raise ValueError("no sample has view 0 (the plain image); the sample manifest is malformed")
    return rows


def select_rows(arrays: Mapping[str, Any], rows: np.ndarray, n: int) -> dict[str, Any]:
    """The arrays (site id -> (n, d): numpy, zarr or dask) restricted to `rows`, lazily for zarr/dask (a
    dask array over the stored chunks); unchanged when `rows` is every row."""
    rows = np.asarray(rows)
    if rows.size == n and np.array_equal(rows, np.arange(n)):
        return dict(arrays)
    index: Any = slice(0, rows.size) if np.array_equal(rows, np.arange(rows.size)) else rows
    out = {}
    for sid, array in arrays.items():
        if isinstance(array, np.ndarray):
            out[sid] = array[index]
        else:
            import dask.array as da

            out[sid] = (array if hasattr(array, "dask") else da.from_zarr(array))[index]
    return out


def reusable(root: zarr.Group, name: str, model_fingerprints: dict[str, str], views: Views = "all"
             ) -> xr.DataArray | None:
    """The stored matrix `name` restricted to the sites of models whose recorded fingerprint equals the
    current one; None when no such matrix or site exists, or it was computed on other `views` (a matrix
    without the record was computed on every row)."""
    if name not in storage.list_similarity(root):
        return None
    previous = storage.open_similarity(root, name)
    if previous.attrs.get("views", "all") != views:
        return None
    recorded = previous.attrs.get("model_fingerprints") or {}
    unchanged = {model for model, fp in model_fingerprints.items() if recorded.get(model) == fp}
    keep = {dim: [storage.split_site_id(s)[0] in unchanged for s in storage.site_ids(previous, dim)]
            for dim in ("site_a", "site_b")}
    if not any(keep["site_a"]):
        return None
    return previous.isel(keep)


def _compute(arrays: dict[str, zarr.Array], root: zarr.Group, name: str, options: CkaOptions, client: Any,
             progress: Callable[[int, int | None], Any] | None, known: xr.DataArray | None,
             known_stderr: xr.DataArray | None) -> dict[str, xr.DataArray]:
    """The engine call one matrix needs: result name -> matrix (with the engine's attrs)."""
    engine = dict(precision=options.precision, memory_budget=options.memory_budget, client=client,
                  device=options.device, progress=progress, known=known)
    if options.method == "minibatch":
        result = minibatch_cka_matrix(arrays, batch_size=options.batch_size, seed=options.seed,
                                      known_stderr=known_stderr, scratch=storage.partials_group(root, name), **engine)
        return {name: result["cka"].assign_attrs(result.attrs),
                name + STDERR_SUFFIX: result["stderr"].assign_attrs(result.attrs)}
    return {name: cka_matrix(arrays, kernel=options.kernel, unbiased=options.unbiased,
                             rbf_threshold=options.rbf_threshold, rbf_median_samples=options.rbf_median_samples,
                             method=options.method, partials=storage.partials_group(root, name), **engine)}


def update_similarity(root: zarr.Group, name: str, model_fingerprints: Mapping[str, str],
                      options: CkaOptions = CkaOptions(), *, client: Any = None, reuse: bool = True,
                      progress: Callable[[int, int | None], Any] | None = None) -> dict[str, xr.DataArray]:
    """Compute and store the matrix `name` (and, for method minibatch, its `_stderr` companion) over the
    sites of `model_fingerprints`' models, each with attrs["model_fingerprints"]; returns them by name.

    reuse: keep the stored entries between sites of models whose fingerprint is unchanged, unless the
    stored matrix was computed with other settings (then attrs["known_rejected"] says why).
    options.views: the rows the matrix is computed on (`view_rows`), recorded with their count in attrs
    (`views`, `rows`). progress: `(tasks just finished, total tasks)`."""
    arrays = site_arrays(root, list(model_fingerprints))
    samples = storage.read_samples(root)
    rows = view_rows(samples, options.views)
    arrays = select_rows(arrays, rows, samples.sizes["sample"])
    fingerprints = dict(model_fingerprints)
    known = reusable(root, name, fingerprints, options.views) if reuse else None
    known_stderr = None
    if known is not None and options.method == "minibatch":
        known_stderr = reusable(root, name + STDERR_SUFFIX, fingerprints, options.views)
        known = known if known_stderr is not None else None
    try:
        results = _compute(arrays, root, name, options, client, progress, known, known_stderr)
    except IncompatibleKnownError as err:
        results = _compute(arrays, root, name, options, client, progress, None, None)
        for matrix in results.values():
            matrix.attrs["known_rejected"] = str(err)
    for result_name, matrix in results.items():
        matrix.attrs.update(model_fingerprints=fingerprints, views=options.views, rows=int(rows.size))
        storage.write_similarity(root, result_name, matrix)
    return results
