"""Minibatch CKA (Nguyen, Raghu & Kornblith 2021): unbiased linear HSIC_1 averaged over seeded
minibatches, with jackknife standard errors across minibatches; re-exported by `tasks.cka.exact`.

Tasks take groups of minibatches (as many as fit their memory budget). Chunked inputs (Zarr, dask)
needing more than one group are first copied in minibatch order (`tasks.cka._shuffle`), so each
group reads contiguous chunks and the reads grow with N, not N^2 / batch."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import xarray as xr

from storage import parse_size
from tasks.cka import _plan as cka_plan
from tasks.cka._execute import map_reduce
from tasks.cka._grams import GramSpec, gram_sums
from tasks.cka._known import align_known, reuse_counts
from tasks.cka._passes import Ticker, concurrency, data_array, first_pass, scan_blocks, warn_degenerate
from tasks.cka._shuffle import copy_plan, scratch_space, shuffled_copy
from tasks.cka._sources import Sources, degenerate_reasons
from tasks.cka._sums import cka_from_hsic, hsic_matrix, self_floor
from tasks.extract import resolve_device

MIN_BATCH = 4  # unbiased HSIC_1 needs at least 4 samples


def _minibatch_hsic(spec: GramSpec, batches: list[np.ndarray]) -> np.ndarray:
    """Unbiased HSIC_1 matrices of the given minibatches (row index arrays), each with its per-site
    degenerate floor (`self_floor`) as an extra last column: (len(batches), S, S + 1)."""
    union = np.unique(np.concatenate(batches))
    cache = {s: spec.sources.take(s, union, dtype=None) for s in range(len(spec.sources.keys)) if s not in spec.skip}
    out = []
    for batch in batches:
        pos = np.searchsorted(union, batch)
        sums = gram_sums(spec, lambda s: (spec.tensor(s, cache[s][pos]), None), (0, 0), (len(batch), len(batch)),
                         same=True)
        floor = self_floor(sums, len(batch), unbiased=True, precision=spec.precision)
        out.append(np.column_stack([hsic_matrix(sums, len(batch), unbiased=True), floor]))
    return np.stack(out)


def _cka_and_stderr(per_batch: np.ndarray, sizes: np.ndarray, keys: list[str], reasons: dict[str, str]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """CKA of the mean HSIC over minibatches, weighted by their sizes (a short last batch counts less),
    and its delete-one-batch jackknife standard error (NaN with one batch).
    per_batch: `_minibatch_hsic`'s HSIC matrices with their floors (weighted mean floor)."""
    w = np.asarray(sizes, dtype=np.float64)[:, None, None]
    per_batch, floor = per_batch[:, :, :-1], (per_batch[:, :, -1:] * w).sum(axis=0)[:, 0] / w.sum()
    n_batches = len(per_batch)
    total, weight = (per_batch * w).sum(axis=0), w.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        cka = cka_from_hsic(total / weight, keys, reasons, floor)
        if n_batches < 2:
            return cka, np.full_like(cka, np.nan)
        jack = np.stack([cka_from_hsic((total - wi * h) / (weight - wi), keys, dict(reasons), floor)
                         for h, wi in zip(per_batch, w[:, 0, 0])])
        return cka, np.sqrt((n_batches - 1) / n_batches * ((jack - jack.mean(axis=0)) ** 2).sum(axis=0))


def _split_known(known: xr.DataArray | xr.Dataset | None, known_stderr: xr.DataArray | None
                 ) -> tuple[xr.DataArray | None, xr.DataArray | None]:
    if isinstance(known, xr.Dataset):
        return known["cka"].assign_attrs(known.attrs), known["stderr"]
    if known is not None and known_stderr is None:
        raise ValueError("known: minibatch CKA reuses standard errors too; pass known_stderr, or a Dataset "
                         "with variables cka and stderr")
    return known, known_stderr


def _dataset(cka: np.ndarray, stderr: np.ndarray, keys: list[str], attrs: dict) -> xr.Dataset:
    return xr.Dataset({"cka": data_array(cka, keys, {}), "stderr": data_array(stderr, keys, {})}, attrs=attrs)


def _explicit_batches(batches: Sequence[Sequence[int]], n: int) -> list[np.ndarray]:
    """The given minibatches as row-index arrays, checked: each 1-D, of rows in [0, n), at least MIN_BATCH long."""
    out = [np.asarray(b, dtype=np.int64) for b in batches]
    if not out:
        raise ValueError("batches: give at least one minibatch")
    for i, rows in enumerate(out):
        if rows.ndim != 1 or rows.size < MIN_BATCH:
            raise ValueError(f"batches[{i}]: a minibatch needs a flat list of at least {MIN_BATCH} row numbers "
                             f"(unbiased HSIC), got shape {rows.shape}")
        if rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"batches[{i}]: row numbers must lie in [0, {n}); got {rows.min()}..{rows.max()}")
    return out


def _digest(batches: list[np.ndarray]) -> str:
    rows = np.concatenate([np.asarray([len(b) for b in batches], dtype=np.int64), *batches])
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


def minibatch_cka_matrix(arrays: Mapping[str, Any], *, batch_size: int = 256, seed: int = 0, client: Any = None,
                         precision: str = "float32", memory_budget: str | int = "2GiB",
                         progress: Callable[[int, int], Any] | None = None, device: str = "auto",
                         known: xr.DataArray | xr.Dataset | None = None,
                         known_stderr: xr.DataArray | None = None, scratch: Any = None,
                         batches: Sequence[Sequence[int]] | None = None) -> xr.Dataset:
    """Minibatch linear CKA (mean unbiased HSIC_1 over seeded minibatches) and its jackknife standard error.

    The samples are shuffled with `seed` and cut into minibatches of batch_size; a short last batch is
    kept when it has at least 4 samples (unbiased HSIC needs 4) and weighted by its size, else left out
    (attrs samples_used). batch_size >= N gives one batch of all N samples, i.e. exact unbiased CKA.
    batches: the minibatches themselves (row numbers of each, e.g. another tool's DataLoader order), in
    place of batch_size and seed; attrs `batches` records `seeded`, or `given:<digest of the batches>`.
    Returns a Dataset with variables cka and stderr, dims (site_a, site_b).
    known (+ known_stderr, or a Dataset with cka and stderr): a previous result with the same N,
    batch size and seed; its entries and standard errors between sites present in both are reused
    exactly and only pairs involving a new site are computed (see `tasks.cka._known`); attrs
    reused_entries / computed_entries count them.
    scratch: a Zarr group for the shuffled copy of chunked inputs (deleted when done); None: a
    temporary local directory, which suits no client or a LocalCluster; a cluster spanning hosts
    needs a group on storage every worker reaches (the flows use the run store).
    """
    start_time = time.perf_counter()
    sources = Sources.from_mapping(arrays)
    keys, n, n_sites = sources.keys, sources.n, len(sources.keys)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    known, known_stderr = _split_known(known, known_stderr)
    if batches is None:
        size = min(batch_size, n)
        n_used = n if n % size >= MIN_BATCH else n - n % size
        order = np.random.default_rng(seed).permutation(n)[:n_used]
        sizes, drawn = [len(order[i:i + size]) for i in range(0, n_used, size)], "seeded"
    else:
        given = _explicit_batches(batches, n)
        order, sizes, drawn = np.concatenate(given), [len(b) for b in given], f"given:{_digest(given)}"
        size, n_used = max(sizes), int(sum(sizes))
    reuse = align_known(known, keys, {"kernel": "linear", "estimator": "unbiased", "n_samples": n,
                                      "batch_size": size, "seed": seed, "samples_used": n_used,
                                      "batches": drawn}, stderr=known_stderr)
    if reuse is not None and not reuse.new_sites:
        return _dataset(reuse.values, reuse.stderr, keys,
                        {**reuse.reused_attrs(), "seconds": time.perf_counter() - start_time})
    device = str(resolve_device(device))
    per_task = parse_size(memory_budget) // concurrency(client)
    n_batches = len(sizes)
    batch_bytes = size * sum(sources.dims) * 8 + (n_sites + 2) * size * size * cka_plan.itemsize(precision)
    per_group = max(1, int(cka_plan.SAFETY * per_task // batch_bytes))
    copy = None if sources.in_memory or n_batches <= per_group else copy_plan(sources, len(order), size, per_task)
    positions = np.arange(len(order)) if copy else order
    rows = np.split(positions, np.cumsum(sizes)[:-1])
    groups = [(rows[i:i + per_group],) for i in range(0, n_batches, per_group)]
    scan = scan_blocks(sources, per_task, client)
    tick = Ticker(progress, len(scan) + len(groups) + (copy.n_tasks if copy else 0))

    stats = first_pass(sources, scan, client, tick)
    reasons = degenerate_reasons(keys, stats)
    if size < MIN_BATCH:
        reasons.update({k: f"unbiased HSIC needs minibatches of at least {MIN_BATCH} samples, got {size}"
                        for k in keys})
    skip = frozenset(i for i, k in enumerate(keys) if k in reasons)
    cka = stderr = np.full((n_sites, n_sites), np.nan)
    if len(skip) < n_sites:
        with scratch_space(scratch) if copy else nullcontext() as space:
            batched = shuffled_copy(sources, order, copy, space, client, tick) if copy else sources
            spec = GramSpec(batched, stats.means, stats.scales, skip, "linear", [], [], precision, device,
                            rows=reuse.new_sites if reuse is not None else None)
            per_batch = map_reduce(_minibatch_hsic, groups, np.concatenate, client=client, shared=spec,
                                   on_result=lambda i, part: tick())
        cka, stderr = _cka_and_stderr(per_batch, [len(r) for r in rows], keys, reasons)
    if reuse is not None:
        cka, stderr = reuse.merge(cka, reuse.values), reuse.merge(stderr, reuse.stderr)
    warn_degenerate(reasons)
    attrs = {"kernel": "linear", "estimator": "unbiased", "method": "minibatch", "n_samples": n,
             "batch_size": size, "n_batches": n_batches, "samples_used": n_used, "seed": seed,
             "batches": drawn,
             "stderr": "jackknife over minibatches" if n_batches > 1 else "undefined (one minibatch)",
             "shuffled_copy": copy is not None,
             "precision": precision, "device": device, "nan_reasons": dict(reasons),
             **reuse_counts(reuse, n_sites), "seconds": time.perf_counter() - start_time}
    return _dataset(cka, stderr, keys, attrs)
