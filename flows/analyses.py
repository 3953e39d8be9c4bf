"""Stage 4: the analyses that explain the CKA maps (probes, agreement, target alignment, ...).

The store decides what is done: analyses/ is recomputed (replaced as a whole) unless it holds the
fingerprint of this config's inputs: the sample, the activations, the matrices and the options."""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import storage
from flows.cluster import dask_client
from flows.config import AnalysesConfig, ComputeConfig, RunConfig
from flows.errors import retry_transient
from flows.progress import progress_bar
from flows.threads import flow_pools
from tasks.analyses import run_analyses

ANALYSES = "analyses"


def analyses_inputs(config: RunConfig, samples_fingerprint: str, model_fingerprints: dict[str, str],
                    matrix_fingerprints: dict[str, str]) -> dict[str, Any]:
    """What the analyses are computed from."""
    return {"samples": samples_fingerprint, "activations": [[m, fp] for m, fp in model_fingerprints.items()],
            "similarity": matrix_fingerprints, "options": config.analyses.model_dump(mode="json")}


@task(name="analyses", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def analyses_task(store_url: str, analyses: AnalysesConfig, compute: ComputeConfig, models: list[str],
                  matrices: list[str], inputs: dict[str, Any]) -> list[str]:
    """Replace analyses/ by every analysis of `models` and `matrices`; record the inputs' fingerprint last."""
    root = storage.open_store(store_url)
    storage.delete_analyses(root)
    logger = get_run_logger()
    n_sites = sum(len(storage.activation_arrays(root, m)) for m in models)
    with flow_pools(compute) as plan, dask_client(compute) as client, contextlib.ExitStack() as bars:
        logger.info("analyses on %s views, %d sites; threads: %d (flow process), %d workers x %d", analyses.views,
                    n_sites, plan.flow_pool, plan.workers, plan.threads_per_worker)
        bar = {"alignment": bars.enter_context(progress_bar("target alignment", None, "CKA tasks"))}
        shown = [0]

        def progress(done: int, total: int, site: str) -> None:
            if "probes" not in bar:  # the probes start: the alignment is over
                bars.close()
                bar["probes"] = bars.enter_context(progress_bar("probes", total, "sites"))
            bar["probes"](done - shown[0])
            shown[0] = done

        names = run_analyses(root, probes=analyses.probes, probe_seed=analyses.probe_seed,
                             test_fraction=analyses.test_fraction, bootstrap=analyses.bootstrap, views=analyses.views,
                             probe_solver=analyses.probe_solver, client=client, memory_budget=compute.memory_budget,
                             device=compute.device, models=models, similarity=matrices, progress=progress,
                             target_progress=bar["alignment"])
    storage.record_fingerprint(root, ANALYSES, inputs)
    logger.info("analyses written: %s", ", ".join(names))
    return names


@flow(name="ckaflow-analyses")
def analyses_stage(config: RunConfig, samples_fingerprint: str, model_fingerprints: dict[str, str],
                   matrix_fingerprints: dict[str, str]) -> str:
    """All analyses unless the store holds them for these inputs; returns their fingerprint."""
    inputs = analyses_inputs(config, samples_fingerprint, model_fingerprints, matrix_fingerprints)
    expected = storage.fingerprint(inputs)
    if storage.recorded_fingerprint(storage.open_store(config.store), ANALYSES) == expected:
        get_run_logger().info("analyses: up to date in the store (fingerprint %s)", expected)
        return expected
    analyses_task(config.store, config.analyses, config.compute, list(model_fingerprints),
                  list(matrix_fingerprints), inputs)
    return expected
