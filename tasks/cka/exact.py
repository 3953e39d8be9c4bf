"""The CKA engine's public API: all S x S site pairs in one pass, exact (blocked or feature space) or by
minibatches, parallel on Dask, out of core, resumable, incremental.

- `cka_matrix`: exact CKA. Pass 1 reads every site once (column means and scales, constant and
  non-finite checks, digests of the stored bytes when resuming, RBF bandwidths). Pass 2 is either
  the sample-space *blocked* path (every block pair a <= b is one task building all S block Grams
  and their S x S products; any kernel) or the *features* path (linear only: cross-products of centred features per site-group
  pair). Sums are float64; `precision` is the working precision of the Grams and their products
  ("float32", the default, or "float64"). Rows are centred (float64 means) and divided by the site's
  RMS before the cast, so float32 agrees with the float64 reference to 1e-5 whatever the offsets and
  scales (tests/cka/test_hard.py) and float64 to ~1e-12.
- `minibatch_cka_matrix` (`tasks.cka.minibatch`): Nguyen, Raghu & Kornblith (2021): unbiased linear
  HSIC_1 averaged over seeded minibatches, with jackknife standard errors across minibatches.
- Both take `known`, a previous matrix whose entries between sites present in both are reused; only
  pairs involving a new site are computed (`tasks.cka._known` says what that saves).

Degenerate sites (constant, non-finite values, zero RBF median distance, too few samples, a self-HSIC
at most N eps ||K||_F^2: `tasks.cka.reference`) get NaN rows and columns, a reason in
attrs["nan_reasons"] and a `DegenerateSiteWarning`; other entries are unaffected.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from storage import json_safe, parse_size
from tasks.cka import _plan as cka_plan
from tasks.cka._execute import map_reduce
from tasks.cka._features import features_pair_sums
from tasks.cka._grams import GramSpec, block_pair_sums, merge_grams, site_grams, stacked_sums
from tasks.cka._known import align_known, reuse_counts
from tasks.cka.options import RBF_MEDIAN_SAMPLES
from tasks.cka._partials import Partials
from tasks.cka._passes import (
    Ticker,
    concurrency,
    data_array,
    first_pass,
    scan_blocks,
    warn_degenerate,
)
from tasks.cka.reference import KERNELS
from tasks.cka._sources import ColumnStats, Sources, degenerate_reasons, rbf_scale
from tasks.cka._sums import Sums, cka_from_hsic, combine, hsic_matrix, self_floor
from tasks.extract import resolve_device

METHODS = ("auto", "blocked", "features")
RBF_MEDIAN_SEED = 0


def _rbf_scales(sources: Sources, stats: ColumnStats, skip: set[int], threshold: float,
                n_sample: int, client: Any, tick: Ticker) -> dict[int, tuple[float, float]]:
    """Site -> (median squared distance, mean kernel value) on a seeded subsample (all rows if small)."""
    n = sources.n
    index = (np.arange(n) if n <= n_sample
             else np.sort(np.random.default_rng(RBF_MEDIAN_SEED).choice(n, n_sample, replace=False)))
    means, scales = stats.means, stats.scales

    def one(src: Sources, s: int) -> dict[int, tuple[float, float]]:
        return {s: rbf_scale(src, s, index, means[s], scales[s], threshold)}

    items = [(s,) for s in range(len(sources.keys)) if s not in skip]
    merged = map_reduce(one, items, lambda parts: {k: v for p in parts for k, v in p.items()},
                        client=client, shared=sources, on_result=lambda i, part: tick())
    return merged or {}


def _fingerprint(means: list[np.ndarray], scales: list[float]) -> str:
    """Digest of the float64 means and scales the Grams are built with."""
    h = hashlib.sha256(np.asarray(scales, dtype=np.float64).tobytes())
    for mean in means:
        h.update(np.ascontiguousarray(mean, dtype=np.float64).tobytes())
    return h.hexdigest()


def _choose_method(method: str, kernel: str, sources: Sources, per_task: int, precision: str,
                   new: frozenset[int] | None) -> tuple[str, list[cka_plan.Item] | None]:
    """The path to take and, for the features path, its site-group pairs (errors name the site)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "features" and kernel != "linear":
        raise ValueError("method 'features' only exists for the linear kernel")
    chosen, items = cka_plan.choose_method(method, kernel, sources.n, sources.dims, per_task, precision, new)
    if chosen == "features" and items is None:
        raise ValueError(cka_plan.too_wide(repr(sources.keys[int(np.argmax(sources.dims))]), max(sources.dims)))
    return chosen, items


def _tasks(chosen: str, items: list[cka_plan.Item] | None, sources: Sources, block_size: int | None, block: int,
           per_task: int, precision: str) -> tuple[Callable[..., Sums], list[tuple], list[str], int]:
    """(task function, its argument tuples, their names, block size) of pass 2."""
    n, dims = sources.n, sources.dims
    if chosen == "features":
        width = max(sum(dims[s] for s in a) + sum(dims[s] for s in b) for a, b in items)
        block = block_size or cka_plan.feature_rows_for(per_task, width, precision, n)
        chunks = cka_plan.blocks(n, block)
        return features_pair_sums, [(a, b, chunks) for a, b in items], [f"items_{i}" for i in range(len(items))], block
    pairs = cka_plan.blocks(n, block)
    block_pairs = [(a, b) for i, a in enumerate(pairs) for b in pairs[i:]]
    return block_pair_sums, block_pairs, [f"blocks_{a[0]}_{b[0]}" for a, b in block_pairs], block


def _rbf_spec(sources: Sources, stats: ColumnStats, reasons: dict[str, str], threshold: float, n_sample: int,
              client: Any, tick: Ticker) -> tuple[list[float], list[float], dict[str, Any]]:
    """Per-site RBF bandwidths 2 t^2 m and mean kernel values (degenerate ones added to `reasons`), and attrs.

    The median m is exact (all N^2 pairs) for N <= n_sample, else over a seeded n_sample-row subsample:
    independent of the memory budget, and recorded."""
    keys, n = sources.keys, sources.n
    bandwidths, offsets = [1.0] * len(keys), [0.0] * len(keys)
    n_sample = min(n, n_sample)
    skip = {i for i, k in enumerate(keys) if k in reasons}
    scales = _rbf_scales(sources, stats, skip, threshold, n_sample, client, tick)
    for s, (median, offset) in scales.items():
        if not median > 0:
            reasons[keys[s]] = "median squared pairwise distance is 0 (RBF bandwidth undefined)"
        bandwidths[s], offsets[s] = 2.0 * threshold**2 * median, offset
    attrs = {"rbf_threshold": threshold, "rbf_median_samples": n_sample, "rbf_median_seed": RBF_MEDIAN_SEED,
             "rbf_median_exact": n_sample == n,
             "rbf_median": {keys[s]: float(m) for s, (m, _) in scales.items()}}
    return bandwidths, offsets, attrs


def _pass_two(spec: GramSpec, task: Callable[..., Sums], items: list[tuple], names: list[str], client: Any,
              store: Partials | None, tick: Ticker, unbiased: bool, reasons: dict[str, str]) -> tuple[np.ndarray, int]:
    """The CKA matrix from the tasks `store` has not finished plus the stored ones, and how many were stored."""
    keys, n = spec.sources.keys, spec.sources.n
    finished = store.done() & set(names) if store is not None else set()
    todo = [i for i, name in enumerate(names) if name not in finished]
    tick(len(finished))
    if len(spec.skip) == len(keys):
        return np.full((len(keys), len(keys)), np.nan), len(finished)

    def on_result(i: int, part: Sums) -> None:
        if store is not None:
            store.save(names[todo[i]], part)
        tick()

    total = map_reduce(task, [items[i] for i in todo], combine, client=client, shared=spec, on_result=on_result)
    for name in finished:
        loaded = store.load(name)
        total = loaded if total is None else combine([total, loaded])
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = self_floor(total, n, unbiased=unbiased, precision=spec.precision)
        return cka_from_hsic(hsic_matrix(total, n, unbiased=unbiased), keys, reasons, floor), len(finished)


def _site_major(spec: GramSpec, groups: list[list[int]], read_rows: int, client: Any, tick: Ticker,
                unbiased: bool, reasons: dict[str, str]) -> np.ndarray:
    """The CKA matrix by the site-major schedule: every site's full Gram from its rows read once (a task per
    site group), then all Gram products at once."""
    keys, n = spec.sources.keys, spec.sources.n
    items = [([s for s in group if s not in spec.skip], read_rows) for group in groups]
    grams = map_reduce(site_grams, [item for item in items if item[0]], merge_grams, client=client, shared=spec,
                       on_result=lambda i, part: tick())
    tick(sum(1 for group, _ in items if not group))
    total = stacked_sums(spec, grams or {}, unbiased)
    tick()
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = self_floor(total, n, unbiased=unbiased, precision=spec.precision)
        return cka_from_hsic(hsic_matrix(total, n, unbiased=unbiased), keys, reasons, floor)


def cka_matrix(arrays: Mapping[str, Any], *, kernel: str = "linear", unbiased: bool = False,
               rbf_threshold: float = 0.5, method: str = "auto", precision: str = "float32",
               block_size: int | None = None, memory_budget: str | int = "2GiB", client: Any = None,
               partials: Any = None, progress: Callable[[int, int], Any] | None = None,
               device: str = "auto", known: xr.DataArray | None = None,
               rbf_median_samples: int = RBF_MEDIAN_SAMPLES) -> xr.DataArray:
    """Exact CKA between every pair of sites: an (S, S) DataArray with dims (site_a, site_b).

    arrays: site id -> (N, d_s) numpy / dask / Zarr / xarray array (same N for all).
    method: 'blocked' (sample space, any kernel), 'features' (linear only) or 'auto' (the cheaper).
    block_size: rows per block (blocked path) / row chunk (features path); default from memory_budget,
    which bounds the working memory of all concurrent tasks together. client: a distributed.Client
    (None: run in this process). partials: a Zarr group where finished tasks' partial sums are kept
    so a rerun skips them (cleared when the matrix is complete). progress: called with (tasks just
    finished, total tasks): scan blocks, then block pairs (blocked) or row chunks (features). device: 'auto' (CUDA if available), 'cpu' or 'cuda[:k]'.
    known: a previous matrix with the same kernel, estimator and N (plain site-id coords or a
    model/layer/sublayer MultiIndex): its entries between sites present in both are reused exactly
    and only pairs involving a new site are computed (`tasks.cka._known` says what that saves);
    attrs reused_entries / computed_entries count them.
    rbf_median_samples: the RBF median is exact for N up to this, else over a seeded subsample of this
    many rows (attrs rbf_median_samples, rbf_median_seed).
    Partial sums are keyed by everything that produced them (digests of the stored bytes of every
    site, kernel, estimator, precision, block plan, means, scales, RBF bandwidths); stored sums under
    another key are discarded, with the reason logged.
    """
    start_time = time.perf_counter()
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not rbf_threshold > 0:
        raise ValueError(f"rbf_threshold must be > 0, got {rbf_threshold!r}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    if rbf_median_samples < 2:
        raise ValueError(f"rbf_median_samples must be >= 2, got {rbf_median_samples!r}")
    sources = Sources.from_mapping(arrays)
    keys, n, n_sites = sources.keys, sources.n, len(sources.keys)
    estimator = "unbiased" if unbiased else "biased"
    reuse = align_known(known, keys, {"kernel": kernel, "estimator": estimator, "n_samples": n,
                                      **({"rbf_threshold": rbf_threshold} if kernel == "rbf" else {})})
    if reuse is not None and not reuse.new_sites:
        return data_array(reuse.values, keys, {**reuse.reused_attrs(), "seconds": time.perf_counter() - start_time})
    new = reuse.new_sites if reuse is not None else None
    device = str(resolve_device(device))
    budget = parse_size(memory_budget)
    per_task = budget // concurrency(client)
    gram_block = block_size or cka_plan.block_size_for(per_task, n, n_sites, max(sources.dims), precision,
                                                       sources.read_rows(), sources.stored_itemsize())
    chosen, feature_items = _choose_method(method, kernel, sources, per_task, precision, new)
    shortfall = cka_plan.budget_shortfall(chosen, sources.dims, budget, concurrency(client), precision,
                                          sources.read_rows(), sources.stored_itemsize())
    if shortfall:
        raise ValueError(shortfall)
    by_site = chosen == "blocked" and block_size is None and cka_plan.site_major_fits(
        budget, concurrency(client), n, sources.dims, precision, sources.read_rows(), sources.stored_itemsize())
    if by_site:
        groups = cka_plan.site_groups(sources.dims, concurrency(client))
        read_rows = cka_plan.site_read_rows(n, max(sources.dims), sources.read_rows(), sources.stored_itemsize())
        items, block = groups, n
    else:
        task, items, names, block = _tasks(chosen, feature_items, sources, block_size, gram_block, per_task,
                                           precision)
    scan = scan_blocks(sources, per_task, client)
    tick = Ticker(progress, len(scan) + (n_sites if kernel == "rbf" else 0) + len(items) + by_site)

    stats = first_pass(sources, scan, client, tick, digest=partials is not None and not by_site)
    reasons = degenerate_reasons(keys, stats)
    if unbiased and n < 4:
        reasons.update({k: f"unbiased HSIC needs at least 4 samples, got {n}" for k in keys})
    attrs: dict[str, Any] = {"kernel": kernel, "estimator": estimator, "n_samples": n, "block_size": block,
                             "method": chosen, "precision": precision, "device": device, "memory_budget": budget,
                             **({"schedule": "sites" if by_site else "block pairs"} if chosen == "blocked" else {})}
    bandwidths, offsets = [1.0] * n_sites, [0.0] * n_sites
    if kernel == "rbf":
        bandwidths, offsets, rbf_attrs = _rbf_spec(sources, stats, reasons, rbf_threshold, rbf_median_samples,
                                                   client, tick)
        attrs.update(rbf_attrs)
    skip = frozenset(i for i, k in enumerate(keys) if k in reasons)
    spec = GramSpec(sources, stats.means, stats.scales, skip, kernel, bandwidths, offsets, precision, device,
                    rows=new)
    store = None
    if by_site:
        if partials is not None:            # its tasks are short: nothing is kept; older plans' sums go
            Partials(partials, {"schedule": "sites"}).clear()
        matrix, resumed = _site_major(spec, groups, read_rows, client, tick, unbiased, reasons), 0
    elif partials is not None:
        plan = {"data": stats.content_digest(keys, sources), "method": chosen, "kernel": kernel,
                "estimator": estimator, "precision": precision, "block_size": block, "n": n, "keys": keys,
                "dims": sources.dims, "items": feature_items, "new": sorted(new) if new is not None else None,
                "skip": sorted(skip), "centring": _fingerprint(stats.means, stats.scales),
                "rbf": [bandwidths, offsets] if kernel == "rbf" else None}
        store = Partials(partials, json_safe(plan))
    if not by_site:
        matrix, resumed = _pass_two(spec, task, items, names, client, store, tick, unbiased, reasons)
    if reuse is not None:
        matrix = reuse.merge(matrix, reuse.values)
    if store is not None:
        store.clear()
    warn_degenerate(reasons)
    attrs.update({"n_tasks": len(items), "resumed_tasks": resumed, "nan_reasons": dict(reasons),
                  **reuse_counts(reuse, n_sites), "seconds": time.perf_counter() - start_time})
    return data_array(matrix, keys, attrs)
