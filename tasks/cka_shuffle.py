"""Seeded shuffled copy of chunked inputs for minibatch CKA.

Minibatches are random rows. Read straight from Zarr or dask, every minibatch task would decode
nearly every chunk of every site, so reading would grow as N^2 / batch. Instead the rows in use are
copied once, in minibatch order, into a scratch Zarr group: minibatch i is then rows [i b, (i+1) b)
of the copy, and each minibatch task reads only its own chunks.

Each copy task owns a range of output rows made of whole output chunks (writers never share a
chunk). It reads the source rows that land there with one sorted selection, which decodes each
touched source chunk once, and writes them in minibatch order. A site whose copy exceeds one task's
memory budget is split into several ranges; each range reads the source chunks it touches, so such a
site is read about (site bytes / task budget) times.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from tasks import cka_plan
from tasks.cka_exec import map_reduce
from tasks.cka_sources import Sources

COPY = "minibatch_order"          # scratch subgroup holding the copy, one array per site
CHUNK_TARGET_BYTES = 4 << 20


def output_chunk_rows(batch: int, width: int, itemsize: int, n_rows: int) -> int:
    """Rows per chunk of a copied site: whole minibatches, at most ~4 MiB (one minibatch at least)."""
    return batch * max(1, min(CHUNK_TARGET_BYTES // max(1, batch * width * itemsize), n_rows // batch))


def copy_ranges(n_rows: int, chunk: int, row_bytes: int, budget_per_task: int) -> list[tuple[int, int]]:
    """Output row ranges of whole chunks, each small enough for one task (selection + reordered copy)."""
    chunks_per_task = max(1, int(cka_plan.SAFETY * budget_per_task // (2 * chunk * max(1, row_bytes))))
    step = chunks_per_task * chunk
    return cka_plan.blocks(n_rows, step)


@dataclass
class ShuffledCopy:
    """What copy tasks share: the sources, the source row of every output row, and the target arrays."""

    sources: Sources
    order: np.ndarray
    targets: list[Any]


def copy_rows(job: ShuffledCopy, site: int, start: int, stop: int) -> None:
    """Write output rows start:stop of one site: source rows order[start:stop], in that order."""
    wanted = job.order[start:stop]
    sort = np.argsort(wanted, kind="stable")
    rows = job.sources.take(site, wanted[sort], dtype=None)
    job.targets[site][start:stop] = rows[np.argsort(sort)]


def copy_plan(sources: Sources, n_rows: int, batch: int, budget_per_task: int
              ) -> tuple[list[int], list[tuple[int, int, int]]]:
    """(rows per output chunk of each site, copy tasks as (site, start, stop))."""
    chunks, items = [], []
    for s, (array, width) in enumerate(zip(sources.arrays, sources.dims)):
        itemsize = np.dtype(array.dtype).itemsize
        chunks.append(output_chunk_rows(batch, width, itemsize, n_rows))
        items += [(s, a, b) for a, b in copy_ranges(n_rows, chunks[-1], width * itemsize, budget_per_task)]
    return chunks, items


def shuffled_copy(sources: Sources, order: np.ndarray, plan: tuple[list[int], list[tuple[int, int, int]]],
                  group: zarr.Group, client: Any, on_copied: Callable[[], None]) -> Sources:
    """Sources reading the copy (in `group`) of `sources` whose row i is source row order[i]."""
    chunks, items = plan
    scratch = group.require_group(COPY)
    targets = [scratch.create_array(str(s), shape=(len(order), width), chunks=(chunks[s], width),
                                    dtype=np.dtype(sources.arrays[s].dtype), compressors=None, overwrite=True,
                                    attributes={"site": key})
               for s, (key, width) in enumerate(zip(sources.keys, sources.dims))]
    job = ShuffledCopy(sources, np.asarray(order, dtype=np.int64), targets)
    map_reduce(copy_rows, items, lambda parts: None, client=client, shared=job,
               on_result=lambda i, part: on_copied())
    return Sources(sources.keys, targets, len(order), sources.dims)


@contextmanager
def scratch_space(group: zarr.Group | None) -> Iterator[zarr.Group]:
    """`group` (or a Zarr group in a temporary local directory); the copy is deleted on exit."""
    if group is not None:
        try:
            yield group
        finally:
            if COPY in group:
                del group[COPY]
        return
    with tempfile.TemporaryDirectory(prefix="ckaflow-minibatch-") as path:
        yield zarr.open_group(path, mode="w")
