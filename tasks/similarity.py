"""The CKA engine's public API: all S x S site pairs in one pass, exact (blocked or feature space) or by
minibatches, parallel on Dask, out of core, resumable.

- `cka_matrix`: exact CKA. Pass 1 reads every site once (column means, constant and non-finite
  checks, RBF bandwidths on a seeded subsample). Pass 2 is either the sample-space *blocked* path
  (every block pair a <= b is one task building all S block Grams and their S x S products; any
  kernel) or the *features* path (linear only: cross-products of centred features per site-group
  pair). Sums are float64; `precision` is the working precision of the Grams and their products
  ("float32", the default, agrees with the float64 reference to ~1e-6; "float64" to ~1e-12).
- `minibatch_cka_matrix`: Nguyen, Raghu & Kornblith (2021): unbiased linear HSIC_1 averaged over
  seeded minibatches, with jackknife standard errors across minibatches.

Degenerate sites (constant, non-finite values, zero self-HSIC, too few samples) get NaN rows and
columns, a reason in attrs["nan_reasons"] and a `DegenerateSiteWarning`; other entries are unaffected.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from tasks import cka_plan
from tasks.cka import KERNELS
from tasks.cka_exec import map_reduce
from tasks.cka_features import features_pair_sums
from tasks.cka_partials import Partials
from tasks.cka_sources import ColumnStats, Sources, column_stats, combine_stats, degenerate_reasons, rbf_scale
from tasks.cka_sums import Sums, cka_from_hsic, combine, hsic_matrix
from tasks.gram_blocks import GramSpec, block_pair_sums, gram_sums, resolve_device

METHODS = ("auto", "blocked", "features")
RBF_MEDIAN_SAMPLES = 2048      # RBF median: exact (all N^2 pairs) up to this N, else a seeded subsample
RBF_MEDIAN_SEED = 0


class DegenerateSiteWarning(RuntimeWarning):
    """Some CKA entries are NaN because a site's kernel is degenerate; reasons are in the attrs."""


class _Ticker:
    """Reports finished work to `progress` as fractions of the whole that sum to 1."""

    def __init__(self, progress: Callable[[float], Any] | None, total: int):
        self.progress, self.total = progress, max(total, 1)

    def __call__(self, units: int = 1) -> None:
        if self.progress is not None and units:
            self.progress(units / self.total)


def _concurrency(client: Any) -> int:
    return max(1, sum(client.nthreads().values())) if client is not None else 1


def _first_pass(sources: Sources, block: int, client: Any, tick: _Ticker) -> ColumnStats:
    chunks = cka_plan.blocks(sources.n, block)
    return map_reduce(column_stats, chunks, combine_stats, client=client, shared=sources,
                      on_result=lambda i, part: tick())


def _rbf_scales(sources: Sources, means: list[np.ndarray], skip: set[int], threshold: float,
                n_sample: int, client: Any, tick: _Ticker) -> dict[int, tuple[float, float]]:
    """Site -> (median squared distance, mean kernel value) on a seeded subsample (all rows if small)."""
    n = sources.n
    index = (np.arange(n) if n <= n_sample
             else np.sort(np.random.default_rng(RBF_MEDIAN_SEED).choice(n, n_sample, replace=False)))

    def one(src: Sources, s: int) -> dict[int, tuple[float, float]]:
        return {s: rbf_scale(src, s, index, means[s], threshold)}

    items = [(s,) for s in range(len(sources.keys)) if s not in skip]
    merged = map_reduce(one, items, lambda parts: {k: v for p in parts for k, v in p.items()},
                        client=client, shared=sources, on_result=lambda i, part: tick())
    return merged or {}


def _digest(keys: list[str], stats: ColumnStats) -> str:
    """Fingerprint of the data as seen by pass 1 (ties stored partial sums to these activations)."""
    h = hashlib.sha256(json.dumps(keys).encode())
    for values in (*stats.sums, *stats.mins, *stats.maxs):
        h.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    h.update(json.dumps(stats.nonfinite).encode())
    return h.hexdigest()


def _data_array(matrix: np.ndarray, keys: list[str], attrs: dict) -> xr.DataArray:
    return xr.DataArray(matrix, dims=("site_a", "site_b"), coords={"site_a": list(keys), "site_b": list(keys)},
                        attrs=attrs)


def _warn(reasons: dict[str, str]) -> None:
    if reasons:
        listed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        warnings.warn(f"CKA is NaN for {len(reasons)} site(s): {listed}", DegenerateSiteWarning, stacklevel=3)


def _choose_method(method: str, kernel: str, sources: Sources, per_task: int, precision: str, block: int
                   ) -> tuple[str, list[list[int]] | None]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    groups = (cka_plan.feature_groups(sources.dims, cka_plan.feature_group_cap(per_task, precision))
              if kernel == "linear" else None)
    if method == "features":
        if kernel != "linear":
            raise ValueError("method 'features' only exists for the linear kernel")
        if groups is None:
            widest = sources.keys[int(np.argmax(sources.dims))]
            raise ValueError(f"method 'features': site {widest!r} has {max(sources.dims)} features, too many for "
                             f"memory_budget; use method='blocked' or a larger budget")
        return "features", groups
    if method == "auto" and groups is not None and (
            cka_plan.features_cost(sources.n, sources.dims, groups)
            < cka_plan.blocked_cost(sources.n, sources.dims, block)):
        return "features", groups
    return "blocked", None


def cka_matrix(arrays: Mapping[str, Any], *, kernel: str = "linear", unbiased: bool = False,
               rbf_threshold: float = 0.5, method: str = "auto", precision: str = "float32",
               block_size: int | None = None, memory_budget: str | int = "2GiB", client: Any = None,
               partials: Any = None, progress: Callable[[float], Any] | None = None,
               device: str = "auto") -> xr.DataArray:
    """Exact CKA between every pair of sites: an (S, S) DataArray with dims (site_a, site_b).

    arrays: site id -> (N, d_s) numpy / dask / Zarr / xarray array (same N for all).
    method: 'blocked' (sample space, any kernel), 'features' (linear only) or 'auto' (the cheaper).
    block_size: rows per block (blocked path) / row chunk (features path); default from memory_budget,
    which bounds the working memory of all concurrent tasks together. client: a distributed.Client
    (None: run in this process). partials: a Zarr group where finished tasks' partial sums are kept
    so a rerun skips them (cleared when the matrix is complete). progress: called with fractions of
    the work that sum to 1. device: 'auto' (CUDA if available), 'cpu' or 'cuda[:k]'.
    """
    start_time = time.perf_counter()
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not rbf_threshold > 0:
        raise ValueError(f"rbf_threshold must be > 0, got {rbf_threshold!r}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    sources = Sources.from_mapping(arrays)
    keys, n, n_sites = sources.keys, sources.n, len(sources.keys)
    device = resolve_device(device)
    budget = cka_plan.parse_size(memory_budget)
    per_task = budget // _concurrency(client)
    block = block_size or cka_plan.block_size_for(per_task, n, n_sites, max(sources.dims), precision,
                                                  sources.read_rows(), sources.stored_itemsize())
    chosen, groups = _choose_method(method, kernel, sources, per_task, precision, block)

    stat_block = block
    stat_chunks = cka_plan.blocks(n, stat_block)
    if chosen == "features":
        block = block_size or cka_plan.feature_rows_for(
            per_task, 2 * max(sum(sources.dims[s] for s in g) for g in groups), precision, n)
        chunks = cka_plan.blocks(n, block)
        items = [(ga, gb, chunks) for i, ga in enumerate(groups) for gb in groups[i:]]
        names = [f"groups_{i}_{j}" for i in range(len(groups)) for j in range(i, len(groups))]
        task = features_pair_sums
    else:
        pairs = cka_plan.blocks(n, block)
        items = [(a, b) for i, a in enumerate(pairs) for b in pairs[i:]]
        names = [f"blocks_{a[0]}_{b[0]}" for a, b in items]
        task = block_pair_sums
    n_rbf = n_sites if kernel == "rbf" else 0
    tick = _Ticker(progress, len(stat_chunks) + n_rbf + len(items))

    stats = _first_pass(sources, stat_block, client, tick)
    means = [s / n for s in stats.sums]
    reasons = degenerate_reasons(keys, stats)
    if unbiased and n < 4:
        reasons.update({k: f"unbiased HSIC needs at least 4 samples, got {n}" for k in keys})
    attrs: dict[str, Any] = {"kernel": kernel, "estimator": "unbiased" if unbiased else "biased",
                             "n_samples": n, "block_size": block, "method": chosen, "precision": precision,
                             "device": device, "memory_budget": budget}
    bandwidths, offsets = [1.0] * n_sites, [0.0] * n_sites
    if kernel == "rbf":
        n_sample = min(n, RBF_MEDIAN_SAMPLES, int(np.sqrt(budget / 24)))
        skip = {i for i, k in enumerate(keys) if k in reasons}
        scales = _rbf_scales(sources, means, skip, rbf_threshold, n_sample, client, tick)
        for s, (median, offset) in scales.items():
            if not median > 0:
                reasons[keys[s]] = "median squared pairwise distance is 0 (RBF bandwidth undefined)"
            bandwidths[s], offsets[s] = 2.0 * rbf_threshold**2 * median, offset
        attrs.update({"rbf_threshold": rbf_threshold, "rbf_median_samples": n_sample,
                      "rbf_median_seed": RBF_MEDIAN_SEED,
                      "rbf_median": {keys[s]: float(m) for s, (m, _) in scales.items()}})
    skip = frozenset(i for i, k in enumerate(keys) if k in reasons)
    spec = GramSpec(sources, means, skip, kernel, bandwidths, offsets, precision, device)

    store = None
    if partials is not None:
        plan = {"method": chosen, "kernel": kernel, "precision": precision, "block_size": block, "n": n,
                "keys": keys, "dims": sources.dims, "data": _digest(keys, stats),
                "rbf": [bandwidths, offsets] if kernel == "rbf" else None}
        store = Partials(partials, json.loads(json.dumps(plan)))
    finished = store.done() & set(names) if store is not None else set()
    todo = [i for i, name in enumerate(names) if name not in finished]
    tick(len(finished))

    def on_result(i: int, part: Sums) -> None:
        if store is not None:
            store.save(names[todo[i]], part)
        tick()

    if len(skip) < n_sites:
        total = map_reduce(task, [items[i] for i in todo], combine, client=client, shared=spec,
                           on_result=on_result)
        for name in finished:
            loaded = store.load(name)
            total = loaded if total is None else combine([total, loaded])
        with np.errstate(invalid="ignore", divide="ignore"):
            matrix = cka_from_hsic(hsic_matrix(total, n, unbiased=unbiased), keys, reasons)
    else:
        matrix = np.full((n_sites, n_sites), np.nan)
    if store is not None:
        store.clear()
    _warn(reasons)
    attrs.update({"n_tasks": len(items), "resumed_tasks": len(finished), "nan_reasons": dict(reasons),
                  "seconds": time.perf_counter() - start_time})
    return _data_array(matrix, keys, attrs)


def _minibatch_hsic(spec: GramSpec, batches: list[np.ndarray]) -> np.ndarray:
    """Unbiased HSIC_1 matrices (len(batches), S, S) of the given minibatches (row index arrays)."""
    union = np.unique(np.concatenate(batches))
    cache = {s: spec.sources.take(s, union, dtype=None) for s in range(len(spec.sources.keys)) if s not in spec.skip}
    out = []
    for batch in batches:
        pos = np.searchsorted(union, batch)
        sums = gram_sums(spec, lambda s: (spec.tensor(s, cache[s][pos]), None), (0, 0), (len(batch), len(batch)), same=True)
        out.append(hsic_matrix(sums, len(batch), unbiased=True))
    return np.stack(out)


def minibatch_cka_matrix(arrays: Mapping[str, Any], *, batch_size: int = 256, seed: int = 0, client: Any = None,
                         precision: str = "float32", memory_budget: str | int = "2GiB",
                         progress: Callable[[float], Any] | None = None, device: str = "auto") -> xr.Dataset:
    """Minibatch linear CKA (mean unbiased HSIC_1 over seeded minibatches) and its jackknife standard error.

    The samples are shuffled with `seed` and cut into floor(N / batch_size) minibatches (the remainder
    is left out; batch_size >= N gives one batch of all N samples, i.e. exact unbiased CKA).
    Returns a Dataset with variables cka and stderr, dims (site_a, site_b).
    """
    start_time = time.perf_counter()
    sources = Sources.from_mapping(arrays)
    keys, n, n_sites = sources.keys, sources.n, len(sources.keys)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = resolve_device(device)
    budget = cka_plan.parse_size(memory_budget)
    per_task = budget // _concurrency(client)
    size = min(batch_size, n)
    n_batches = n // size
    order = np.random.default_rng(seed).permutation(n)[: n_batches * size].reshape(n_batches, size)
    batch_bytes = size * sum(sources.dims) * 8 + (n_sites + 2) * size * size * cka_plan.itemsize(precision)
    per_group = max(1, int(cka_plan.SAFETY * per_task // batch_bytes))
    groups = [(list(order[i:i + per_group]),) for i in range(0, n_batches, per_group)]
    stat_chunks = cka_plan.blocks(n, max(size, cka_plan.MIN_BLOCK))
    tick = _Ticker(progress, len(stat_chunks) + len(groups))

    stats = _first_pass(sources, max(size, cka_plan.MIN_BLOCK), client, tick)
    reasons = degenerate_reasons(keys, stats)
    if size < 4:
        reasons.update({k: f"unbiased HSIC needs minibatches of at least 4 samples, got {size}" for k in keys})
    skip = frozenset(i for i, k in enumerate(keys) if k in reasons)
    spec = GramSpec(sources, [s / n for s in stats.sums], skip, "linear", [], [], precision, device)
    cka = stderr = np.full((n_sites, n_sites), np.nan)
    if len(skip) < n_sites:
        per_batch = map_reduce(_minibatch_hsic, groups, np.concatenate, client=client, shared=spec,
                               on_result=lambda i, part: tick())
        with np.errstate(invalid="ignore", divide="ignore"):
            cka = cka_from_hsic(per_batch.mean(axis=0), keys, reasons)
            if n_batches > 1:
                total = per_batch.sum(axis=0)
                jack = np.stack([cka_from_hsic((total - h) / (n_batches - 1), keys, dict(reasons))
                                 for h in per_batch])
                stderr = np.sqrt((n_batches - 1) / n_batches * ((jack - jack.mean(axis=0)) ** 2).sum(axis=0))
    _warn(reasons)
    attrs = {"kernel": "linear", "estimator": "unbiased", "method": "minibatch", "n_samples": n,
             "batch_size": size, "n_batches": n_batches, "samples_used": n_batches * size, "seed": seed,
             "stderr": "jackknife over minibatches" if n_batches > 1 else "undefined (one minibatch)",
             "precision": precision, "device": device, "nan_reasons": dict(reasons),
             "seconds": time.perf_counter() - start_time}
    return xr.Dataset({"cka": _data_array(cka, keys, {}), "stderr": _data_array(stderr, keys, {})}, attrs=attrs)
