"""Stage 3: CKA between every pair of sites (within and across models), computed by Dask from the store.

Incremental: every matrix written records attrs["model_fingerprints"]. On the next run, the entries of
the stored matrix of the same name between sites of models whose fingerprint is unchanged are reused
(`known=` of the engine) and only the rows/columns of new or changed models are computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import xarray as xr
import zarr
from distributed import Client, LocalCluster
from prefect import flow, get_run_logger, task

import storage
from flows.caching import cached
from flows.config import ComputeConfig, RunConfig, SimilarityConfig
from flows.progress import progress_bar
from tasks.analyses import STDERR_SUFFIX
from tasks.similarity import IncompatibleKnownError, cka_matrix, minibatch_cka_matrix


@contextlib.contextmanager
def dask_client(compute: ComputeConfig) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started (and stopped) here.

    compute.memory_budget bounds the CKA working set, not the workers: their memory limit is Dask's
    default share of this machine (a tighter one pauses workers that hold torch alone, ~1 GiB)."""
    if compute.dask_address:
        with Client(compute.dask_address) as client:
            yield client
        return
    with LocalCluster(n_workers=compute.n_workers, threads_per_worker=1, processes=True,
                      memory_limit="auto", dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def site_arrays(root: zarr.Group, models: list[str]) -> dict[str, zarr.Array]:
    """Site id -> stored activation array, for every site of the given models, in config order."""
    return {f"{model}/{site}": array for model in models
            for site, array in storage.activation_arrays(root, model).items()}


def reusable(root: zarr.Group, name: str, model_fingerprints: dict[str, str]) -> xr.DataArray | None:
    """The stored matrix `name` restricted to the sites of models whose recorded fingerprint equals the
    current one; None when no such matrix or site exists."""
    if name not in storage.list_similarity(root):
        return None
    previous = storage.open_similarity(root, name)
    recorded = previous.attrs.get("model_fingerprints") or {}
    unchanged = {model for model, fp in model_fingerprints.items() if recorded.get(model) == fp}
    keep = {dim: [storage.split_site_id(s)[0] in unchanged for s in storage.site_ids(previous, dim)]
            for dim in ("site_a", "site_b")}
    if not any(keep["site_a"]):
        return None
    return previous.isel(keep)


def _compute(arrays: dict[str, zarr.Array], root: zarr.Group, similarity: SimilarityConfig, compute: ComputeConfig,
             client: Client | None, known: xr.DataArray | None, known_stderr: xr.DataArray | None
             ) -> dict[str, xr.DataArray]:
    """The engine call one configured matrix needs: result name -> matrix (with the engine's attrs)."""
    key = similarity.key
    common = dict(precision=compute.precision, memory_budget=compute.memory_budget, client=client,
                  device=compute.device)
    with progress_bar(f"CKA {key}", 1) as advance:
        if similarity.method == "minibatch":
            result = minibatch_cka_matrix(arrays, batch_size=similarity.batch_size, seed=similarity.seed,
                                          progress=advance, known=known, known_stderr=known_stderr,
                                          scratch=storage.partials_group(root, key), **common)
            return {key: result["cka"].assign_attrs(result.attrs),
                    key + STDERR_SUFFIX: result["stderr"].assign_attrs(result.attrs)}
        return {key: cka_matrix(arrays, kernel=similarity.kernel, unbiased=similarity.estimator == "unbiased",
                                rbf_threshold=similarity.rbf_threshold, method=similarity.method,
                                partials=storage.partials_group(root, key), progress=advance, known=known, **common)}


def update_similarity(root: zarr.Group, similarity: SimilarityConfig, compute: ComputeConfig,
                      model_fingerprints: dict[str, str], *, client: Client | None, reuse: bool = True
                      ) -> dict[str, xr.DataArray]:
    """Compute and store one configured matrix (and, for minibatch, its `_stderr` companion) over the
    sites of `model_fingerprints`' models, each with attrs["model_fingerprints"]; returns them by name.

    reuse: keep the stored entries between sites of models whose fingerprint is unchanged, unless the
    stored matrix was computed with other settings (then attrs["known_rejected"] says why)."""
    arrays = site_arrays(root, list(model_fingerprints))
    known = reusable(root, similarity.key, model_fingerprints) if reuse else None
    known_stderr = None
    if known is not None and similarity.method == "minibatch":
        known_stderr = reusable(root, similarity.key + STDERR_SUFFIX, model_fingerprints)
        known = known if known_stderr is not None else None
    try:
        results = _compute(arrays, root, similarity, compute, client, known, known_stderr)
    except IncompatibleKnownError as err:
        results = _compute(arrays, root, similarity, compute, client, None, None)
        for matrix in results.values():
            matrix.attrs["known_rejected"] = str(err)
    for name, matrix in results.items():
        storage.write_similarity(root, name, matrix.assign_attrs(model_fingerprints=dict(model_fingerprints)))
    return results


@task(name="cka-matrix", retries=2, retry_delay_seconds=10)
def similarity_task(store_url: str, similarity: SimilarityConfig, compute: ComputeConfig,
                    model_fingerprints: dict[str, str], reuse: bool = True) -> str:
    """`update_similarity` on a Dask client: resumes from partial sums in the store and, with `reuse`,
    keeps the stored entries between sites of models whose fingerprint is unchanged."""
    logger = get_run_logger()
    logger.info("%s: CKA over the sites of %d models (%s kernel, %s HSIC, method %s)", similarity.key,
                len(model_fingerprints), similarity.kernel, similarity.estimator, similarity.method)
    with dask_client(compute) as client:
        results = update_similarity(storage.open_store(store_url), similarity, compute, model_fingerprints,
                                    client=client, reuse=reuse)
    attrs = results[similarity.key].attrs
    if "known_rejected" in attrs:
        logger.warning("%s: stored entries not reused: %s", similarity.key, attrs["known_rejected"])
    logger.info("%s: done in %.1f s (%d entries reused, %d computed)", similarity.key, attrs["seconds"],
                attrs["reused_entries"], attrs["computed_entries"])
    return similarity.key


@flow(name="ckaflow-similarity")
def similarity_stage(config: RunConfig, model_fingerprints: dict[str, str], refresh: bool = False) -> list[str]:
    """Every configured CKA matrix; returns their names under similarity/. `refresh` recomputes every
    entry (no reuse of stored ones)."""
    task_ = similarity_task.with_options(**cached(config.store, refresh=refresh))
    return [task_(config.store, entry, config.compute, model_fingerprints, reuse=not refresh)
            for entry in config.similarity]
