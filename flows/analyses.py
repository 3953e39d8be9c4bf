"""Stage 4: the analyses that explain the CKA maps (probes, agreement, target alignment, ...)."""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task

import storage
from flows.caching import cached
from flows.cluster import dask_client
from flows.config import AnalysesConfig, ComputeConfig, RunConfig
from flows.progress import progress_bar
from flows.threads import flow_pools
from tasks.analyses import run_analyses


@task(name="analyses", retries=1, retry_delay_seconds=10)
def analyses_task(store_url: str, analyses: AnalysesConfig, compute: ComputeConfig, inputs: list[str]) -> list[str]:
    """Run every analysis on the store; `inputs` (result names + fingerprints) only keys the cache."""
    logger = get_run_logger()
    root = storage.open_store(store_url)
    n_sites = sum(len(storage.activation_arrays(root, m)) for m in storage.list_models(root))
    start = time.monotonic()
    with flow_pools(compute) as plan, dask_client(compute) as client, \
            progress_bar("probes", n_sites if analyses.probes else 0) as advance:
        logger.info("analyses on %s views, %d sites; threads: %d (flow process), %d workers x %d", analyses.views,
                    n_sites, plan.flow_pool, plan.workers, plan.threads_per_worker)
        shown = [0]

        def progress(done: int, total: int, site: str) -> None:
            advance(done - shown[0])
            shown[0] = done
            elapsed = time.monotonic() - start
            eta = elapsed / done * (total - done) if done else float("nan")
            logger.info("probes: site %d of %d (%s), %.0f s elapsed, ETA %.0f s", done, total, site, elapsed, eta)

        names = run_analyses(root, probes=analyses.probes, probe_seed=analyses.probe_seed,
                             test_fraction=analyses.test_fraction, bootstrap=analyses.bootstrap, views=analyses.views,
                             probe_solver=analyses.probe_solver, client=client, memory_budget=compute.memory_budget,
                             device=compute.device, progress=progress)
    logger.info("analyses written in %.1f s: %s", time.monotonic() - start, ", ".join(names))
    return names


@flow(name="ckaflow-analyses")
def analyses_stage(config: RunConfig, inputs: list[str], refresh: bool = False) -> list[str]:
    """All analyses; returns their names under analyses/."""
    task_ = analyses_task.with_options(**cached(config.store, refresh=refresh))
    return task_(config.store, config.analyses, config.compute, inputs)
