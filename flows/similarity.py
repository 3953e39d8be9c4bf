"""Stage 3: CKA between every pair of sites (within and across models), computed by Dask from the store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client, LocalCluster
from prefect import flow, get_run_logger, task

import storage
from flows.caching import cached
from flows.config import ComputeConfig, RunConfig, SimilarityConfig, parse_size
from flows.progress import progress_bar
from tasks.similarity import cka_matrix, minibatch_cka_matrix


@contextlib.contextmanager
def dask_client(compute: ComputeConfig) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started (and stopped) here."""
    if compute.dask_address:
        with Client(compute.dask_address) as client:
            yield client
        return
    per_worker = max(parse_size(compute.memory_budget) // compute.n_workers, 2**28)
    with LocalCluster(n_workers=compute.n_workers, threads_per_worker=1, processes=True,
                      memory_limit=per_worker, dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def site_arrays(root, models: list[str]) -> dict:
    """Site id -> stored activation array, for every site of the given models, in config order."""
    return {f"{model}/{site}": array for model in models
            for site, array in storage.activation_arrays(root, model).items()}


@task(name="cka-matrix", retries=2, retry_delay_seconds=10)
def similarity_task(store_url: str, similarity: SimilarityConfig, compute: ComputeConfig,
                    model_fingerprints: dict[str, str]) -> str:
    """Compute one CKA matrix over all sites of all models; resumes from partial sums in the store."""
    logger = get_run_logger()
    root = storage.open_store(store_url)
    arrays = site_arrays(root, list(model_fingerprints))
    logger.info("%s: CKA over %d sites (%s kernel, %s HSIC, method %s)", similarity.key, len(arrays),
                similarity.kernel, similarity.estimator, similarity.method)
    with dask_client(compute) as client:
        if similarity.method == "minibatch":
            result = minibatch_cka_matrix(arrays, batch_size=similarity.batch_size, seed=0, client=client)
            matrix = result["cka"].assign_attrs(result.attrs)
            storage.write_similarity(root, f"{similarity.key}_stderr", result["stderr"].assign_attrs(result.attrs))
        else:
            with progress_bar(f"CKA {similarity.key}", 1) as advance:
                matrix = cka_matrix(
                    arrays, kernel=similarity.kernel, unbiased=similarity.estimator == "unbiased",
                    rbf_threshold=similarity.rbf_threshold, method=similarity.method,
                    precision=compute.precision, memory_budget=compute.memory_budget, client=client,
                    partials=storage.partials_group(root, similarity.key), progress=advance)
    storage.write_similarity(root, similarity.key, matrix)
    logger.info("%s: done in %.1f s", similarity.key, matrix.attrs.get("seconds", float("nan")))
    return similarity.key


@flow(name="ckaflow-similarity")
def similarity_stage(config: RunConfig, model_fingerprints: dict[str, str], refresh: bool = False) -> list[str]:
    """Every configured CKA matrix; returns their names under similarity/."""
    task_ = similarity_task.with_options(**cached(config.store, refresh=refresh))
    return [task_(config.store, entry, config.compute, model_fingerprints) for entry in config.similarity]
