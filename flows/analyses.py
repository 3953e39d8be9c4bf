"""Stage 4: the analyses that explain the CKA maps (probes, agreement, target alignment, ...).

The store decides what is done: analyses/ is recomputed (replaced as a whole) unless it holds the
fingerprint of this config's inputs: the sample, the activations, the matrices and the options."""

from __future__ import annotations

from typing import Any

import storage
from flows.cluster import dask_client
from flows.config import ComputeConfig, RunConfig
from flows.extract import require_extracted
from flows.logs import run_logger
from flows.progress import bars_in_turn
from flows.runner import unit
from flows.stages import RunContext, Stage
from flows.threads import flow_pools
from tasks.analyses.options import AnalysesOptions
from tasks.threads import ThreadPlan

ANALYSES = "analyses"


def analyses_inputs(config: RunConfig, samples_fingerprint: str, model_fingerprints: dict[str, str],
                    matrix_fingerprints: dict[str, str]) -> dict[str, Any]:
    """What the analyses are computed from."""
    return {"samples": samples_fingerprint, "activations": [[m, fp] for m, fp in model_fingerprints.items()],
            "similarity": matrix_fingerprints, "options": config.analyses.model_dump(mode="json")}


def _inputs(context: RunContext) -> dict[str, Any]:
    upstream = context.upstream
    return analyses_inputs(context.config, upstream["samples"], upstream["models"], upstream["similarity"])


def compute_analyses(store_url: str, options: AnalysesOptions, compute: ComputeConfig, threads: ThreadPlan,
                     models: list[str], matrices: list[str], inputs: dict[str, Any]) -> list[str]:
    """Replace analyses/ by every analysis of `models` and `matrices`; record the inputs' fingerprint last."""
    from tasks.analyses import run_analyses

    root = storage.open_store(store_url)
    storage.delete_analyses(root)
    logger = run_logger()
    n_sites = sum(len(storage.activation_arrays(root, m)) for m in models)
    with flow_pools(compute, threads) as plan, dask_client(compute, threads) as client, \
            bars_in_turn(("target alignment", "CKA tasks"), ("probes", "sites")) as (alignment, probes):
        logger.info("analyses on %s views, %d sites; threads: %d (flow process), %d workers x %d", options.views,
                    n_sites, plan.flow_pool, plan.workers, plan.threads_per_worker)
        names = run_analyses(root, options, models=models, similarity=matrices, client=client,
                             alignment_progress=alignment, probe_progress=probes)
    storage.record_fingerprint(root, ANALYSES, inputs)
    logger.info("analyses written: %s", ", ".join(names))
    return names


def run(context: RunContext) -> str:
    """All analyses unless the store holds them for these inputs; returns their fingerprint."""
    config = context.config
    require_extracted(context)
    inputs = _inputs(context)
    expected = storage.fingerprint(inputs)
    if storage.recorded_fingerprint(context.root, ANALYSES) == expected:
        run_logger().info("analyses: up to date in the store (fingerprint %s)", expected)
        return expected
    unit("analyses", compute_analyses, config.store, config.analyses.options(config.compute), config.compute,
         context.threads, list(context.upstream["models"]), list(context.upstream["similarity"]), inputs, retries=1)
    return expected


def forget(root: Any, config: RunConfig) -> list[str]:
    storage.delete_analyses(root)
    return [ANALYSES]


ANALYSES_STAGE = Stage(name=ANALYSES, output="analyses", run=run, forget=forget,
                       fingerprint=lambda context: storage.fingerprint(_inputs(context)))
