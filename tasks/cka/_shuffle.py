"""Seeded shuffled copy of chunked inputs for minibatch CKA: an external two-pass shuffle.

Minibatches are random rows. Read straight from Zarr or dask, every minibatch task would decode
nearly every chunk of every site, so reading would grow as N^2 / batch. Instead the rows in use are
copied once, in minibatch order, into a scratch Zarr group: minibatch i is then rows [i b, (i+1) b)
of the copy, and each minibatch task reads only its own chunks. The copy takes two passes, each
reading and writing every value once, whatever N and the memory budget:

1. sort: a task reads one contiguous *region* of source rows, orders the rows it keeps by their
   output position and writes them to the start of the same region of a staging array. A region is
   one Zarr shard of small inner chunks, so every task owns whole shards.
2. gather: a task owns a range of output rows (whole output chunks). From every region it reads the
   contiguous slice that lands in its range (only the inner chunks that slice touches) and writes
   those rows in minibatch order.
When one region holds every row (a site fits one task's budget), the sort pass writes the copy
itself and there is no staging and no gather pass. Scratch space: the copied data, twice while a
staged copy is made.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from tasks.cka import _plan as cka_plan
from tasks.cka._execute import map_reduce
from tasks.cka._sources import Sources

COPY = "minibatch_order"          # scratch subgroup holding the copy, one array per site
STAGING = "minibatch_staging"     # scratch subgroup of the sort pass, deleted after the gather pass
CHUNK_TARGET_BYTES = 4 << 20      # output chunks
INNER_TARGET_BYTES = 1 << 20      # staging inner chunks: at most what a gather read wastes at a slice edge
MIN_INNER_BYTES = 16 << 10        # ... and at least this (per-chunk overheads)

Range = tuple[int, int]


@dataclass
class CopyPlan:
    """Region and output-range layout of the copy; every region and range is one task of its pass."""

    inner: int                    # staging rows per inner chunk (all sites)
    regions: list[Range]          # source row regions (= staging shards), multiples of `inner`
    chunks: list[int]             # output rows per chunk, per site
    ranges: list[list[Range]]     # output row ranges, per site

    @property
    def staged(self) -> bool:
        """Two passes (several regions); one region: the sort pass writes the copy directly."""
        return len(self.regions) > 1

    @property
    def n_tasks(self) -> int:
        return len(self.regions) * len(self.chunks) + (sum(len(r) for r in self.ranges) if self.staged else 0)


def output_chunk_rows(batch: int, row_bytes: int, n_rows: int) -> int:
    """Rows per chunk of a copied site: whole minibatches, at most ~4 MiB (one minibatch at least)."""
    return batch * max(1, min(CHUNK_TARGET_BYTES // max(1, batch * row_bytes), n_rows // batch))


def copy_plan(sources: Sources, n_rows: int, batch: int, budget_per_task: int) -> CopyPlan:
    """Regions sized for the widest site; output ranges per site. A sort task holds its rows as read
    and reordered, plus the encoded shard when staging; a gather task its rows and the slice read.

    Staging inner chunks are about half the slice a gather task reads from one region (within
    MIN_INNER_BYTES..INNER_TARGET_BYTES), so slice edges waste little however many regions there are."""
    row_bytes = [w * np.dtype(a.dtype).itemsize for a, w in zip(sources.arrays, sources.dims)]
    widest = max(row_bytes)
    usable = cka_plan.SAFETY * budget_per_task
    chunks, ranges = [], []
    for bytes_per_row in row_bytes:
        chunk = output_chunk_rows(batch, bytes_per_row, n_rows)
        per_task = max(1, int(usable // (2 * chunk * bytes_per_row)))
        chunks.append(chunk)
        ranges.append(cka_plan.blocks(n_rows, per_task * chunk))
    if 2 * sources.n * widest <= usable:
        return CopyPlan(sources.n, [(0, sources.n)], chunks, ranges)
    fit = max(1, int(usable // (3 * widest)))
    slice_rows = fit * min(r[0][1] - r[0][0] for r in ranges) // max(1, n_rows)
    inner = min(fit, max(MIN_INNER_BYTES // widest, min(slice_rows // 2, INNER_TARGET_BYTES // widest), 1))
    return CopyPlan(inner, cka_plan.blocks(sources.n, fit // inner * inner), chunks, ranges)


@dataclass
class ShuffleJob:
    """What copy tasks share: sources, staging and output arrays, and where every row goes.

    dest[r]: output position of source row r (-1: not used). staged[i]: the output positions of the
    rows region i keeps, ascending (= the order of its staging rows)."""

    sources: Sources
    staging: list[Any]
    targets: list[Any]
    regions: list[Range]
    dest: np.ndarray
    staged: list[np.ndarray]


def sort_region(job: ShuffleJob, site: int, region: int) -> None:
    """Pass 1: the kept rows of one source region, in output order, at the start of its staging region."""
    start, stop = job.regions[region]
    dest = job.dest[start:stop]
    keep = np.flatnonzero(dest >= 0)
    if len(keep):
        rows = job.sources.rows(site, start, stop, dtype=None)
        job.staging[site][start:start + len(keep)] = rows[keep[np.argsort(dest[keep], kind="stable")]]


def gather_range(job: ShuffleJob, site: int, start: int, stop: int) -> None:
    """Pass 2: output rows start:stop of one site, a contiguous staging slice from every region."""
    out = np.empty((stop - start, job.sources.dims[site]), dtype=job.staging[site].dtype)
    for (r0, _), staged in zip(job.regions, job.staged):
        lo, hi = np.searchsorted(staged, [start, stop])
        if hi > lo:
            out[staged[lo:hi] - start] = job.staging[site][r0 + lo:r0 + hi]
    job.targets[site][start:stop] = out


def _positions(n: int, order: np.ndarray, regions: list[Range]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(dest, staged) of `ShuffleJob` for output row k = source row order[k]."""
    dest = np.full(n, -1, dtype=np.int64)
    dest[order] = np.arange(len(order))
    return dest, [np.sort(dest[r0:r1][dest[r0:r1] >= 0]) for r0, r1 in regions]


def shuffled_copy(sources: Sources, order: np.ndarray, plan: CopyPlan, group: zarr.Group, client: Any,
                  on_copied: Callable[[], None]) -> Sources:
    """Sources reading the copy (in `group`) of `sources` whose row k is source row order[k]."""
    region = plan.regions[0][1] - plan.regions[0][0]
    copy_group = group.require_group(COPY)
    staging_group = group.require_group(STAGING) if plan.staged else None
    staging, targets = [], []
    for s, (key, width) in enumerate(zip(sources.keys, sources.dims)):
        dtype = np.dtype(sources.arrays[s].dtype)
        targets.append(copy_group.create_array(str(s), shape=(len(order), width), chunks=(plan.chunks[s], width),
                                               dtype=dtype, compressors=None, overwrite=True,
                                               attributes={"site": key}))
        staging.append(targets[-1] if staging_group is None else staging_group.create_array(
            str(s), shape=(sources.n, width), chunks=(plan.inner, width), shards=(region, width), dtype=dtype,
            compressors=None, overwrite=True))
    job = ShuffleJob(sources, staging, targets, plan.regions, *_positions(sources.n, order, plan.regions))

    def tick(index: int, part: None) -> None:
        on_copied()

    sorts = [(s, i) for s in range(len(targets)) for i in range(len(plan.regions))]
    map_reduce(sort_region, sorts, lambda parts: None, client=client, shared=job, on_result=tick)
    if staging_group is not None:
        gathers = [(s, a, b) for s, ranges in enumerate(plan.ranges) for a, b in ranges]
        map_reduce(gather_range, gathers, lambda parts: None, client=client, shared=job, on_result=tick)
        del group[STAGING]
    return Sources(sources.keys, targets, len(order), sources.dims)


@contextmanager
def scratch_space(group: zarr.Group | None) -> Iterator[zarr.Group]:
    """`group` (or a Zarr group in a temporary local directory); the copy is deleted on exit."""
    if group is not None:
        try:
            yield group
        finally:
            for name in (STAGING, COPY):
                if name in group:
                    del group[name]
        return
    with tempfile.TemporaryDirectory(prefix="ckaflow-minibatch-") as path:
        yield zarr.open_group(path, mode="w")
