"""The similarity stage on an external Dask cluster (`dask scheduler` + two `dask worker` processes
on 127.0.0.1), given by `compute.dask_address`: the same matrices as on the default LocalCluster."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from logging.handlers import BufferingHandler
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import xarray as xr
import yaml

import storage
from flows.cluster import dask_client
from flows.config import ComputeConfig, SimilarityConfig
from flows.extract import EXTRACT
from flows.loop import resolve_config
from flows.sample import SAMPLE
from flows.similarity import SIMILARITY_STAGE
from flows.stages import RunContext
from flows.threads import thread_plan
from tasks.cka import update_similarity
from tests.servers import REPO, dask_cluster, wait_until
from tests.stores import write_features

SIMILARITY = [
    {"kernel": "linear", "estimator": "biased", "method": "blocked"},
    {"kernel": "rbf", "estimator": "unbiased"},
    {"kernel": "linear", "estimator": "unbiased", "method": "minibatch", "batch_size": 8},
]
NAMES = ["linear_biased", "rbf_unbiased", "linear_unbiased_minibatch"]
RESULTS = [*NAMES, "linear_unbiased_minibatch_stderr"]  # the similarity stage: result name -> fingerprint

# Functions of this module run on the workers and the scheduler, which cannot import the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run_stage(stage, config, **upstream):
    """One stage alone, in-process, after stages whose fingerprints are `upstream`."""
    return stage.run(RunContext(config, thread_plan(config.compute), upstream=upstream))


def tiny(store):
    """configs/tiny.yaml with its store under the test's directory and three kinds of CKA."""
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    # Two single-threaded workers on both sides, so that both get the same plan (the block size
    # follows memory budget / total threads). A worker process needs ~1GiB before any task (torch).
    compute = dict(config["compute"], n_workers=2, memory_budget="4GiB")
    return resolve_config(dict(config, store=str(store), similarity=SIMILARITY, compute=compute))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A store holding the sample and the activations of a real tiny run (stage flows run alone)."""
    config = tiny(tmp_path_factory.mktemp("dask-run") / "store")
    fingerprints = run_stage(EXTRACT, config, samples=run_stage(SAMPLE, config))
    assert set(fingerprints) == {"vit_a", "vit_b"}
    return config, fingerprints


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """`dask scheduler` + two single-threaded `dask worker`s, for the tests that leave them as they found them."""
    with dask_cluster(tmp_path_factory.mktemp("external"), n_workers=2, nthreads=1, memory_limit="2GiB") as cluster:
        yield cluster


@pytest.mark.timeout(300)
def test_external_cluster_matches_local_cluster(extracted, external, tmp_path):
    from distributed import Client

    config, fingerprints = extracted
    # Two copies of the extracted store: no partial sums or cached results are shared by the two runs.
    local_store, remote_store = tmp_path / "local", tmp_path / "remote"
    shutil.copytree(config.store, local_store)
    shutil.copytree(config.store, remote_store)
    local = config.model_copy(update={"store": str(local_store)})
    assert sorted(run_stage(SIMILARITY_STAGE, local, models=fingerprints)) == sorted(RESULTS)

    cluster = external

    def transitions() -> int:
        with Client(cluster.address) as client:
            return client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    before = transitions()
    compute = config.compute.model_copy(update={"dask_address": cluster.address})
    remote = config.model_copy(update={"store": str(remote_store), "compute": compute})
    assert sorted(run_stage(SIMILARITY_STAGE, remote, models=fingerprints)) == sorted(RESULTS)
    assert transitions() > before, "no task ran on the external cluster"
    # The stage only disconnected: the cluster is still up, with both workers.
    assert all(service.alive() for service in cluster.services)
    with Client(cluster.address) as client:
        assert len(client.nthreads()) == 2

    assert set(NAMES) <= set(storage.list_similarity(storage.open_store(str(remote_store), mode="r")))
    for name in NAMES:
        local = storage.open_similarity(str(local_store), name)
        remote = storage.open_similarity(str(remote_store), name)
        assert local.sizes["site_a"] == 28 and local.dims == remote.dims
        for coord in local.coords:
            np.testing.assert_array_equal(local[coord].values, remote[coord].values)
        assert np.isfinite(local.values).all()
        np.testing.assert_allclose(remote.values, local.values, rtol=1e-12, atol=1e-12, err_msg=name)


@pytest.mark.timeout(120)
def test_worker_without_pythonpath_imports_the_store_package(external):
    """A `dask worker` started outside the checkout, without it on PYTHONPATH, imports the project's
    `storage` package (the installation's path entry), not its spill directory
    <local-directory>/storage, which distributed puts first on the worker's sys.path. (Each of the
    external cluster's two workers.)"""
    from distributed import Client

    with Client(external.address) as client:
        def origin(dask_worker) -> dict:
            import os
            import sys

            import storage as imported

            return {"file": getattr(imported, "__file__", None), "cwd": os.getcwd(),
                    "pythonpath": os.environ.get("PYTHONPATH", ""), "first": sys.path[0],
                    "directory": dask_worker.local_directory,
                    "spill": os.path.isdir(os.path.join(dask_worker.local_directory, "storage")),
                    "store": callable(getattr(imported, "open_store", None))}

        workers = list(client.run(origin).values())
    assert len(workers) == 2
    for found in workers:
        # the hazard is there: the worker's directory (which holds the spill directory) is on sys.path
        assert found["first"] == found["directory"] and found["spill"], found
        assert not found["cwd"].startswith(str(REPO)) and str(REPO) not in found["pythonpath"].split(os.pathsep)
        assert found["file"] == storage.__file__ == str(REPO / "storage" / "__init__.py")
        assert found["store"]


# ------------------------------------------------------------------ closing the LocalCluster

def worker_warnings(directory: Path):
    """A worker plugin: every worker process writes its `distributed` log records at WARNING or above to a
    file of its own in `directory` (their stderr is not the test's)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class WorkerWarnings(WorkerPlugin):
        name = "worker-warnings"

        def setup(self, worker) -> None:
            handler = logging.FileHandler(directory / f"{os.getpid()}.log")
            handler.setLevel(logging.WARNING)
            handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
            logging.getLogger("distributed").addHandler(handler)

    return WorkerWarnings()


def torch_product(n: int) -> float:
    """A task using torch, in a worker whose interpreter teardown is slow: an exit hook sleeping past the 4 s
    a nanny waits at close stands for the teardown of torch and timm, which takes seconds on a busy machine."""
    import atexit
    import time

    import torch

    atexit.register(time.sleep, 6)
    return float(torch.ones(n, n).matmul(torch.ones(n, n)).sum())


@pytest.mark.timeout(180)
def test_local_cluster_closes_without_warnings(tmp_path):
    """Closing a stage's LocalCluster after tasks (one using torch) emits no `distributed` record at
    WARNING or above: no worker is "still alive after 4.0 seconds" and killed, no heartbeat fails."""
    shutdown = BufferingHandler(capacity=10_000)
    shutdown.setLevel(logging.WARNING)
    logs = tmp_path / "worker-logs"
    logs.mkdir()
    try:
        with dask_client(ComputeConfig(device="cpu", n_workers=2, threads=2)) as client:
            client.register_plugin(worker_warnings(logs))
            assert client.gather(client.map(abs, [-1, -2])) == [1, 2]
            assert client.gather(client.map(torch_product, [8, 16])) == [512.0, 4096.0]
            logging.getLogger("distributed").addHandler(shutdown)
    finally:
        logging.getLogger("distributed").removeHandler(shutdown)
    records = [f"{r.name} {r.levelname} {r.getMessage()}" for r in shutdown.buffer]
    records += [line for path in sorted(logs.iterdir()) for line in path.read_text().splitlines()]
    assert len(list(logs.iterdir())) == 2 and records == [], records


def test_two_local_clusters_at_once_warn_nothing():
    """Two runs on one machine: each LocalCluster's scheduler serves its HTTP routes on a free port, so the
    second does not warn that port 8787 is in use."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dask_client(ComputeConfig(n_workers=1, threads=1)) as a, \
                dask_client(ComputeConfig(n_workers=1, threads=1)) as b:
            assert a.submit(abs, -1).result() == 1 and b.submit(abs, -2).result() == 2


# ------------------------------------------------------------------ a worker dying mid-CKA

BLOCK_TASK = "block_pair_sums"   # the key prefix of the blocked path's block-pair tasks (client.submit)


def synthetic_store(path, n: int = 320) -> dict[str, str]:
    """Two models of two sites (256 and 64 wide) written through the ActivationWriter; their fingerprints."""
    root = storage.open_store(str(path))
    storage.write_samples(root, xr.Dataset({"image_index": ("sample", np.arange(n))}, attrs={"fingerprint": "s"}))
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, 4))
    for model in ("m1", "m2"):
        sites = {f"blocks.{i}/mlp": (latent @ rng.normal(size=(4, d)) + rng.normal(size=(n, d))).astype(np.float32)
                 for i, d in enumerate((256, 64))}
        write_features(root, model, sites, shard_size=32)
    return {"m1": "fp-m1", "m2": "fp-m2"}


def pause_after(count: int):
    """A worker plugin that pauses its worker (Status.paused, as its memory monitor would: no new task
    starts, the scheduler sends it none) once `count` block-pair tasks finished there; only once, and
    only the test resumes it."""
    from distributed.core import Status
    from distributed.diagnostics.plugin import WorkerPlugin

    class PauseAfter(WorkerPlugin):
        name = "pause-after"

        def __init__(self) -> None:
            self.finished, self.armed, self.worker = 0, True, None

        def setup(self, worker) -> None:
            self.worker = worker
            # its memory monitor would resume the worker (memory is far below the pause threshold)
            worker.memory_manager.memory_pause_fraction = False

        def transition(self, key, start, finish, **kwargs) -> None:
            if start == "executing" and finish == "memory" and str(key).startswith(BLOCK_TASK):
                self.finished += 1
                if self.armed and self.finished >= count:
                    self.armed = False
                    # not from inside the worker's state machine: next on its event loop, before the
                    # next task's completion is handled (so at most the task already started runs on)
                    self.worker.loop.add_callback(self.pause)

        def pause(self) -> None:
            if self.worker.status == Status.running:
                self.worker.status = Status.paused

    return PauseAfter()


SIMILARITY_BLOCKED = SimilarityConfig(kernel="linear", estimator="biased", method="blocked")
# A small budget, so that there are many block-pair tasks (55). On the cluster's 2 threads that is 1MiB
# per task, as in process with 1MiB (1 thread): the same block size and tasks on both sides.
COMPUTE = ComputeConfig(device="cpu", precision="float64", memory_budget="2MiB")


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """(a store with activations only, its model fingerprints, the in-process matrix of it and the store
    holding that matrix)."""
    base = tmp_path_factory.mktemp("blocked")
    fingerprints = synthetic_store(base / "store")
    shutil.copytree(base / "store", base / "reference")
    reference = update_similarity(storage.open_store(str(base / "reference")), SIMILARITY_BLOCKED.key, fingerprints,
                                  SIMILARITY_BLOCKED.options(COMPUTE.model_copy(update={"memory_budget": "1MiB"})),
                                  client=None)[SIMILARITY_BLOCKED.key]
    assert reference.attrs["n_tasks"] >= 50 and reference.attrs["resumed_tasks"] == 0
    assert np.isfinite(reference.values).all()
    return base / "store", fingerprints, reference, base / "reference"


def start_stage(store, fingerprints: dict[str, str], address: str):
    """update_similarity on the cluster at `address` (its own client), in a thread: (thread, outcome),
    outcome getting "result" or "error"."""
    import threading

    outcome: dict = {}

    def stage() -> None:
        try:
            with dask_client(COMPUTE.model_copy(update={"dask_address": address})) as client:
                outcome["result"] = update_similarity(storage.open_store(str(store)), SIMILARITY_BLOCKED.key,
                                                      fingerprints, SIMILARITY_BLOCKED.options(COMPUTE), client=client)
        except BaseException as error:  # noqa: BLE001 (checked by the test)
            outcome["error"] = error

    thread = threading.Thread(target=stage, name="similarity-stage", daemon=True)
    thread.start()
    return thread, outcome


def scheduler_view(dask_scheduler) -> dict:
    """Run on the scheduler: each worker's status by name, and who holds each scattered key that tasks
    still wait for (the plan `map_reduce` scatters)."""
    held = [sorted(ws.name for ws in ts.who_has or ()) for ts in dask_scheduler.tasks.values()
            if ts.run_spec is None and ts.state == "memory" and ts.waiters]
    return {"status": {ws.name: ws.status.name for ws in dask_scheduler.workers.values()}, "scattered": held}


def paused(client, outcome: dict, names: set[str]) -> dict | None:
    """The scheduler's view once it sees exactly the workers `names` paused (else None)."""
    assert "error" not in outcome, f"the stage failed early: {outcome['error']!r}"
    view = client.run_on_scheduler(scheduler_view)
    return view if {n for n, status in view["status"].items() if status == "paused"} == names else None


def done_partials(store) -> set[str]:
    """Names of the block-pair tasks whose partial sums the stage stored (its resumable state)."""
    group = storage.partials_group(storage.open_store(str(store), mode="r"), SIMILARITY_BLOCKED.key)
    return {name for name, array in group.arrays() if array.attrs.get("done")}


def resume(dask_worker) -> None:
    from distributed.core import Status

    dask_worker.status = Status.running


def finished_here(dask_worker) -> int:
    return dask_worker.plugins["pause-after"].finished


def check_matrix(store, matrix, blocked) -> None:
    """The stored and returned matrices equal the in-process ones (same sites, same order)."""
    _, _, reference, reference_store = blocked
    stored = storage.open_similarity(str(store), SIMILARITY_BLOCKED.key)
    expected = storage.open_similarity(str(reference_store), SIMILARITY_BLOCKED.key)
    assert matrix.attrs["block_size"] == reference.attrs["block_size"]
    for dim in ("site_a", "site_b"):
        assert storage.site_ids(stored, dim) == storage.site_ids(expected, dim) == list(reference[dim].values)
    np.testing.assert_allclose(stored.values, expected.values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(matrix.values, reference.values, rtol=1e-12, atol=1e-12)


def copy_store(blocked, tmp_path) -> tuple[Path, int]:
    """A copy of the blocked fixture's store (each test kills into its own), and its number of tasks."""
    store = tmp_path / "store"
    shutil.copytree(blocked[0], store)
    return store, blocked[2].attrs["n_tasks"]


@contextlib.contextmanager
def pausing_cluster(tmp_path):
    """Scheduler + 2 single-thread workers, each pausing after 2 block-pair tasks; (cluster, client)."""
    from distributed import Client

    with dask_cluster(tmp_path, n_workers=2, nthreads=1, memory_limit="2GiB") as cluster, \
            Client(cluster.address) as client:
        client.register_plugin(pause_after(2))
        yield cluster, client


@pytest.mark.timeout(180)
def test_worker_killed_mid_cka_the_stage_completes(blocked, tmp_path):
    """issue 7, a worker dying mid-CKA on the external cluster. Both workers have run block-pair tasks
    (so both hold the scattered plan) and are held paused; one is SIGKILLed (nanny and worker process)
    with most tasks still to run. Dask reschedules its tasks and recomputes its lost results on the
    other worker: the stage completes in one go, equal to the in-process result."""
    store, n_tasks = copy_store(blocked, tmp_path)
    with pausing_cluster(tmp_path) as (cluster, client):
        thread, outcome = start_stage(store, blocked[1], cluster.address)
        # Both workers finished some block-pair tasks (each holds the scattered plan) and start no more.
        view = wait_until(lambda: paused(client, outcome, {"worker-0", "worker-1"}), 60,
                          "both workers paused after 2 block-pair tasks", cluster.services, 0.2)
        assert view["scattered"] and all(held == ["worker-0", "worker-1"] for held in view["scattered"]), view
        wait_until(lambda: done_partials(store), 30, "a stored partial sum", cluster.services, 0.1)
        finished = client.run(finished_here)
        assert sum(finished.values()) <= 6  # at most one task ran on after each pause: most are still to run

        victim, survivor = cluster.workers
        victim.kill()
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, 30, "the scheduler to drop the killed "
                   "worker", [cluster.scheduler, survivor])
        client.run(resume)
        thread.join(90)
        assert not thread.is_alive(), "the stage did not finish after a worker died"
        assert "error" not in outcome, f"the stage failed: {outcome.get('error')!r}"
        # The survivor ran every block-pair task: its own, the killed worker's queued ones, and again
        # the ones whose results died with it (Dask recomputes lost results).
        (total,) = client.run(finished_here).values()
        assert total >= n_tasks, (total, n_tasks, finished)
        assert survivor.alive() and not victim.alive()

    matrix = outcome["result"][SIMILARITY_BLOCKED.key]
    assert matrix.attrs["n_tasks"] == n_tasks and matrix.attrs["resumed_tasks"] == 0
    assert not done_partials(store)  # cleared with the matrix complete
    check_matrix(store, matrix, blocked)


@pytest.mark.timeout(180)
def test_worker_killed_holding_the_only_copy_of_the_plan_the_stage_fails_resumable(blocked, tmp_path):
    """issue 7, a worker dying mid-CKA, the other case: the killed worker held the only copy of the
    plan `map_reduce` scatters (here worker-1 is paused from the start, so the scheduler scatters to
    worker-0 and worker-1 never fetches it). Scattered data cannot be recomputed: the stage fails
    (FutureCancelledError), leaving the finished tasks' partial sums; re-running on the cluster back
    at its size resumes from them and gives the same matrix.

    If `map_reduce`'s shared data becomes recomputable (e.g. submitted rather than scattered), the
    stage completes here too: then assert that instead."""
    from distributed.client import FutureCancelledError

    store, n_tasks = copy_store(blocked, tmp_path)
    with pausing_cluster(tmp_path) as (cluster, client):
        addresses = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}

        def hold(dask_worker) -> None:
            from distributed.core import Status

            dask_worker.memory_manager.memory_pause_fraction = False  # (would resume it)
            dask_worker.plugins["pause-after"].armed = False
            dask_worker.status = Status.paused

        client.run(hold, workers=[addresses["worker-1"]])
        wait_until(lambda: paused(client, {}, {"worker-1"}), 30, "worker-1 paused", cluster.services, 0.2)
        thread, outcome = start_stage(store, blocked[1], cluster.address)
        view = wait_until(lambda: paused(client, outcome, {"worker-0", "worker-1"}), 60,
                          "worker-0 paused after 2 block-pair tasks", cluster.services, 0.2)
        assert view["scattered"] == [["worker-0"]], view
        wait_until(lambda: done_partials(store), 30, "a stored partial sum", cluster.services, 0.1)

        cluster.workers[0].kill()
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 1, 30, "the scheduler to drop the killed "
                   "worker", [cluster.scheduler, cluster.workers[1]])
        client.run(resume)
        thread.join(60)
        assert not thread.is_alive(), "the stage neither failed nor finished after a worker died"
        assert isinstance(outcome.get("error"), FutureCancelledError), outcome
        resumable = done_partials(store)
        assert 1 <= len(resumable) <= 3, resumable  # what worker-0 finished and the client stored

        # Re-run as after a failure, on the cluster back at two workers (a replacement joins): the plan
        # (block size from memory_budget / the cluster's threads) is the same, so it resumes.
        client.unregister_worker_plugin("pause-after")
        cluster.start_worker()
        cluster.wait_for_workers(2)
        thread, outcome = start_stage(store, blocked[1], cluster.address)
        thread.join(90)
        assert not thread.is_alive() and "error" not in outcome, outcome

    matrix = outcome["result"][SIMILARITY_BLOCKED.key]
    assert matrix.attrs["n_tasks"] == n_tasks and matrix.attrs["resumed_tasks"] == len(resumable)
    assert not done_partials(store)
    check_matrix(store, matrix, blocked)
