"""Stage 1: draw the seeded sample of images and record it in the run store.

Always drawn again (cheap next to extraction): the store keeps the manifest when its fingerprint is unchanged, and
replaces it (saying so) when the dataset or the sampling changed."""

from __future__ import annotations

from typing import Any

import storage
from flows.config import DatasetConfig, RunConfig, SamplingConfig
from flows.logs import run_logger
from flows.runner import unit
from flows.stages import RunContext, Stage


def draw_sample(store_url: str, dataset: DatasetConfig, sampling: SamplingConfig) -> str:
    """Sample the images, write samples/ and return the sample fingerprint."""
    from tasks.data import sample_images

    logger = run_logger()
    samples = sample_images(dataset.open(), n=sampling.n, per_class=sampling.per_class, seed=sampling.seed,
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


def run(context: RunContext) -> str:
    """Record the sample of images every later stage uses; returns its fingerprint."""
    config = context.config
    return unit("sample-images", draw_sample, config.store, config.dataset, config.sampling, retries=1, delay=5)


def forget(root: Any, config: RunConfig) -> list[str]:
    storage.delete_samples(root)
    return ["samples"]


SAMPLE = Stage(name="sample", output="samples", fingerprint=lambda context: storage.samples_fingerprint(context.root),
               run=run, forget=forget)
