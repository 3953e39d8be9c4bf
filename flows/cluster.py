"""The Dask client of a stage: the configured external scheduler, or a LocalCluster for the stage's duration."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from distributed import Client, LocalCluster

from flows.config import ComputeConfig
from flows.threads import PoolLimit, pool_environment, thread_plan


@contextlib.contextmanager
def dask_client(compute: ComputeConfig) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started (and stopped) here.

    compute.memory_budget bounds the CKA working set, not the workers: their memory limit is Dask's
    default share of this machine (a tighter one pauses workers that hold torch alone, ~1 GiB).
    The LocalCluster follows the thread budget (`flows.threads.thread_plan`): workers x threads per
    worker, each worker's BLAS/OpenMP/torch pools sized by environment and a worker plugin. External
    workers keep their own --nthreads."""
    if compute.dask_address:
        with Client(compute.dask_address) as client:
            yield client
        return
    plan = thread_plan(compute)
    with LocalCluster(n_workers=plan.workers, threads_per_worker=plan.threads_per_worker, processes=True,
                      memory_limit="auto", dashboard_address=None, env=pool_environment(plan.worker_pool)
                      ) as cluster, Client(cluster) as client:
        client.register_plugin(PoolLimit(plan.worker_pool))
        yield client
