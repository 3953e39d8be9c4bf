"""The pipeline's thread budget: how many cores the process may use, and how a budget is split between
the Dask workers of a LocalCluster and the BLAS/OpenMP/torch pools of every process.

Pure sizing (`plan_threads`) plus the read of the machine's limits (`available_cores`: CPU affinity and the
cgroup CPU quota, v2 `cpu.max` or v1 `cpu.cfs_quota_us`). Applying a plan is the flows' job.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The cgroup's CPU quota in cores (quota / period), or None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(affinity: int | None = None, quota: float | None = None) -> int:
    """Cores this process may use: its CPU affinity (default: `os.sched_getaffinity`) capped by the cgroup
    quota (default: `cgroup_cpu_limit`), rounded up, at least 1."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit() if quota is None else quota
    cores = affinity if quota is None else min(affinity, math.ceil(quota))
    return max(1, int(cores))


@dataclass(frozen=True)
class ThreadPlan:
    """A split of `total` threads: LocalCluster `workers` x `threads_per_worker` (each worker thread runs
    BLAS/torch with `worker_pool` threads), and the flow process's BLAS/torch pools (`flow_pool`), used
    while the workers wait: stages alternate between the two, they never compute at once."""

    total: int
    workers: int
    threads_per_worker: int
    worker_pool: int
    flow_pool: int

    def record(self) -> dict[str, Any]:
        return asdict(self)


def plan_threads(total: int, n_workers: int) -> ThreadPlan:
    """The plan for a budget of `total` threads and at most `n_workers` LocalCluster processes:
    workers = min(n_workers, total), threads_per_worker = total // workers, one BLAS thread per worker
    thread (so workers x threads_per_worker x worker_pool <= total), the whole budget for the flow process."""
    if total < 1 or n_workers < 1:
        raise ValueError(f"threads ({total}) and n_workers ({n_workers}) must be >= 1")
    workers = min(n_workers, total)
    return ThreadPlan(total=total, workers=workers, threads_per_worker=total // workers, worker_pool=1,
                      flow_pool=total)
