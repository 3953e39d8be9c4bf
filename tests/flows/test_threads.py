"""The thread budget: cores available (affinity, cgroup quota), the plan, and its application in the flow
process and in LocalCluster workers."""

from __future__ import annotations

import pytest

from flows.cluster import dask_client
from flows.config import ComputeConfig, ConfigError, validate_config
from flows.threads import flow_pools, thread_plan
from tasks.threads import available_cores, cgroup_cpu_limit, plan_threads


def test_cgroup_quota_and_affinity(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(v1) == 3.0
    assert available_cores(affinity=8, quota=1.5) == 2
    assert available_cores(affinity=2, quota=None) in (1, 2)  # None: the machine's own quota applies
    assert available_cores(affinity=4, quota=16.0) == 4


@pytest.mark.parametrize(("total", "n_workers", "workers", "per_worker"), [(2, 2, 2, 1), (8, 2, 2, 4), (3, 4, 3, 1)])
def test_plan_never_exceeds_the_budget(total, n_workers, workers, per_worker):
    plan = plan_threads(total, n_workers)
    assert (plan.workers, plan.threads_per_worker, plan.worker_pool) == (workers, per_worker, 1)
    assert plan.workers * plan.threads_per_worker * plan.worker_pool <= total and plan.flow_pool == total
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_threads(0, 1)


def test_config_threads_field():
    assert ComputeConfig().threads is None and thread_plan(ComputeConfig(threads=3, n_workers=2)).total == 3
    with pytest.raises(ConfigError, match="compute.threads"):
        validate_config({"store": "s", "dataset": {"kind": "synthetic"}, "models": [
            {"name": "a", "arch": "vit_tiny_patch16_224", "weights": "random:0"}], "compute": {"threads": 0}})


# A worker preload: the loaded pools at 2 threads when the worker starts (the tests run with OMP_NUM_THREADS=1,
# which the worker processes inherit), so that the plan's 1 thread is seen applied, not inherited.
WIDE_POOLS = """
from threadpoolctl import threadpool_limits

threadpool_limits(limits=2)
"""


def test_pools_sized_in_the_flow_process_and_the_workers(tmp_path):
    import dask
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    compute = ComputeConfig(threads=1, n_workers=1)
    preload = tmp_path / "wide_pools.py"
    preload.write_text(WIDE_POOLS)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # wider than the plan (the tests run with OMP_NUM_THREADS=1)
    try:
        with threadpool_limits(limits=2):
            assert torch.get_num_threads() == 2 and all(pool["num_threads"] == 2 for pool in threadpool_info())
            with flow_pools(compute) as plan:
                assert plan.flow_pool == 1 and torch.get_num_threads() == 1
                assert all(pool["num_threads"] == 1 for pool in threadpool_info())
                with dask.config.set({"distributed.worker.preload": [str(preload)]}), dask_client(compute) as client:
                    info = client.run(lambda: [p["num_threads"] for p in __import__("threadpoolctl").threadpool_info()])
                    assert list(client.nthreads().values()) == [1]
                    assert all(n == 1 for threads in info.values() for n in threads)
                    assert any(threads for threads in info.values())
    finally:
        torch.set_num_threads(before)
