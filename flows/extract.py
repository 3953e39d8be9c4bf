"""Stage 2: run every model over the sample and write its sites' activations to the store."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

import storage
from flows.caching import cached
from flows.config import ComputeConfig, DatasetConfig, ModelConfig, RunConfig
from flows.progress import progress_bar
from flows.sample import open_configured_dataset
from tasks.extract import extract_model


@task(name="extract-model", retries=2, retry_delay_seconds=10)
def extract_task(store_url: str, model: ModelConfig, sites: str | list[str], reduction: str,
                 dataset: DatasetConfig, compute: ComputeConfig, samples_fingerprint: str) -> dict[str, Any]:
    """Extract one model's sites (resuming at shard granularity); returns its summary and fingerprint."""
    logger = get_run_logger()
    root = storage.open_store(store_url)
    samples = storage.read_samples(root)
    if samples.attrs["fingerprint"] != samples_fingerprint:
        raise RuntimeError(f"samples/ in {store_url} changed while extracting {model.name!r}; re-run the sample stage")
    n_shards = -(-samples.sizes["sample"] // compute.shard_size)
    logger.info("extracting %s (%s, weights %s): %d samples in %d shards", model.name, model.arch,
                model.weights, samples.sizes["sample"], n_shards)
    with progress_bar(f"extract {model.name}", n_shards) as advance:
        summary = extract_model(
            root, model_name=model.name, arch=model.arch, arch_kwargs=model.arch_kwargs, weights=model.weights,
            sites=sites, reduction=reduction, dataset=open_configured_dataset(dataset), samples=samples,
            batch_size=compute.batch_size, device=compute.device, dtype=compute.dtype,
            shard_size=compute.shard_size, autocast=compute.autocast, loader_workers=compute.loader_workers,
            preprocessing=model.preprocessing, extra_attrs={"finetuned_from": model.finetuned_from},
            progress=advance)
    logger.info("extracted %s: %d sites, fingerprint %s", model.name, len(summary["sites"]), summary["fingerprint"][:12])
    return summary


@flow(name="ckaflow-extract")
def extract_stage(config: RunConfig, samples_fingerprint: str, refresh: bool = False) -> dict[str, str]:
    """Extract every model of the config; returns model name -> activation fingerprint."""
    task_ = extract_task.with_options(**cached(config.store, refresh=refresh))
    fingerprints = {}
    for model in config.models:
        summary = task_(config.store, model, config.sites_of(model), config.reduction_of(model),
                        config.dataset, config.compute, samples_fingerprint)
        fingerprints[model.name] = summary["fingerprint"]
    return fingerprints
