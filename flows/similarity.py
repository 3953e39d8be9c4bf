"""Stage 3: CKA between every pair of sites (within and across models), computed by Dask from the store.

Each configured matrix is one unit of work around `tasks.cka.update_similarity` (incremental and
resumable). The store decides what is done: a matrix is skipped only when the store holds it with the
fingerprint of its inputs (the activations' fingerprints, in order, and the matrix settings)."""

from __future__ import annotations

from typing import Any

import storage
from flows.cluster import dask_client
from flows.config import ComputeConfig, RunConfig, SimilarityConfig
from flows.extract import require_extracted
from flows.logs import run_logger
from flows.progress import progress_bar
from flows.runner import unit
from flows.stages import RunContext, Stage
from tasks.cka.options import CkaOptions
from tasks.threads import ThreadPlan

SIMILARITY = "similarity"


def matrix_inputs(options: CkaOptions, model_fingerprints: dict[str, str]) -> dict[str, Any]:
    """What a matrix is computed from: its models' activation fingerprints in site order, and its settings."""
    settings = options.settings()
    return {"activations": [[model, fp] for model, fp in model_fingerprints.items()],
            "settings": settings, "precision": options.precision}


def result_names(similarity: SimilarityConfig) -> list[str]:
    """The results one matrix entry writes under similarity/ (minibatch: the matrix and its standard errors)."""
    names = [similarity.key]
    return names + [similarity.key + storage.STDERR_SUFFIX] if similarity.method == "minibatch" else names


def matrix_fingerprints(config: RunConfig, model_fingerprints: dict[str, str]) -> dict[str, str]:
    """Result name -> the fingerprint the current config gives it."""
    return {name: storage.fingerprint(matrix_inputs(entry.options(config.compute), model_fingerprints))
            for entry in config.similarity for name in result_names(entry)}


def compute_matrix(store_url: str, similarity: SimilarityConfig, options: CkaOptions, names: list[str],
                   model_fingerprints: dict[str, str], compute: ComputeConfig, threads: ThreadPlan,
                   reuse: bool = True) -> str:
    """`update_similarity` on a Dask client: resumes from partial sums in the store and, with `reuse`,
    keeps the stored entries between sites of models whose fingerprint is unchanged. Records the
    matrix's fingerprint once it is complete."""
    from tasks.cka import update_similarity

    logger = run_logger()
    logger.info("%s: CKA over the sites of %d models (%s kernel, %s HSIC, method %s)", similarity.key,
                len(model_fingerprints), options.kernel, options.estimator, options.method)
    root = storage.open_store(store_url)
    with dask_client(compute, threads) as client, progress_bar(f"CKA {similarity.key}", None, "tasks") as advance:
        results = update_similarity(root, similarity.key, model_fingerprints, options, client=client, reuse=reuse,
                                    progress=advance)
    for name in names:
        storage.record_fingerprint(root, f"{SIMILARITY}/{name}", matrix_inputs(options, model_fingerprints))
    attrs = results[similarity.key].attrs
    if "known_rejected" in attrs:
        logger.warning("%s: stored entries not reused: %s", similarity.key, attrs["known_rejected"])
    logger.info("%s: done in %.1f s (%d entries reused, %d computed)", similarity.key, attrs["seconds"],
                attrs["reused_entries"], attrs["computed_entries"])
    return similarity.key


def run(context: RunContext) -> dict[str, str]:
    """Every configured CKA matrix not already in the store with its current fingerprint; returns result
    name -> fingerprint. A refresh recomputes every entry (no reuse of stored ones)."""
    config, root, refresh = context.config, context.root, context.refreshing(SIMILARITY)
    models = require_extracted(context)
    expected = matrix_fingerprints(config, models)
    for entry in config.similarity:
        names = result_names(entry)
        if not refresh and all(storage.recorded_fingerprint(root, f"{SIMILARITY}/{n}") == expected[n] for n in names):
            run_logger().info("%s: up to date in the store (fingerprint %s)", entry.key, expected[entry.key])
            continue
        unit("cka-matrix", compute_matrix, config.store, entry, entry.options(config.compute), names, models,
             config.compute, context.threads, reuse=not refresh, retries=2)
    return expected


def forget(root: Any, config: RunConfig) -> list[str]:
    for entry in config.similarity:
        for name in (entry.key, f"{entry.key}{storage.STDERR_SUFFIX}"):
            storage.delete_similarity(root, name)
    return [f"similarity/{s.key}" for s in config.similarity]


SIMILARITY_STAGE = Stage(name=SIMILARITY, output="similarity", run=run, forget=forget,
                         fingerprint=lambda context: matrix_fingerprints(context.config, context.upstream["models"]))
