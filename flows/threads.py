"""Applying the thread budget (`tasks.threads`): in the flow process (BLAS via threadpoolctl, torch
intra-op) and in every LocalCluster worker (a worker plugin doing the same at start)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from distributed.diagnostics.plugin import WorkerPlugin

from flows.config import ComputeConfig
from tasks.threads import ThreadPlan, available_cores, plan_threads

POOL_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def thread_plan(compute: ComputeConfig) -> ThreadPlan:
    """The plan of the configured budget (compute.threads, default: the cores available)."""
    return plan_threads(compute.threads or available_cores(), compute.n_workers)


def pool_environment(threads: int) -> dict[str, str]:
    """Environment variables that size the pools of a process started with them (torch reads OMP_NUM_THREADS)."""
    return {name: str(threads) for name in POOL_VARIABLES}


def limit_pools(threads: int) -> None:
    """Size this process's loaded BLAS/OpenMP pools (threadpoolctl) and, when torch is imported, its
    intra-op pool to `threads`."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


@contextlib.contextmanager
def sized_pools(threads: int) -> Iterator[None]:
    """This process's BLAS/OpenMP and torch pools at `threads` for the block, restored after."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=threads):
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


@contextlib.contextmanager
def flow_pools(compute: ComputeConfig, plan: ThreadPlan | None = None) -> Iterator[ThreadPlan]:
    """The flow process's pools sized to the plan (default: the compute settings') for the block, restored after."""
    plan = plan or thread_plan(compute)
    with sized_pools(plan.flow_pool):
        yield plan


class PoolLimit(WorkerPlugin):
    """Sizes a worker's BLAS/OpenMP/torch pools when it starts (and again if it restarts)."""

    name = "ckaflow-pool-limit"

    def __init__(self, threads: int):
        self.threads = threads

    def setup(self, worker) -> None:
        limit_pools(self.threads)
