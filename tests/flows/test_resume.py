"""Reliability of whole runs: SIGKILL during extraction and during CKA, then resume; concurrent runs
on one store; --refresh. Runs go through the real CLI in their own process groups (a killed run
takes its Dask workers with it, as a crashed machine would)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import storage
from flows.config import validate_config
from flows.loop import forget
from flows.pipeline import run_pipeline as compare
from tests.conftest import tiny_config, tiny_vit
from tests.servers import session_prefect_env

pytestmark = pytest.mark.timeout(1200)


def kill_config(tmp_path: Path, store: str) -> dict:
    """Enough shards and block pairs that each stage lasts long enough to be killed in the middle."""
    return tiny_config(
        tmp_path, store=str(tmp_path / store), sampling={"per_class": 24, "seed": 0},
        models=[tiny_vit("vit_a", 0), tiny_vit("vit_b", 1)],
        similarity=[{"kernel": "linear", "estimator": "biased", "method": "blocked"}],
        analyses={"probes": False},
        compute={"device": "cpu", "batch_size": 8, "shard_size": 8, "n_workers": 1, "memory_budget": "1MiB"})


def start_run(tmp_path: Path, config: dict, *options: str) -> subprocess.Popen:
    """`ckaflow run` of `config` in its own process group, against the session's Prefect server (a kill takes
    the run and its Dask workers, not the server: as with a configured server in production)."""
    path = tmp_path / f"{Path(config['store']).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "OMP_NUM_THREADS": "1", "COLUMNS": "200", **session_prefect_env()}
    cli = str(Path(sys.executable).parent / "ckaflow")
    log = open(tmp_path / f"{Path(config['store']).name}-{time.monotonic_ns()}.log", "w+")  # a pipe could fill up
    process = subprocess.Popen([cli, "run", str(path), *options], cwd=Path(__file__).parents[2], stdout=log,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    process.log = log
    return process


def output_of(process: subprocess.Popen) -> str:
    process.log.seek(0)
    return process.log.read()


def wait_until(condition, process: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"run ended before the kill point:\n{output_of(process)[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("kill point not reached in time")
        time.sleep(0.05)


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(process: subprocess.Popen) -> str:
    process.wait(timeout=900)
    output = output_of(process)
    assert process.returncode == 0, output[-4000:]
    return output


def shards_done(store: str, model: str) -> int:
    try:
        return storage.model_progress(storage.open_store(store, mode="r"), model)[0]
    except (storage.StoreError, KeyError):  # not there yet, or being deleted while we look
        return 0


def partial_tasks_done(store: str) -> int:
    try:
        group = storage.partials_group(storage.open_store(store), "linear_biased")
    except storage.StoreError:
        return 0
    return sum(1 for _, array in group.arrays() if array.attrs.get("done"))


def comparable(store: str) -> dict:
    summary = json.loads((Path(store) / "report" / "summary.json").read_text())
    return {"models": {m: entry["sites"] for m, entry in summary["models"].items()},
            "similarity": {n: (entry["sites"], entry["matrix"]) for n, entry in summary["similarity"].items()}}


def test_killed_runs_resume_only_unfinished_work_and_match_an_uninterrupted_run(tmp_path, kill_reference):
    reference = kill_reference
    config = dict(kill_config(tmp_path, "killed"), dataset=reference["dataset"])
    store = config["store"]
    total = -(-240 // 8)

    run = start_run(tmp_path, config)
    wait_until(lambda: 0 < shards_done(store, "vit_a") < total // 2, run)
    kill_group(run)
    done_at_kill = shards_done(store, "vit_a")

    run = start_run(tmp_path, config)
    wait_until(lambda: partial_tasks_done(store) > 0, run)
    kill_group(run)
    resumed = output_of(run)
    finish(start_run(tmp_path, config))

    extracted = {m: (int(w), int(d)) for m, w, d in
                 re.findall(r"extracted (\w+): \d+ sites, (\d+) shards written, (\d+) already done", resumed)}
    assert extracted == {"vit_a": (total - done_at_kill, done_at_kill), "vit_b": (total, 0)}, resumed[-3000:]
    matrix = storage.open_similarity(store, "linear_biased")
    assert matrix.attrs["resumed_tasks"] > 0
    assert 0 < done_at_kill < total
    assert comparable(store) == comparable(reference["store"])


def test_second_run_on_a_store_in_use_is_refused_or_waits(tmp_path, prefect_server):
    config = tiny_config(tmp_path, models=[tiny_vit("vit_a", 0)], analyses={"probes": False})
    root = storage.open_store(config["store"])
    with storage.run_lock(root):  # held by this live process, as by a running flow
        refused_run = start_run(tmp_path, config)
        waiting = start_run(tmp_path, config, "--wait")  # at the same time: both find the lock held
        started = time.monotonic()
        refused_run.wait(timeout=300)
        refused = output_of(refused_run)
        assert "in use by another run" in refused and "--wait" in refused, refused[-3000:]
        time.sleep(max(0.0, 20 - (time.monotonic() - started)))
        assert waiting.poll() is None  # still waiting for the lock, 20 s after it started
    output = finish(waiting)
    assert "report:" in output
    assert storage.model_progress(root, "vit_a") == (3, 3)


def test_refresh_forgets_the_stage_and_later_ones(tmp_path, prefect_server):
    config = tiny_config(tmp_path, analyses={"probes": False})
    compare(config)
    root = storage.open_store(config["store"])
    deleted = forget(root, validate_config(config), "similarity")
    assert deleted == ["similarity/linear_biased", "analyses", "report record"]
    assert storage.list_similarity(root) == [] and storage.list_analyses(root) == []
    assert storage.model_progress(root, "vit_a")[0] > 0  # earlier stages kept
    before = np.asarray(storage.activation_arrays(root, "vit_a")["blocks.1/block"][:])
    compare(config, refresh="similarity")
    assert storage.list_similarity(root) == ["linear_biased"]
    np.testing.assert_array_equal(np.asarray(storage.activation_arrays(root, "vit_a")["blocks.1/block"][:]), before)
    compare(config, refresh="extract")
    assert storage.model_progress(root, "vit_a") == (3, 3)
