"""The Dask client of a run: the configured external scheduler, or a LocalCluster started once per run
(`run_cluster`) or for one block."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from typing import Any

import dask
from distributed import Client, LocalCluster

from flows.config import ComputeConfig
from flows.threads import PoolLimit, pool_environment, sized_pools, thread_plan
from tasks.threads import ThreadPlan

# How LocalCluster worker processes start. A spawned worker ends with a full interpreter teardown, which
# with torch and timm loaded takes seconds on a busy machine: past the 4 s a nanny waits at close, so it
# warns and kills every worker. A forkserver child starts from a clean single-threaded server process as
# spawn does, but exits like a forked one (os._exit after joining its threads), in milliseconds.
WORKER_START = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


_RUN: dict[str, Any] = {}  # the run's shared cluster (`run_cluster`): its exit stack, and its client once started


@contextlib.contextmanager
def run_cluster(processes: bool = True) -> Iterator[None]:
    """One Dask client for the whole run: inside the block, the first `dask_client` starts it (a LocalCluster,
    or a connection to the configured scheduler) and every later stage reuses it; it closes with the block.
    processes=False: the LocalCluster's workers are threads of this process (no worker process is started,
    so a script needs no `if __name__ == "__main__":` guard)."""
    if "stack" in _RUN:  # a run inside a run (a flow calling the pipeline): the outer run's cluster serves
        yield
        return
    with contextlib.ExitStack() as stack:
        _RUN.update(stack=stack, processes=processes)
        try:
            yield
        finally:
            _RUN.clear()


@contextlib.contextmanager
def dask_client(compute: ComputeConfig, plan: ThreadPlan | None = None) -> Iterator[Client]:
    """The run's client inside `run_cluster` (started here on first use), else one for the block."""
    if "stack" in _RUN:
        if "client" not in _RUN:
            _RUN["client"] = _RUN["stack"].enter_context(new_client(compute, plan, _RUN["processes"]))
        if _RUN["processes"] or compute.dask_address:
            yield _RUN["client"]
            return
        # workers that are threads of this process share its pools: one thread each while the client is
        # held, not the flow's whole budget per worker thread (oversubscribed OpenMP pools spin and stall)
        with sized_pools(1):
            yield _RUN["client"]
        return
    with new_client(compute, plan) as client:
        yield client


@contextlib.contextmanager
def new_client(compute: ComputeConfig, plan: ThreadPlan | None = None, processes: bool = True) -> Iterator[Client]:
    """A client of the configured scheduler, or of a LocalCluster started (and stopped) here: worker processes,
    or with `processes=False` one worker of the plan's total threads inside this process (whose pools
    `dask_client` holds at one thread while the client is in use).

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
    if not processes:
        with LocalCluster(n_workers=1, threads_per_worker=plan.total, processes=False, dashboard_address=None,
                          scheduler_kwargs={"dashboard_address": ":0"}) as cluster, Client(cluster) as client:
            yield client
        return
    with dask.config.set({"distributed.worker.multiprocessing-method": WORKER_START}), \
            LocalCluster(n_workers=plan.workers, threads_per_worker=plan.threads_per_worker, processes=True,
                         memory_limit="auto", dashboard_address=None, env=pool_environment(plan.worker_pool),
                         scheduler_kwargs={"dashboard_address": ":0"},  # its HTTP routes on a free port
                         ) as cluster, Client(cluster) as client:
        client.register_plugin(PoolLimit(plan.worker_pool))
        yield client
