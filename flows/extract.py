"""Stage 2: run every model over the sample and write its sites' activations to the store.

The store decides what is done: every model is handed to `extract_model`, which keeps the stored
activations only when their fingerprint (model and weights content, sites, reduction, preprocessing,
dtype, sample) equals the current one, replaces them otherwise, and extracts only the shards not done."""

from __future__ import annotations

from typing import Any

import storage
from flows.config import ComputeConfig, DatasetConfig, ModelConfig, RunConfig
from flows.logs import run_logger
from flows.progress import progress_bar
from flows.runner import unit, units
from flows.stages import RunContext, Stage


def extract_one(store_url: str, model: ModelConfig, sites: str | list[str], reduction: str,
                dataset: DatasetConfig, compute: ComputeConfig, samples_fingerprint: str,
                break_locks: bool = False, shards: list[int] | None = None) -> dict[str, Any]:
    """Extract one model's sites (all shards, or `shards`), resuming at shard granularity; returns its
    summary and fingerprint."""
    from tasks.extract import ModelSpec, describe_preprocessing, extract_model

    logger = run_logger()
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
        summary = extract_model(root, spec, dataset=dataset.open(), samples=samples,
                                options=compute.extract_options(), progress=advance, break_locks=break_locks,
                                shards=shards)
    logger.info("extracted %s: %d sites, %d shards written, %d already done, fingerprint %s; input %s", model.name,
                len(summary["sites"]), summary["shards_written"], summary["shards_skipped"], summary["fingerprint"][:12],
                describe_preprocessing(summary["preprocessing"]))
    return summary


def shard_ranges(n_samples: int, shard_size: int, parts: int) -> list[list[int]]:
    """The shards of n_samples split into at most `parts` contiguous, non-empty ranges."""
    n_shards = storage.shard_count(n_samples, shard_size)
    size = -(-n_shards // max(1, parts))
    return [list(range(start, min(start + size, n_shards))) for start in range(0, n_shards, size)]


def run(context: RunContext) -> dict[str, str]:
    """Extract every model of the config; returns model name -> activation fingerprint. With
    compute.extract_devices, each model's shards are split into ranges extracted in parallel, one per
    device (each range's writer locks only its own shards)."""
    config, samples_fingerprint = context.config, context.upstream["samples"]
    devices = config.compute.extract_devices
    ranges = []
    if len(devices) > 1:
        n_samples = storage.read_samples(context.root).sizes["sample"]
        ranges = shard_ranges(n_samples, config.compute.shard_size, len(devices))
    fingerprints = {}
    for model in config.models:
        args = (config.store, model, config.sites_of(model), config.reduction_of(model), config.dataset)
        if not ranges:
            summary = unit("extract-model", extract_one, *args, config.compute, samples_fingerprint,
                           context.break_locks, retries=2)
        else:
            calls = [((*args, config.compute.model_copy(update={"device": device}), samples_fingerprint,
                       context.break_locks, shards), {}) for device, shards in zip(devices, ranges)]
            summaries = units("extract-model", extract_one, calls, retries=2)
            summary = summaries[0]
            if {s["fingerprint"] for s in summaries} != {summary["fingerprint"]}:
                raise RuntimeError(f"{model.name}: the devices' shard ranges produced different fingerprints")
        fingerprints[model.name] = summary["fingerprint"]
    return fingerprints


def stored(context: RunContext) -> dict[str, str]:
    """The activation fingerprints the store holds for the config's models (models not extracted are left out)."""
    root = context.root
    extracted = set(storage.list_models(root))
    return {m.name: storage.model_attrs(root, m.name)["fingerprint"] for m in context.config.models
            if m.name in extracted}


def require_extracted(context: RunContext) -> dict[str, str]:
    """The upstream activation fingerprints, every model of the config among them (StoreError naming the
    first one the store lacks)."""
    models = dict(context.upstream["models"])
    for model in context.config.models:
        if model.name not in models:
            storage.model_attrs(context.root, model.name)
    return models


def forget(root: Any, config: RunConfig) -> list[str]:
    for model in config.models:
        storage.delete_model(root, model.name)
    return [f"activations/{m.name}" for m in config.models]


EXTRACT = Stage(name="extract", output="models", fingerprint=stored, run=run, forget=forget)
