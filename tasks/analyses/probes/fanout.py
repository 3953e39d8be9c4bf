"""The L-BFGS probes' fan-out: sites in groups that fit the memory budget, fit in this process or as tasks
on a Dask client, a bounded number of groups read and in flight at a time."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tasks.analyses.probes.solvers import ProbeResult

GROUP_SITES = 64  # sites per batched fit (each site keeps its own L-BFGS: grouping changes no result)


def site_groups(widths: Mapping[str, int], n_rows: int, memory_budget: int, max_sites: int = GROUP_SITES
                ) -> list[list[str]]:
    """Sites (by width, so a group pads little) in groups of at most `max_sites` whose float32 features
    and gradients (x4) fit the budget."""
    out: list[list[str]] = []
    used = 0
    for sid in sorted(widths, key=lambda s: widths[s]):
        cost = 4 * 4 * n_rows * widths[sid]
        if out and used + cost <= memory_budget and len(out[-1]) < max_sites:
            out[-1].append(sid)
            used += cost
        else:
            out.append([sid])
            used = cost
    return out


def client_groups(widths: Mapping[str, int], n_rows: int, memory_budget: int, slots: int) -> list[list[str]]:
    """`site_groups` for `slots` worker threads: at least four groups per thread, the `slots` + 1 groups in
    flight together within the budget."""
    return site_groups(widths, n_rows, memory_budget // (slots + 1), max(1, len(widths) // (4 * slots)))


def _read(array: Any) -> np.ndarray:
    return np.asarray(array[:])


def fit_groups(planned: Sequence[Sequence[str]], arrays: Mapping[str, Any], fit: Callable[..., list[ProbeResult]],
               client: Any, slots: int) -> Iterator[tuple[Sequence[str], list[ProbeResult]]]:
    """(group, results) as the groups finish: `fit(features)` in this process, or as tasks on `client`
    with at most `slots` + 1 groups read and in flight at a time (memory: that many groups)."""
    if client is None:
        for group in planned:
            yield group, fit([_read(arrays[s]) for s in group])
        return
    from distributed import as_completed

    pending = iter(planned)
    of: dict[str, Sequence[str]] = {}  # future key -> its group

    def submit(group: Sequence[str]) -> Any:
        future = client.submit(fit, client.scatter([_read(arrays[s]) for s in group]), pure=False)
        of[future.key] = group
        return future

    running = as_completed([submit(g) for g in itertools.islice(pending, slots + 1)])
    for future in running:
        yield of.pop(future.key), future.result()
        if (group := next(pending, None)) is not None:
            running.add(submit(group))
