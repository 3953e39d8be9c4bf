"""`import ckaflow`: models from an import-path factory and in-memory modules give the same activations
and CKA as the same model built by timm; every storage reader takes a path or an opened store alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckaflow
import storage
from tasks.extract import (
    build_model,
    list_sites,
    model_fingerprint,
    register_module,
    state_dict_sha256,
)
from tests.conftest import tiny_vit

FACTORY = "timm.models.vision_transformer:vit_tiny_patch16_224"
KWARGS = tiny_vit("x", 0)["arch_kwargs"]


def test_import_path_factory_builds_the_timm_model():
    timm_model = build_model("vit_tiny_patch16_224", KWARGS, "random:3")
    factory_model = build_model(FACTORY, KWARGS, "random:3")
    assert type(factory_model) is type(timm_model)
    for (name, a), (_, b) in zip(timm_model.state_dict().items(), factory_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert "blocks.0/block" in dict(list_sites(FACTORY, KWARGS)["vit-blocks"])
    assert "blocks.0.mlp.fc1:output" in dict(list_sites(FACTORY, KWARGS)["modules"])


def test_bad_import_paths_are_named():
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.models'"):
        build_model("no_such_pkg.models:net", {}, "random:0")
    with pytest.raises(ValueError, match="has no attribute 'nothing'"):
        build_model("timm.models.vision_transformer:nothing", {}, "random:0")


def test_in_memory_fingerprint_follows_the_state_dict_bytes():
    module = build_model("vit_tiny_patch16_224", KWARGS, "random:0")
    arch = register_module(module)
    assert arch == f"memory:{state_dict_sha256(module)[:16]}"
    assert model_fingerprint(arch, {}, "module") == model_fingerprint(register_module(module), {}, "module")
    with torch.no_grad():
        next(module.parameters())[0, 0] += 1.0
    assert register_module(module) != arch


def test_compare_on_in_memory_modules_equals_timm(tmp_path):
    module = build_model("vit_tiny_patch16_224", KWARGS, "random:0").train()
    other = build_model("vit_tiny_patch16_224", KWARGS, "random:1")
    before = state_dict_sha256(module)
    result = ckaflow.compare(
        models={"timm": {"arch": "vit_tiny_patch16_224", "arch_kwargs": KWARGS, "weights": "random:0"},
                "factory": {"arch": FACTORY, "arch_kwargs": KWARGS, "weights": "random:0"},
                "memory": module, "other": other},
        images={"kind": "synthetic", "options": {"n": 24, "size": 32, "n_classes": 3, "seed": 0}},
        store=str(tmp_path / "store"), sites="vit-blocks", reduction="mean", analyses={"probes": False},
        compute={"device": "cpu", "batch_size": 8, "shard_size": 8, "n_workers": 1, "memory_budget": "256MiB"})
    cka = result.similarity["linear_biased"]
    by_model = {m: cka.sel(model_a=m, model_b="other").values for m in ("timm", "factory", "memory")}
    np.testing.assert_allclose(by_model["factory"], by_model["timm"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(by_model["memory"], by_model["timm"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(cka.sel(model_a="memory", model_b="timm").values.diagonal(), 1.0, atol=1e-6)
    activations = {m: ckaflow.open_activations(result.store, m)["blocks.1/block"].values for m in by_model}
    np.testing.assert_array_equal(activations["memory"], activations["timm"])
    np.testing.assert_array_equal(activations["factory"], activations["timm"])
    assert module.training and state_dict_sha256(module) == before  # the user's module is left as it was

    root = storage.open_store(result.store, mode="r")
    for reader in (ckaflow.list_similarity, ckaflow.list_analyses, ckaflow.list_models):
        assert reader(result.store) == reader(root) != []
    assert ckaflow.list_models(result.store) == ["timm", "factory", "memory", "other"]  # the order given
    name = ckaflow.list_analyses(result.store)[0]
    assert ckaflow.read_analysis(result.store, name).identical(ckaflow.read_analysis(root, name))
    assert ckaflow.read_samples(tmp_path / "store").sizes["sample"] == 24
