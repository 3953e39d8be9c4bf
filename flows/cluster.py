"""The Dask client of a stage: the configured external scheduler, or a LocalCluster for the stage's duration."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client, LocalCluster

from flows.config import ComputeConfig


@contextlib.contextmanager
def dask_client(compute: ComputeConfig) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started (and stopped) here.

    compute.memory_budget bounds the CKA working set, not the workers: their memory limit is Dask's
    default share of this machine (a tighter one pauses workers that hold torch alone, ~1 GiB)."""
    if compute.dask_address:
        with Client(compute.dask_address) as client:
            yield client
        return
    with LocalCluster(n_workers=compute.n_workers, threads_per_worker=1, processes=True,
                      memory_limit="auto", dashboard_address=None) as cluster, Client(cluster) as client:
        yield client
