"""The whole pipeline, for real, under Prefect: sample -> extract -> CKA on Dask -> analyses -> report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import storage
from flows.config import ConfigError
from flows.pipeline import run_pipeline as compare
from tests.conftest import tiny_config, tiny_vit


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prefect_server):
    tmp_path = tmp_path_factory.mktemp("run")
    config = tiny_config(tmp_path)
    index = compare(config)
    return config, Path(index)


def test_report_exists_and_summary_is_consistent(finished_run):
    config, index = finished_run
    assert index.is_file() and index.name == "index.html"
    summary = json.loads((index.parent / "summary.json").read_text())
    assert summary["run"]["n_samples"] == 40
    assert summary["run"]["finished"] and summary["run"]["versions"]["prefect"]
    assert set(summary["models"]) == {"vit_a", "vit_b", "resnet"}
    assert summary["models"]["vit_a"]["sites"][0].startswith("blocks.0/")
    matrix_entry = summary["similarity"]["linear_biased"]
    assert matrix_entry["kernel"] == "linear" and matrix_entry["estimator"] == "biased"
    matrix = np.array(matrix_entry["matrix"], dtype=float)
    assert matrix.shape == (len(matrix_entry["sites"]),) * 2
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-9)
    assert {site.split("/")[0] for site in matrix_entry["sites"]} == {"vit_a", "vit_b", "resnet"}
    assert list((index.parent / "figures").glob("*.png"))


def test_store_is_labelled_and_matches_reference(finished_run):
    from tasks.cka import cka

    config, _ = finished_run
    acts = storage.open_activations(config["store"], "vit_a")
    site = "blocks.1/block"
    assert acts[site].sizes["sample"] == 40
    similarity = storage.open_similarity(config["store"], "linear_biased")
    other = storage.open_activations(config["store"], "vit_b")
    expected = cka(np.asarray(acts[site], dtype=np.float64), np.asarray(other[site], dtype=np.float64))
    got = similarity.sel(model_a="vit_a", layer_a="blocks.1", sublayer_a="block",
                         model_b="vit_b", layer_b="blocks.1", sublayer_b="block")
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_second_run_reuses_the_store_and_is_identical(finished_run):
    """Nothing changed: every stage is skipped, the report included (not one file of it is written again)."""
    config, index = finished_run
    before = json.loads((index.parent / "summary.json").read_text())["similarity"]
    written = {path: path.stat().st_mtime_ns for path in index.parent.rglob("*") if path.is_file()}
    assert compare(config) == str(index)
    after = json.loads((index.parent / "summary.json").read_text())["similarity"]
    assert before == after
    assert {path: path.stat().st_mtime_ns for path in index.parent.rglob("*") if path.is_file()} == written
    root = storage.open_store(config["store"], mode="r")
    record = storage.run_history(root)[-1]
    assert record["outcome"] == storage.SUCCEEDED and record["stages_done"][-1] == "report"
    assert record["fingerprints"]["report"] == storage.report_fingerprint(root)


def test_n_larger_than_dataset_fails_before_writing(tmp_path, prefect_server):
    config = tiny_config(tmp_path, sampling={"n": 10**6, "seed": 0})
    with pytest.raises(ValueError, match="sampling.n: 1000000"):
        compare(config)
    assert not Path(config["store"]).exists()


def test_invalid_config_fails_before_writing(tmp_path, prefect_server):
    config = tiny_config(tmp_path, similarity=[{"kernel": "polynomial"}])
    with pytest.raises(ConfigError, match="similarity.0.kernel"):
        compare(config)
    assert not Path(config["store"]).exists()


def test_extraction_split_over_devices_by_shard_range_matches(finished_run, tmp_path):
    config, _ = finished_run
    split = dict(config, store=str(tmp_path / "split"),
                 compute=dict(config["compute"], extract_devices=["cpu", "cpu"]))
    compare(split, stage="sample")
    compare(split, stage="extract")
    for model in ("vit_a", "resnet"):
        whole = storage.activation_arrays(storage.open_store(config["store"]), model)
        parts = storage.activation_arrays(storage.open_store(split["store"]), model)
        assert list(parts) == list(whole)
        for site in whole:
            np.testing.assert_array_equal(np.asarray(parts[site][:]), np.asarray(whole[site][:]))


def test_checkpoint_replaced_at_the_same_path_is_extracted_again(tmp_path, prefect_server):
    """The activations' fingerprint includes the weights file's content, not just its path."""
    from safetensors.torch import save_file

    from tasks.extract import build_model

    def save(seed: int) -> None:
        model = build_model(vit["arch"], vit["arch_kwargs"], f"random:{seed}")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    weights = tmp_path / "vit.safetensors"
    vit = tiny_vit("vit_a", 0)
    config = tiny_config(tmp_path, models=[dict(vit, weights=str(weights)), tiny_vit("vit_b", 1)],
                         analyses={"probes": False})
    save(0)
    compare(config, stage="sample")
    compare(config, stage="extract")
    first = storage.model_attrs(storage.open_store(config["store"]), "vit_a")["fingerprint"]
    before = np.asarray(storage.activation_arrays(storage.open_store(config["store"]), "vit_a")["blocks.1/block"][:])
    save(3)
    compare(config, stage="extract")
    root = storage.open_store(config["store"])
    assert storage.model_attrs(root, "vit_a")["fingerprint"] != first
    after = np.asarray(storage.activation_arrays(root, "vit_a")["blocks.1/block"][:])
    assert not np.allclose(before, after)
