"""Stage 3: CKA between every pair of sites (within and across models), computed by Dask from the store.

Each configured matrix is one task around `tasks.cka.update_similarity` (incremental and resumable)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

import storage
from flows.caching import cached
from flows.cluster import dask_client
from flows.config import ComputeConfig, RunConfig, SimilarityConfig
from flows.errors import retry_transient
from flows.progress import progress_bar
from tasks.cka import update_similarity


@task(name="cka-matrix", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def similarity_task(store_url: str, similarity: SimilarityConfig, compute: ComputeConfig,
                    model_fingerprints: dict[str, str], reuse: bool = True) -> str:
    """`update_similarity` on a Dask client: resumes from partial sums in the store and, with `reuse`,
    keeps the stored entries between sites of models whose fingerprint is unchanged."""
    logger = get_run_logger()
    logger.info("%s: CKA over the sites of %d models (%s kernel, %s HSIC, method %s)", similarity.key,
                len(model_fingerprints), similarity.kernel, similarity.estimator, similarity.method)
    with dask_client(compute) as client, progress_bar(f"CKA {similarity.key}", None, "tasks") as advance:
        results = update_similarity(storage.open_store(store_url), similarity.key, model_fingerprints,
                                    **similarity.engine_options(), **compute.engine_options(), client=client,
                                    reuse=reuse, progress=advance)
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
