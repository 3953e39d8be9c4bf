"""The model zoo ("test" variant): trained members beat their random init on held-out digits, their
checkpoints load back through the project's loader, and the flow's cache skips trained members."""

from __future__ import annotations

import importlib.resources
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.stats import binomtest

from flows.train_zoo import train_zoo
from tasks.data import digit_images, split_indices
from tasks.extract import build_model, data_config, preprocessing
from tasks.zoo.data import digits_tensors, normalize
from tasks.zoo.train import (
    FEW_SHOT,
    IMAGE_SIZE,
    TRAIN_THREADS,
    checkpoint_path,
    deterministic,
    extraction_preprocessing,
    fit,
    is_current,
    linear_probe,
    read_card,
    spec_hashes,
    zoo_members,
)

# A trained member's few-shot probe (FEW_SHOT training images per class) must be right on
# significantly more of the 360 held-out images than the same architecture's at random init: exact
# one-sided McNemar test on the images where exactly one of the two probes is right, p < 1e-4 (if
# both were equally good, each such image would favour either side with probability 1/2). The
# full probe is too blunt for this: random resnet10t features already reach ~95% with it.
P_VALUE = 1e-4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, prefect_server):
    out = tmp_path_factory.mktemp("zoo")
    paths = train_zoo(out_dir=str(out), variant="test")
    return out, paths


@pytest.fixture(scope="module")
def digits():
    return digits_tensors("train"), digits_tensors("heldout")


def test_split_is_disjoint_and_covers_every_class():
    train, heldout = split_indices(1797, "train"), split_indices(1797, "heldout")
    assert np.intersect1d(train, heldout).size == 0 and train.size + heldout.size == 1797
    labels = digits_tensors("heldout").labels.numpy()
    assert set(labels.tolist()) == set(range(10))


def test_flow_returns_every_member(zoo):
    out, paths = zoo
    assert list(paths) == [m.name for m in zoo_members("test")]
    for name, path in paths.items():
        assert path == str(checkpoint_path(out, name))
        card = read_card(out, name)
        assert card["load"]["weights"] == f"{name}.safetensors" and np.isfinite(card["final_loss"])
    assert read_card(out, "vit_mae_ft")["finetuned_from"] == "vit_mae"


@pytest.mark.parametrize("name", [m.name for m in zoo_members("test")])
def test_member_loads_and_beats_random_init(zoo, digits, name):
    out, paths = zoo
    card = read_card(out, name)
    load = card["load"]
    model = build_model(load["arch"], load["arch_kwargs"], paths[name], checkpoint_format="auto")
    assert model.ckaflow_load["format"] == load["checkpoint_format"]
    assert not model.ckaflow_load["missing"] and not model.ckaflow_load["unexpected"]
    train, heldout = digits
    probe = card["linear_probe"]
    trained = linear_probe(model, train, heldout, FEW_SHOT)
    random = linear_probe(build_model(load["arch"], load["arch_kwargs"], probe["random_init_weights"]),
                          train, heldout, FEW_SHOT)
    # the checkpoint reproduces the card (loading lost nothing), and the card's baseline is reproducible
    assert trained.test_accuracy == pytest.approx(probe["fewshot_accuracy"], abs=1 / 360)
    assert random.test_accuracy == pytest.approx(probe["fewshot_random_init_accuracy"], abs=1 / 360)
    truth = heldout.labels.numpy()
    wins = int(np.sum((trained.predictions == truth) & (random.predictions != truth)))
    losses = int(np.sum((trained.predictions != truth) & (random.predictions == truth)))
    p = binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue if wins + losses else 1.0
    assert p < P_VALUE, (f"{name}: probe {trained.test_accuracy:.3f} vs random init {random.test_accuracy:.3f} "
                         f"({wins} wins, {losses} losses, p={p:.2g})")


def test_supervised_checkpoint_keeps_its_head(zoo, digits):
    out, paths = zoo
    load = read_card(out, "resnet_sup")["load"]
    model = build_model(load["arch"], load["arch_kwargs"], paths["resnet_sup"])
    assert not model.ckaflow_load["head_reset"]
    _, heldout = digits
    config = data_config(model)
    with torch.no_grad():
        predicted = model(normalize(heldout.images, config["mean"], config["std"])).argmax(1)
    assert (predicted == heldout.labels).float().mean() > 0.8  # chance: 0.1


def test_card_preprocessing_shows_extraction_the_training_pixels(zoo):
    """The exported digit PNGs, through the eval transform of the card's `load.preprocessing`,
    are exactly the normalised tensors the member was trained and probed on."""
    out, paths = zoo
    rgb, _ = digit_images(IMAGE_SIZE)
    images = digits_tensors("all").images[:8]
    for name in ("vit_mae", "resnet_simclr"):
        load = read_card(out, name)["load"]
        model = build_model(load["arch"], load["arch_kwargs"], paths[name])
        transform = preprocessing(model, load["preprocessing"])
        seen = torch.stack([transform(Image.fromarray(image)) for image in rgb[:8]])
        config = data_config(model)
        torch.testing.assert_close(seen, normalize(images, config["mean"], config["std"]))


def test_demo_config_matches_the_demo_zoo():
    """flows/demo.yaml loads each demo zoo member as its model card will say (without training it)."""
    config = yaml.safe_load(importlib.resources.files("flows").joinpath("demo.yaml").read_text())
    models = {model["name"]: model for model in config["models"]}
    members = zoo_members("demo")
    assert list(models) == [m.name for m in members]
    for member in members:
        model = models[member.name]
        assert (model["arch"], model["arch_kwargs"]) == (member.arch, member.arch_kwargs)
        assert model["weights"] == f"runs/zoo/{member.name}.safetensors"
        assert model.get("finetuned_from") == member.finetuned_from
        random = build_model(member.arch, member.arch_kwargs, "random:0")
        assert model["preprocessing"] == extraction_preprocessing(random)


def test_cache_skips_trained_members_and_retrains_on_changes(zoo, prefect_server):
    out, paths = zoo
    before = {name: checkpoint_path(out, name).stat().st_mtime_ns for name in paths}
    assert train_zoo(out_dir=str(out), variant="test") == paths
    assert {name: checkpoint_path(out, name).stat().st_mtime_ns for name in paths} == before
    hashes = spec_hashes(zoo_members("test"))
    assert all(is_current(out, name, hashes[name]) for name in paths)
    assert not is_current(out, "vit_sup", "0" * 16)
    card = read_card(out, "resnet_sup")
    card["spec_hash"] = "stale"
    (out / "resnet_sup.json").write_text(json.dumps(card))
    train_zoo(out_dir=str(out), variant="test")
    after = {name: checkpoint_path(out, name).stat().st_mtime_ns for name in paths}
    assert [name for name in paths if after[name] != before[name]] == ["resnet_sup"]


def test_training_is_deterministic():
    member = zoo_members("test")[1]  # MoCo v3: augmentations, momentum encoder, BN projector
    train = digits_tensors("train", limit=128)
    runs = []
    for run in range(2):
        torch.manual_seed(run)  # the global RNG plays no part
        model = build_model(member.arch, member.arch_kwargs, f"random:{member.seed}")
        with deterministic(TRAIN_THREADS):
            objective, losses = fit(replace(member, epochs=1), model, train)
        runs.append((losses, objective.release_state()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
