"""Stage 3: CKA between every pair of sites (within and across models), computed by Dask from the store.

Each configured matrix is one task around `tasks.cka.update_similarity` (incremental and resumable).
The store decides what is done: a matrix is skipped only when the store holds it with the fingerprint
of its inputs (the activations' fingerprints, in order, and the matrix settings)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import storage
from flows.cluster import dask_client
from flows.config import ComputeConfig, RunConfig, SimilarityConfig
from flows.errors import retry_transient
from flows.progress import progress_bar
from tasks.cka import update_similarity

SIMILARITY = "similarity"


def matrix_inputs(similarity: SimilarityConfig, compute: ComputeConfig, model_fingerprints: dict[str, str]
                  ) -> dict[str, Any]:
    """What a matrix is computed from: its models' activation fingerprints in site order, and its settings."""
    return {"activations": [[model, fp] for model, fp in model_fingerprints.items()],
            "settings": similarity.engine_options(), "precision": compute.precision}


def result_names(similarity: SimilarityConfig) -> list[str]:
    """The results one matrix entry writes under similarity/ (minibatch: the matrix and its standard errors)."""
    names = [similarity.key]
    return names + [similarity.key + storage.STDERR_SUFFIX] if similarity.method == "minibatch" else names


def matrix_fingerprints(config: RunConfig, model_fingerprints: dict[str, str]) -> dict[str, str]:
    """Result name -> the fingerprint the current config gives it."""
    return {name: storage.fingerprint(matrix_inputs(entry, config.compute, model_fingerprints))
            for entry in config.similarity for name in result_names(entry)}


@task(name="cka-matrix", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def similarity_task(store_url: str, similarity: SimilarityConfig, compute: ComputeConfig,
                    model_fingerprints: dict[str, str], reuse: bool = True) -> str:
    """`update_similarity` on a Dask client: resumes from partial sums in the store and, with `reuse`,
    keeps the stored entries between sites of models whose fingerprint is unchanged. Records the
    matrix's fingerprint once it is complete."""
    logger = get_run_logger()
    logger.info("%s: CKA over the sites of %d models (%s kernel, %s HSIC, method %s)", similarity.key,
                len(model_fingerprints), similarity.kernel, similarity.estimator, similarity.method)
    root = storage.open_store(store_url)
    with dask_client(compute) as client, progress_bar(f"CKA {similarity.key}", None, "tasks") as advance:
        results = update_similarity(root, similarity.key, model_fingerprints,
                                    **similarity.engine_options(), **compute.engine_options(), client=client,
                                    reuse=reuse, progress=advance)
    for name in result_names(similarity):
        storage.record_fingerprint(root, f"{SIMILARITY}/{name}", matrix_inputs(similarity, compute, model_fingerprints))
    attrs = results[similarity.key].attrs
    if "known_rejected" in attrs:
        logger.warning("%s: stored entries not reused: %s", similarity.key, attrs["known_rejected"])
    logger.info("%s: done in %.1f s (%d entries reused, %d computed)", similarity.key, attrs["seconds"],
                attrs["reused_entries"], attrs["computed_entries"])
    return similarity.key


@flow(name="ckaflow-similarity")
def similarity_stage(config: RunConfig, model_fingerprints: dict[str, str], refresh: bool = False) -> dict[str, str]:
    """Every configured CKA matrix not already in the store with its current fingerprint; returns result
    name -> fingerprint. `refresh` recomputes every entry (no reuse of stored ones)."""
    logger = get_run_logger()
    root = storage.open_store(config.store)
    expected = matrix_fingerprints(config, model_fingerprints)
    for entry in config.similarity:
        names = result_names(entry)
        if not refresh and all(storage.recorded_fingerprint(root, f"{SIMILARITY}/{n}") == expected[n] for n in names):
            logger.info("%s: up to date in the store (fingerprint %s)", entry.key, expected[entry.key])
            continue
        similarity_task(config.store, entry, config.compute, model_fingerprints, reuse=not refresh)
    return expected
