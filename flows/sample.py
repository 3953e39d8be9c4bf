"""Stage 1: draw the seeded sample of images and record it in the run store.

Always drawn again (cheap next to extraction): the store keeps the manifest when its fingerprint is unchanged, and
replaces it (saying so) when the dataset or the sampling changed."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import storage
from flows.config import DatasetConfig, RunConfig, SamplingConfig
from flows.errors import retry_transient
from flows.preflight import open_configured_dataset
from tasks.data import sample_images


@task(name="sample-images", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def sample_task(store_url: str, dataset: DatasetConfig, sampling: SamplingConfig) -> str:
    """Sample the images, write samples/ and return the sample fingerprint."""
    logger = get_run_logger()
    images = open_configured_dataset(dataset)
    samples = sample_images(images, n=sampling.n, per_class=sampling.per_class, seed=sampling.seed,
                            views=sampling.views, on_bad_image=sampling.on_bad_image)
    root = storage.open_store(store_url)
    previous = storage.recorded_fingerprint(root, "samples")
    if previous not in (None, samples.attrs["fingerprint"]):
        logger.warning("samples/ in %s: replacing the stored sample %s by %s (dataset or sampling changed)",
                       store_url, previous, samples.attrs["fingerprint"])
    storage.write_samples(root, samples)
    skipped = samples.attrs.get("skipped", [])
    logger.info("sampled %d rows (%d images x %d views) from %s; %d bad images skipped",
                samples.sizes["sample"], samples.sizes["sample"] // sampling.views, sampling.views,
                dataset.kind, len(skipped))
    return samples.attrs["fingerprint"]


@flow(name="ckaflow-sample")
def sample_stage(config: RunConfig) -> str:
    """Record the sample of images every later stage uses; returns its fingerprint."""
    return sample_task(config.store, config.dataset, config.sampling)
