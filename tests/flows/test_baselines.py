"""`baselines: random`: one random-weights twin per architecture, after the configured models."""

from __future__ import annotations

import pytest

from flows.config import ConfigError, validate_config


def config(models: list[dict], **extra) -> dict:
    return {"store": "/tmp/unused-store", "dataset": {"kind": "digits", "path": "/tmp/unused-digits"},
            "models": models, **extra}


VIT = {"arch": "vit_tiny_patch16_224", "arch_kwargs": {"img_size": 32}, "sites": "vit-sublayers", "reduction": "cls"}
CNN = {"arch": "resnet18", "sites": "resnet-sublayers", "reduction": "avgpool"}


def test_random_baselines_add_one_twin_per_architecture_in_config_order():
    models = [{"name": "vit_a", "weights": "random:0", **VIT}, {"name": "cnn", "weights": "random:3", **CNN},
              {"name": "vit_b", "weights": "random:1", "finetuned_from": "vit_a", **VIT}]
    cfg = validate_config(config(models, baselines="random"))
    assert [m.name for m in cfg.models] == ["vit_a", "cnn", "vit_b", "vit_tiny_patch16_224_random", "resnet18_random"]
    vit_twin, cnn_twin = cfg.models[3:]
    assert vit_twin.baseline_of == "vit_tiny_patch16_224" and cnn_twin.baseline_of == "resnet18"
    assert vit_twin.weights == "random:2"  # a seed no configured model of that architecture uses
    assert cnn_twin.weights == "random:0"
    assert (vit_twin.arch_kwargs, vit_twin.sites, vit_twin.reduction) == ({"img_size": 32}, "vit-sublayers", "cls")
    assert vit_twin.finetuned_from is None
    again = validate_config(cfg.model_dump())  # a stored config validates to the same models, no second twin
    assert [m.name for m in again.models] == [m.name for m in cfg.models]


def test_without_baselines_nothing_is_added_and_bad_values_are_named():
    assert [m.name for m in validate_config(config([{"name": "a", "weights": "random:0", **CNN}])).models] == ["a"]
    with pytest.raises(ConfigError, match="baselines"):
        validate_config(config([{"name": "a", "weights": "random:0", **CNN}], baselines="trained"))


def test_a_run_with_random_baselines_extracts_the_twins_and_its_findings_quote_them(tmp_path, prefect_server):
    import json
    from pathlib import Path

    import storage
    from flows.pipeline import run_pipeline as compare
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, baselines="random")
    config["models"] = [config["models"][0], config["models"][2]]  # vit_a and resnet
    index = Path(compare(config))
    root = storage.open_store(config["store"])
    models = storage.list_models(root)
    assert set(models) == {"vit_a", "resnet", "vit_tiny_patch16_224_random", "resnet10t_random"}
    assert storage.model_attrs(root, "resnet10t_random")["baseline_of"] == "resnet10t"
    assert storage.model_attrs(root, "resnet10t_random")["weights"] == "random:0"
    summary = json.loads(index.with_name("summary.json").read_text())
    finding = next(f for f in summary["findings"] if {f["model_a"], f["model_b"]} == {"vit_a", "resnet"})
    assert {finding["baseline"]["model_a"], finding["baseline"]["model_b"]} == {"vit_tiny_patch16_224_random",
                                                                               "resnet10t_random"}
    assert "Baseline (architecture alone, random weights)" in finding["text"]
    assert "random-weights twin of resnet10t" in index.read_text()
