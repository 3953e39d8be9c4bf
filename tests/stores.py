"""Test helper: features written into a run store through the real ActivationWriter."""

from __future__ import annotations

import numpy as np

import storage


def write_features(root, model: str, sites: dict[str, np.ndarray], *, shard_size: int,
                   fingerprint: str | None = None) -> None:
    """Every shard of `sites` (site name -> (n, d) array) for `model`, marked done; recorded as extracted
    from the store's sample when it has one (as `extract_model` records it)."""
    n = next(iter(sites.values())).shape[0]
    try:
        attrs = {"samples_fingerprint": storage.samples_fingerprint(root)}
    except storage.StoreError:
        attrs = {}
    with storage.ActivationWriter(root, model, widths={s: x.shape[1] for s, x in sites.items()}, n_samples=n,
                                  shard_size=shard_size, fingerprint=fingerprint or f"fp-{model}", attrs=attrs) as writer:
        for shard in range(writer.n_shards):
            a, b = writer.shard_bounds(shard)
            writer.write_shard(shard, {s: x[a:b] for s, x in sites.items()})
