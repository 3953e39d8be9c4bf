"""Re-runs that change what the store holds between runs: the store, not Prefect's cache, decides what
is done, the report shows exactly the current run's results, and a failed run never replaces the
record of the results on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import storage
from flows.cli import app
from flows.pipeline import run_pipeline as compare
from tasks.data import BadImageError
from tasks.report import render_report
from tests.conftest import tiny_config, tiny_vit
from tests.flows.test_resume import (
    comparable,
    finish,
    kill_config,
    kill_group,
    output_of,
    partial_tasks_done,
    shards_done,
    start_run,
    wait_until,
)

pytestmark = pytest.mark.timeout(1800)


def small(tmp_path: Path, store: str, **overrides) -> dict:
    return tiny_config(tmp_path, store=str(tmp_path / store), models=[tiny_vit("vit_a", 0), tiny_vit("vit_b", 1)],
                       analyses={"probes": False}, **overrides)


def summary_of(store: str) -> dict:
    return json.loads((Path(store) / "report" / "summary.json").read_text())


def assert_consistent(store: str) -> None:
    found = storage.verify_store(store)
    assert found.ok, found.errors


def assert_same_results(store: str, reference: str) -> None:
    """The store's report, matrix and activations equal those of the reference store."""
    got, expected = summary_of(store), summary_of(reference)
    assert got["run"]["config"]["reduction"] == expected["run"]["config"]["reduction"]
    assert got["run"]["config"]["sampling"] == expected["run"]["config"]["sampling"]
    assert got["run"]["fingerprints"] == expected["run"]["fingerprints"]
    assert set(got["models"]) == set(expected["models"])
    for name, entry in expected["similarity"].items():
        assert got["similarity"][name]["sites"] == entry["sites"]
        np.testing.assert_allclose(np.array(got["similarity"][name]["matrix"], dtype=float),
                                   np.array(entry["matrix"], dtype=float), atol=1e-6, rtol=0)
    root, ref = storage.open_store(store, mode="r"), storage.open_store(reference, mode="r")
    assert storage.read_samples(root).equals(storage.read_samples(ref))
    for model in expected["models"]:
        for site, array in storage.activation_arrays(ref, model).items():
            np.testing.assert_array_equal(storage.activation_arrays(root, model)[site][:], array[:])
    assert_consistent(store)


@pytest.fixture(scope="module")
def fresh_a(tmp_path_factory, prefect_server) -> dict:
    """Config A, run once on a fresh store (read only: tests that go on from it copy it, `run_a`)."""
    config = small(tmp_path_factory.mktemp("fresh"), "fresh")
    compare(config)
    return config


def run_a(fresh_a: dict, store: Path) -> dict:
    """Config A on `store`, as after its first run there: a copy of fresh_a's store (the same run, not again)."""
    shutil.copytree(fresh_a["store"], store)
    return dict(fresh_a, store=str(store))


def test_going_back_to_an_earlier_reduction_equals_a_fresh_run(fresh_a, tmp_path):
    a = run_a(fresh_a, tmp_path / "store")
    compare(dict(a, reduction="tokens"))
    assert summary_of(a["store"])["run"]["config"]["reduction"] == "tokens"
    compare(a)
    assert_same_results(a["store"], fresh_a["store"])


def test_going_back_to_an_earlier_seed_equals_a_fresh_run_and_a_model_can_be_added(fresh_a, tmp_path):
    a = run_a(fresh_a, tmp_path / "store")
    compare(dict(a, sampling={"per_class": 4, "seed": 1}))
    compare(a)
    assert_same_results(a["store"], fresh_a["store"])
    compare(dict(a, models=[*a["models"], tiny_vit("vit_c", 2)]))
    summary = summary_of(a["store"])
    assert set(summary["models"]) == {"vit_a", "vit_b", "vit_c"}
    assert {s.split("/")[0] for s in summary["similarity"]["linear_biased"]["sites"]} == {"vit_a", "vit_b", "vit_c"}
    assert_consistent(a["store"])


def test_report_shows_exactly_the_current_config(tmp_path, prefect_server):
    config = tiny_config(tmp_path, models=[tiny_vit("vit_a", 0), tiny_vit("vit_b", 1)],
                         similarity=[{"kernel": "linear", "estimator": "biased"},
                                     {"kernel": "linear", "estimator": "unbiased"}])
    compare(config)
    before = summary_of(config["store"])
    assert {"probes", "agreement"} <= set(before["analyses"]) and len(before["similarity"]) == 2
    changed = dict(config, models=[tiny_vit("vit_a", 0), tiny_vit("vit_c", 2)],
                   similarity=[{"kernel": "linear", "estimator": "biased"}], analyses={"probes": False})
    compare(changed)
    rendered = render_report(storage.open_store(config["store"], mode="r"))  # what `ckaflow report` shows
    summary = summary_of(config["store"])
    assert set(summary["models"]) == {"vit_a", "vit_c"}
    assert list(summary["similarity"]) == ["linear_biased"]
    assert {s.split("/")[0] for s in summary["similarity"]["linear_biased"]["sites"]} == {"vit_a", "vit_c"}
    assert "probes" not in summary["analyses"] and "agreement" not in summary["analyses"]
    shown = json.dumps({k: summary[k] for k in ("models", "similarity", "analyses", "findings")})
    assert "vit_b" not in shown and "linear_unbiased" not in shown
    assert {(o["kind"], o["name"]) for o in summary["other_results"]} == {
        ("activations", "vit_b"), ("similarity", "linear_unbiased")}
    assert all(o["fingerprint"] for o in summary["other_results"])
    html = Path(rendered).read_text()
    assert "Other results in this store" in html and "vit_b" in html
    assert_consistent(config["store"])


def test_a_failed_run_leaves_the_previous_good_record_shown(fresh_a, tmp_path):
    # config A's good run, on a store and digits export of this test's own (copies of fresh_a's)
    shutil.copytree(Path(fresh_a["dataset"]["path"]), tmp_path / "digits")
    config = dict(run_a(fresh_a, tmp_path / "store"), dataset=small(tmp_path, "store")["dataset"])
    # a run that passes the pre-flight checks and fails in its sample stage: class 0's images are corrupt
    for image in (tmp_path / "digits" / "0").glob("*.png"):
        image.write_bytes(b"not a png")
    with pytest.raises(BadImageError, match="0/"):
        compare(dict(config, name="broken"))
    root = storage.open_store(config["store"], mode="r")
    assert [r["outcome"] for r in storage.run_history(root)] == ["succeeded", "failed"]
    assert "BadImageError" in storage.run_history(root)[-1]["error"]
    assert storage.last_successful_run(root)["config"]["name"] == "tiny"
    render_report(root)
    summary = summary_of(config["store"])
    assert summary["run"]["config"]["name"] == "tiny" and summary["run"]["finished"]
    assert summary["run"]["outcome"] == "succeeded" and set(summary["models"]) == {"vit_a", "vit_b"}
    status = CliRunner().invoke(app, ["status", config["store"], "--verify"], env={"COLUMNS": "300"})
    assert status.exit_code == 0, status.output
    assert "last successful run: 'tiny'" in status.output and "latest run failed: 'broken'" in status.output
    assert "verify: consistent" in status.output
    site = storage.activation_arrays(storage.open_store(config["store"]), "vit_a")["blocks.1/block"]
    site[0:16] = np.nan  # planted: shard 0's data lost, its done flag kept
    status = CliRunner().invoke(app, ["status", config["store"], "--verify"], env={"COLUMNS": "300"})
    assert status.exit_code == 1
    assert "activations/vit_a/blocks.1/block: shard 0 is marked done" in status.output


def test_killed_refreshes_followed_by_a_plain_run_give_the_full_report(tmp_path, kill_reference):
    reference = kill_reference
    config = dict(kill_config(tmp_path, "killed"), dataset=reference["dataset"])
    store, total = config["store"], -(-240 // 8)
    shutil.copytree(reference["store"], store)  # as after a full run of config on it (the same run, not again)
    expected = summary_of(reference["store"])

    def assert_full() -> None:
        assert comparable(store) == comparable(reference["store"])
        assert set(summary_of(store)["analyses"]) == set(expected["analyses"])
        assert all(storage.model_progress(storage.open_store(store), m) == (total, total) for m in ("vit_a", "vit_b"))
        assert_consistent(store)

    run = start_run(tmp_path, config, "--refresh", "extract")   # killed while extracting again (not while deleting)
    wait_until(lambda: "extracting vit_a" in output_of(run) and 0 < shards_done(store, "vit_a") < total // 2, run)
    kill_group(run)
    finish(start_run(tmp_path, config))
    assert_full()

    run = start_run(tmp_path, config, "--refresh", "similarity")
    wait_until(lambda: partial_tasks_done(store) > 0, run)
    kill_group(run)
    assert storage.list_similarity(storage.open_store(store)) == []
    finish(start_run(tmp_path, config))
    assert_full()
