"""Run independent tasks and tree-reduce their results: on a distributed.Client, or in-process.

With a client every task is a Dask future and the partial results are summed by a tree of
`combine` tasks on the workers (fan-in FANIN); each finished task's result is also handed to
`on_result` in this process (progress, persisting partial sums). Without a client the tasks run one
after the other here (synchronous scheduler), so peak memory is one task plus the running sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

FANIN = 8


def tree_reduce(client: Any, futures: list, combine: Callable[[list], Any]) -> Any:
    """Future of combine over all futures, as a tree of fan-in FANIN."""
    level = list(futures)
    while len(level) > 1:
        level = [client.submit(combine, level[i:i + FANIN], pure=False) for i in range(0, len(level), FANIN)]
    return level[0]


def map_reduce(fn: Callable[..., Any], items: Sequence[tuple], combine: Callable[[list], Any], *,
               client: Any = None, shared: Any = None,
               on_result: Callable[[int, Any], None] | None = None) -> Any:
    """combine([fn(shared, *item) for item in items]); None when there are no items.

    `shared` (e.g. the data sources) goes to the workers once (scattered), not once per task.
    """
    if not items:
        return None
    if client is None:
        total = None
        for i, item in enumerate(items):
            part = fn(shared, *item)
            if on_result is not None:
                on_result(i, part)
            total = part if total is None else combine([total, part])
        return total
    from distributed import as_completed

    shared_future = client.scatter(shared, broadcast=False, hash=False)
    futures = [client.submit(fn, shared_future, *item, pure=False) for item in items]
    index = {f.key: i for i, f in enumerate(futures)}
    root = tree_reduce(client, futures, combine)
    if on_result is not None:
        for future in as_completed(futures):
            on_result(index[future.key], future.result())
    result = root.result()
    del futures, root
    return result
