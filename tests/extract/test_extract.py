"""Extraction: stored activations equal a direct forward; resume after SIGKILL is exact; NaN counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import storage
from tasks.data import open_dataset, sample_image, sample_images
from tasks.extract import (
    ExtractOptions,
    ModelSpec,
    build_model,
    extract_model,
    preprocessing,
    reduce,
    resolve_sites,
    tap_sites,
)

ROOT = Path(__file__).resolve().parents[2]
# (arch, arch_kwargs, preprocessing overrides). The ResNet at 96 px, not timm's 224: a fifth of the compute, and
# layer4's maps are 3x3, so pool2 still averages overlapping windows.
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3,
                                "num_classes": 0}, None)
RESNET = ("resnet18", {"layers": (1, 1, 1, 1), "num_classes": 0}, {"input_size": 96})
DATASET = {"n": 40, "size": 32}


@pytest.fixture(scope="module")
def data():
    dataset = open_dataset("synthetic", None, **DATASET)
    return dataset, sample_images(dataset, n=30, per_class=None, seed=0)


def new_store(path: Path, samples) -> object:
    root = storage.open_store(str(path))
    storage.write_samples(root, samples)
    return root


def extract(root, data, arch=VIT, *, shards=None, progress=None, **settings):
    """extract_model of model "m" with these tests' defaults; `settings` override ModelSpec / ExtractOptions fields."""
    dataset, samples = data
    spec = dict(name="m", arch=arch[0], arch_kwargs=arch[1], preprocessing=arch[2], weights="random:0",
                sites="vit-sublayers", reduction="mean")
    options = dict(batch_size=4, device="cpu", shard_size=8)
    spec.update({k: v for k, v in settings.items() if k in ModelSpec.__dataclass_fields__})
    options.update({k: v for k, v in settings.items() if k in ExtractOptions.__dataclass_fields__})
    return extract_model(root, ModelSpec(**spec), dataset=dataset, samples=samples, options=ExtractOptions(**options),
                         shards=shards, progress=progress)


def stored(root, model: str = "m") -> dict[str, np.ndarray]:
    return {site: np.asarray(array[:]) for site, array in storage.activation_arrays(root, model).items()}


def direct(data, arch, weights: str, spec, reduction: str) -> dict[str, np.ndarray]:
    """Reference: one image at a time, hooks + reduction, no DataLoader, no store."""
    dataset, samples = data
    model = build_model(arch[0], arch[1], weights)
    transform = preprocessing(model, arch[2])
    sites = resolve_sites(model, spec)
    rows: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    with tap_sites(model, sites, lambda s, t: rows[s.name].append(reduce(t, reduction, s.prefix_tokens))), \
            torch.inference_mode():
        for row in range(samples.sizes["sample"]):
            model(transform(sample_image(dataset, samples, row))[None])
    return {name: torch.cat(values).numpy() for name, values in rows.items()}


@pytest.mark.parametrize("arch, spec, reduction", [(VIT, "vit-sublayers", "mean"), (VIT, "vit-blocks", "cls"),
                                                   (RESNET, "resnet-sublayers", "avgpool"),
                                                   (RESNET, ["layer4.0:output"], "pool2")])
def test_stored_activations_equal_direct_forward(tmp_path, data, arch, spec, reduction):
    root = new_store(tmp_path / "store", data[1])
    summary = extract(root, data, arch, sites=spec, reduction=reduction)
    expected = direct(data, arch, "random:0", spec, reduction)
    got = stored(root)
    assert list(got) == list(expected) == summary["sites"]
    for site in expected:
        np.testing.assert_allclose(got[site], expected[site], rtol=1e-4, atol=1e-5, err_msg=site)
    assert summary["shards_written"] == 4 and summary["shards_skipped"] == 0
    assert summary["nonfinite"] == dict.fromkeys(expected, 0)
    assert storage.model_progress(root, "m") == (4, 4)
    attrs = storage.model_attrs(root, "m")
    assert attrs["reduction"] == reduction and attrs["arch"] == arch[0]


def test_second_run_skips_done_shards_and_subsets(tmp_path, data):
    root = new_store(tmp_path / "store", data[1])
    calls: list[int] = []
    totals: set[int | None] = set()

    def progress(done_now: int, total: int | None) -> None:
        calls.append(done_now)
        totals.add(total)

    first = extract(root, data, shards=[1, 3], progress=progress)
    assert first["shards_written"] == 2 and calls == [4, 4, 4, 2]  # images, per batch
    assert totals == {14}  # the images of the requested shards
    assert storage.model_progress(root, "m") == (2, 4)
    calls.clear()
    totals.clear()
    second = extract(root, data, progress=progress)
    assert second["shards_written"] == 2 and second["shards_skipped"] == 2 and calls == [14, 4, 4, 4, 4]
    assert totals == {30}
    assert second["fingerprint"] == first["fingerprint"]


RESUME_CHILD = """
import os, signal, sys
import storage
from tasks.data import open_dataset
from tasks.extract import ExtractOptions, ModelSpec, extract_model
root = storage.open_store(sys.argv[1])
written = []
def progress(n, total):  # images: 16 = two shards of 8, both written
    written.append(n)
    if sum(written) == 16:
        os.kill(os.getpid(), signal.SIGKILL)
extract_model(root, ModelSpec("m", {arch!r}, "random:0", "resnet-sublayers", "pool2", arch_kwargs={kwargs!r},
                              preprocessing={preprocessing!r}),
              dataset=open_dataset("synthetic", None, **{dataset!r}), samples=storage.read_samples(root),
              options=ExtractOptions(batch_size=4, device="cpu", shard_size=8), progress=progress)
"""


def test_resume_after_sigkill_gives_identical_arrays(tmp_path, data):
    killed = new_store(tmp_path / "killed", data[1])
    script = RESUME_CHILD.format(arch=RESNET[0], kwargs=RESNET[1], preprocessing=RESNET[2], dataset=DATASET)
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "killed")], cwd=ROOT,
                           env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert storage.model_progress(killed, "m") == (2, 4)
    resumed = extract(killed, data, RESNET, sites="resnet-sublayers", reduction="pool2")
    assert resumed["shards_written"] == 2 and resumed["shards_skipped"] == 2

    fresh = new_store(tmp_path / "fresh", data[1])
    extract(fresh, data, RESNET, sites="resnet-sublayers", reduction="pool2")
    a, b = stored(killed), stored(fresh)
    assert list(a) == list(b)
    for site in a:
        np.testing.assert_array_equal(a[site], b[site], err_msg=site)


def test_nonfinite_values_are_counted_per_site(tmp_path, data):
    state = build_model(*VIT[:2], "random:0").state_dict()
    state["blocks.1.mlp.fc2.bias"][3] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    root = new_store(tmp_path / "store", data[1])
    summary = extract(root, data, weights=str(tmp_path / "nan.safetensors"))
    counts = summary["nonfinite"]
    assert all(counts[s] == 0 for s in ("patch_embed/output", "blocks.0/block", "blocks.1/norm2"))
    assert counts["blocks.1/mlp"] == 30 and counts["blocks.1/block"] == 30 and counts["norm/output"] == 30 * 48
    recorded = json.dumps(storage.model_attrs(root, "m"), default=str)
    assert "blocks.1/mlp" in recorded


def test_float16_storage_and_fingerprint_change(tmp_path, data):
    root = new_store(tmp_path / "store", data[1])
    summary = extract(root, data, dtype="float16", sites="vit-blocks")
    arrays = storage.activation_arrays(root, "m")
    assert arrays["blocks.1/block"].dtype == np.float16
    other = new_store(tmp_path / "other", data[1])
    assert extract(other, data, sites="vit-blocks")["fingerprint"] != summary["fingerprint"]
