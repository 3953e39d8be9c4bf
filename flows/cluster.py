"""The Dask client of a stage: the configured external scheduler, or a LocalCluster for the stage's duration."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster

from flows.config import ComputeConfig
from flows.threads import PoolLimit, pool_environment, thread_plan
from tasks.threads import ThreadPlan

# How LocalCluster worker processes start. A spawned worker ends with a full interpreter teardown, which
# with torch and timm loaded takes seconds on a busy machine: past the 4 s a nanny waits at close, so it
# warns and kills every worker. A forkserver child starts from a clean single-threaded server process as
# spawn does, but exits like a forked one (os._exit after joining its threads), in milliseconds.
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


@contextlib.contextmanager
def dask_client(compute: ComputeConfig, plan: ThreadPlan | None = None) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started (and stopped) here.

    compute.memory_budget bounds the CKA working set, not the workers: their memory limit is Dask's
    default share of this machine (a tighter one pauses workers that hold torch alone, ~1 GiB).
    The LocalCluster follows the run's thread plan (default `flows.threads.thread_plan`): workers x threads per
    worker, each worker's BLAS/OpenMP/torch pools sized by environment and a worker plugin; its workers
    start from a forkserver (`WORKER_START`). External workers keep their own --nthreads."""
    if compute.dask_address:
        with Client(compute.dask_address) as client:
            yield client
        return
    plan = plan or thread_plan(compute)
    with dask.config.set({"distributed.worker.multiprocessing-method": WORKER_START}), \
            LocalCluster(n_workers=plan.workers, threads_per_worker=plan.threads_per_worker, processes=True,
                         memory_limit="auto", dashboard_address=None, env=pool_environment(plan.worker_pool),
                         scheduler_kwargs={"dashboard_address": ":0"},  # its HTTP routes on a free port
                         ) as cluster, Client(cluster) as client:
        client.register_plugin(PoolLimit(plan.worker_pool))
        yield client
