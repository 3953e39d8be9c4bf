"""Stage 2: run every model over the sample and write its sites' activations to the store.

The store decides what is done: every model is handed to `extract_model`, which keeps the stored
activations only when their fingerprint (model and weights content, sites, reduction, preprocessing,
dtype, sample) equals the current one, replaces them otherwise, and extracts only the shards not done."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import storage
from flows.config import ComputeConfig, DatasetConfig, ModelConfig, RunConfig
from flows.errors import retry_transient
from flows.preflight import open_configured_dataset
from flows.progress import progress_bar
from tasks.extract import ModelSpec, extract_model


@task(name="extract-model", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def extract_task(store_url: str, model: ModelConfig, sites: str | list[str], reduction: str,
                 dataset: DatasetConfig, compute: ComputeConfig, samples_fingerprint: str,
                 break_locks: bool = False, shards: list[int] | None = None) -> dict[str, Any]:
    """Extract one model's sites (all shards, or `shards`), resuming at shard granularity; returns its
    summary and fingerprint."""
    logger = get_run_logger()
    root = storage.open_store(store_url)
    samples = storage.read_samples(root)
    if samples.attrs["fingerprint"] != samples_fingerprint:
        raise RuntimeError(f"samples/ in {store_url} changed while extracting {model.name!r}; re-run the sample stage")
    n_samples = samples.sizes["sample"]
    n_shards = storage.shard_count(n_samples, compute.shard_size)
    rows = sum(stop - start for start, stop in (storage.shard_bounds(i, n_samples, compute.shard_size)
                                                for i in (shards if shards is not None else range(n_shards))))
    logger.info("extracting %s (%s, weights %s) on %s: %d of %d samples, %d shards", model.name, model.arch,
                model.weights, compute.device, rows, n_samples, len(shards) if shards is not None else n_shards)
    with progress_bar(f"extract {model.name}", rows, "images") as advance:
        spec = ModelSpec(model.name, model.arch, model.weights, sites, reduction, arch_kwargs=model.arch_kwargs,
                         preprocessing=model.preprocessing, extra_attrs={"finetuned_from": model.finetuned_from,
                                                                      "baseline_of": model.baseline_of})
        summary = extract_model(root, spec, dataset=open_configured_dataset(dataset), samples=samples,
                                options=compute.extract_options(), progress=advance, break_locks=break_locks,
                                shards=shards)
    logger.info("extracted %s: %d sites, %d shards written, %d already done, fingerprint %s", model.name,
                len(summary["sites"]), summary["shards_written"], summary["shards_skipped"], summary["fingerprint"][:12])
    return summary


def shard_ranges(n_samples: int, shard_size: int, parts: int) -> list[list[int]]:
    """The shards of n_samples split into at most `parts` contiguous, non-empty ranges."""
    n_shards = storage.shard_count(n_samples, shard_size)
    size = -(-n_shards // max(1, parts))
    return [list(range(start, min(start + size, n_shards))) for start in range(0, n_shards, size)]


@flow(name="ckaflow-extract")
def extract_stage(config: RunConfig, samples_fingerprint: str, break_locks: bool = False) -> dict[str, str]:
    """Extract every model of the config; returns model name -> activation fingerprint. With
    compute.extract_devices, each model's shards are split into ranges extracted in parallel, one per
    device (each range's writer locks only its own shards)."""
    devices = config.compute.extract_devices
    ranges = []
    if len(devices) > 1:
        n_samples = storage.read_samples(storage.open_store(config.store)).sizes["sample"]
        ranges = shard_ranges(n_samples, config.compute.shard_size, len(devices))
    fingerprints = {}
    for model in config.models:
        args = (config.store, model, config.sites_of(model), config.reduction_of(model), config.dataset)
        if not ranges:
            summary = extract_task(*args, config.compute, samples_fingerprint, break_locks)
        else:
            futures = [extract_task.submit(*args, config.compute.model_copy(update={"device": device}),
                                           samples_fingerprint, break_locks, shards)
                       for device, shards in zip(devices, ranges)]
            summary = futures[0].result()
            if {f.result()["fingerprint"] for f in futures} != {summary["fingerprint"]}:
                raise RuntimeError(f"{model.name}: the devices' shard ranges produced different fingerprints")
        fingerprints[model.name] = summary["fingerprint"]
    return fingerprints
