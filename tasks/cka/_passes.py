"""Plumbing shared by the engine's entry points (`cka_matrix`, `minibatch_cka_matrix`): progress
in tasks, Dask concurrency, the first pass over the data, result arrays and degenerate-site warnings."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from tasks.cka import _plan as cka_plan
from tasks.cka._execute import map_reduce
from tasks.cka.reference import DegenerateSiteWarning
from tasks.cka._sources import ColumnStats, Sources, column_stats, combine_stats


class Ticker:
    """Reports finished tasks to `progress` as (tasks just finished, total tasks)."""

    def __init__(self, progress: Callable[[int, int], Any] | None, total: int):
        self.progress, self.total = progress, max(total, 1)

    def __call__(self, units: int = 1) -> None:
        if self.progress is not None and units:
            self.progress(units, self.total)


def concurrency(client: Any) -> int:
    """Tasks that run at once: the client's worker threads (1 without a client)."""
    return max(1, sum(client.nthreads().values())) if client is not None else 1


def scan_blocks(sources: Sources, budget_per_task: int, client: Any) -> list[tuple[int, int]]:
    """The row blocks of the first pass: whole storage chunks, sized by the task budget."""
    rows = cka_plan.scan_rows(sources.n, max(sources.dims), sources.read_rows(), sources.stored_itemsize(),
                              budget_per_task, concurrency(client))
    return cka_plan.blocks(sources.n, rows)


def first_pass(sources: Sources, blocks: list[tuple[int, int]], client: Any, tick: Ticker,
               digest: bool = False) -> ColumnStats:
    """Column sums, centred sums of squares, minima, maxima and non-finite counts of every site, one row
    block per task; digest: also a digest of each block's stored bytes (for resume keys)."""
    return map_reduce(column_stats, [(a, b, digest) for a, b in blocks], combine_stats, client=client,
                      shared=sources, on_result=lambda i, part: tick())


def data_array(matrix: np.ndarray, keys: list[str], attrs: dict) -> xr.DataArray:
    """An (S, S) matrix labelled with site ids on dims (site_a, site_b)."""
    return xr.DataArray(matrix, dims=("site_a", "site_b"), coords={"site_a": list(keys), "site_b": list(keys)},
                        attrs=attrs)


def warn_degenerate(reasons: dict[str, str]) -> None:
    """One DegenerateSiteWarning listing every NaN site and why (nothing when there is none)."""
    if reasons:
        listed = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        warnings.warn(f"CKA is NaN for {len(reasons)} site(s): {listed}", DegenerateSiteWarning, stacklevel=3)
