"""Stage 4: the analyses that explain the CKA maps (probes, agreement, target alignment, ...)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

import storage
from flows.caching import cached
from flows.cluster import dask_client
from flows.config import AnalysesConfig, ComputeConfig, RunConfig
from flows.errors import retry_transient
from flows.progress import progress_bar
from tasks.analyses import run_analyses


@task(name="analyses", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_transient)
def analyses_task(store_url: str, analyses: AnalysesConfig, compute: ComputeConfig, inputs: list[str]) -> list[str]:
    """Run every analysis on the store; `inputs` (result names + fingerprints) only keys the cache."""
    root = storage.open_store(store_url)
    n_sites = sum(len(storage.activation_arrays(root, m)) for m in storage.list_models(root))
    with dask_client(compute) as client, progress_bar("probes", n_sites if analyses.probes else 0, "sites") as advance:
        names = run_analyses(root, probes=analyses.probes, probe_seed=analyses.probe_seed,
                             test_fraction=analyses.test_fraction, bootstrap=analyses.bootstrap, client=client,
                             memory_budget=compute.memory_budget, device=compute.device, progress=advance)
    get_run_logger().info("analyses written: %s", ", ".join(names))
    return names


@flow(name="ckaflow-analyses")
def analyses_stage(config: RunConfig, inputs: list[str], refresh: bool = False) -> list[str]:
    """All analyses; returns their names under analyses/."""
    task_ = analyses_task.with_options(**cached(config.store, refresh=refresh))
    return task_(config.store, config.analyses, config.compute, inputs)
