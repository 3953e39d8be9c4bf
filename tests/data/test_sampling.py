"""Sampling: determinism (across processes), class balance, size errors, bad-image policies, views."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data import (
    SAMPLE_VARS,
    BadImageError,
    ViewAugmentation,
    draw_images,
    manifest_fingerprint,
    open_dataset,
    sample_image,
    sample_images,
)

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = {"n": 60, "size": 24, "n_classes": 4, "seed": 3}

CHILD = """
import hashlib, json, sys
import numpy as np
from tasks.data import open_dataset
from tasks.data import SAMPLE_VARS, sample_image, sample_images
dataset = open_dataset("synthetic", None, **json.loads(sys.argv[1]))
samples = sample_images(dataset, n=None, per_class=5, seed=11, views=3)
print(json.dumps({"fingerprint": samples.attrs["fingerprint"],
                  "rows": {v: samples[v].values.tolist() for v in SAMPLE_VARS},
                  "pixels": [hashlib.sha256(np.asarray(sample_image(dataset, samples, r)).tobytes()).hexdigest()
                             for r in range(samples.sizes["sample"])]}))
"""


def image_hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


def png(seed: int, mode: str = "RGB") -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def test_same_seed_same_sample_in_another_process():
    dataset = open_dataset("synthetic", None, **SYNTHETIC)
    samples = sample_images(dataset, n=None, per_class=5, seed=11, views=3)
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SYNTHETIC)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=os.environ | {"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr
    theirs = json.loads(child.stdout)
    assert theirs["rows"] == {v: samples[v].values.tolist() for v in SAMPLE_VARS}
    assert theirs["fingerprint"] == samples.attrs["fingerprint"] == manifest_fingerprint(samples)
    assert re.fullmatch("[0-9a-f]{16}", samples.attrs["fingerprint"])  # storage.fingerprint, like every stage
    assert theirs["pixels"] == [image_hash(sample_image(dataset, samples, r)) for r in range(samples.sizes["sample"])]


def test_draws_are_pinned():
    """numpy's PCG64 + uniform draws: these values must not change between machines or versions."""
    labels = np.arange(20) % 4
    assert draw_images(labels, n=5, per_class=None, seed=0).tolist() == [2, 3, 11, 13, 15]
    assert draw_images(labels, n=None, per_class=2, seed=0).tolist() == [0, 1, 2, 3, 8, 11, 13, 18]
    params = ViewAugmentation().draw((0, 3, 1), 32, 32)
    assert params.crop == (3, 12, 10, 12) and params.flip and not params.grayscale
    assert [op for op, _ in params.jitter] == [0, 2, 1, 3]
    assert params.jitter[0][1] == pytest.approx(0.6959638684730369, abs=1e-15)


def test_sample_layout_and_seed_dependence():
    dataset = open_dataset("synthetic", None, **SYNTHETIC)
    samples = sample_images(dataset, n=10, per_class=None, seed=0)
    index = samples["image_index"].values
    assert samples.sizes["sample"] == 10 and np.all(np.diff(index) > 0)
    assert samples["key"].values.tolist() == [dataset.keys[i] for i in index]
    assert samples["label"].values.tolist() == dataset.labels[index].tolist()
    assert samples["label_name"].values.tolist() == [dataset.class_names[c] for c in dataset.labels[index]]
    assert samples["view"].values.tolist() == [0] * 10
    assert samples.attrs["dataset"] == dataset.description and samples.attrs["seed"] == 0
    assert samples.attrs["skipped"] == [] and samples.attrs["n_images"] == samples.attrs["n_drawn"] == 10
    other = sample_images(dataset, n=10, per_class=None, seed=1)
    assert other["image_index"].values.tolist() != index.tolist()
    assert other.attrs["fingerprint"] != samples.attrs["fingerprint"]
    everything = sample_images(dataset, n=None, per_class=None, seed=5)
    assert everything["image_index"].values.tolist() == list(range(60))


def test_class_balance_and_its_errors(tmp_path):
    for name, count in {"a": 5, "b": 2, "c": 4}.items():
        for i in range(count):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{i}.png").write_bytes(png(i))
    dataset = open_dataset("imagefolder", str(tmp_path))
    samples = sample_images(dataset, n=None, per_class=2, seed=4)
    assert np.bincount(samples["label"].values).tolist() == [2, 2, 2]
    assert set(samples["label_name"].values.tolist()) == {"a", "b", "c"}
    with pytest.raises(ValueError, match="per_class=3 .* class 'b' .* has only 2"):
        sample_images(dataset, n=None, per_class=3, seed=0)
    too_many = f"n=12 images requested, but the dataset 'imagefolder' at '{tmp_path}' has 11"
    with pytest.raises(ValueError, match=re.escape(too_many)):
        sample_images(dataset, n=12, per_class=None, seed=0)
    with pytest.raises(ValueError, match="either n"):
        sample_images(dataset, n=2, per_class=2, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        sample_images(dataset, n=2, per_class=None, seed=-1)


@pytest.fixture
def folder_with_bad_images(tmp_path) -> Path:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for i in range(4):
        (tmp_path / "x" / f"good{i}.png").write_bytes(png(i))
    (tmp_path / "x" / "grey.png").write_bytes(png(7, "L"))          # wrong mode: converted, kept
    (tmp_path / "y" / "palette.png").write_bytes(png(8, "P"))       # wrong mode: converted, kept
    (tmp_path / "y" / "truncated.png").write_bytes(png(9)[:120])
    (tmp_path / "y" / "text.png").write_bytes(b"just text")
    return tmp_path


def test_bad_image_policy_fail_names_the_file(folder_with_bad_images):
    dataset = open_dataset("imagefolder", str(folder_with_bad_images))
    with pytest.raises(BadImageError) as caught:
        sample_images(dataset, n=None, per_class=None, seed=0)
    assert str(folder_with_bad_images / "y" / "text.png") in str(caught.value)  # first bad one in key order


def test_bad_image_policy_skip_records_and_shrinks(folder_with_bad_images):
    dataset = open_dataset("imagefolder", str(folder_with_bad_images))
    samples = sample_images(dataset, n=None, per_class=None, seed=0, views=2, on_bad_image="skip")
    skipped = {s["key"]: s for s in samples.attrs["skipped"]}
    assert sorted(skipped) == ["y/text.png", "y/truncated.png"]
    assert "truncated" in skipped["y/truncated.png"]["reason"] and "cannot identify" in skipped["y/text.png"]["reason"]
    assert skipped["y/text.png"]["path"] == str(folder_with_bad_images / "y" / "text.png")
    assert samples.attrs["n_drawn"] == 8 and samples.attrs["n_images"] == 6 and samples.sizes["sample"] == 12
    keys = set(samples["key"].values.tolist())
    assert "x/grey.png" in keys and "y/palette.png" in keys and not keys & set(skipped)
    row = samples["key"].values.tolist().index("x/grey.png")
    grey = np.asarray(sample_image(dataset, samples, row))
    assert grey.shape == (16, 16, 3) and np.array_equal(grey[..., 0], grey[..., 2])


def test_views_plain_first_then_seeded_augmentations():
    dataset = open_dataset("synthetic", None, **SYNTHETIC)
    one = sample_images(dataset, n=8, per_class=None, seed=2)
    three = sample_images(dataset, n=8, per_class=None, seed=2, views=3)
    assert three.sizes["sample"] == 24 and three["view"].values.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    for var in SAMPLE_VARS:  # views=1 rows are a prefix of views=3 rows
        assert three[var].values[:8].tolist() == one[var].values.tolist()
    assert ViewAugmentation(**three.attrs["augmentation"]) == ViewAugmentation() and "augmentation" not in one.attrs
    index = int(three["image_index"].values[0])
    plain, view1, view2 = (np.asarray(sample_image(dataset, three, r)) for r in (0, 8, 16))
    assert np.array_equal(plain, np.asarray(dataset.load(index)))
    assert not np.array_equal(plain, view1) and not np.array_equal(view1, view2)
    assert np.array_equal(view1, np.asarray(sample_image(dataset, three, 8)))
    other_seed = sample_images(dataset, n=8, per_class=None, seed=2, views=3).assign_attrs(seed=9)
    assert not np.array_equal(view1, np.asarray(sample_image(dataset, other_seed, 8)))


def test_sample_image_detects_a_changed_dataset():
    samples = sample_images(open_dataset("synthetic", None, **SYNTHETIC), n=5, per_class=None, seed=0)
    smaller = open_dataset("synthetic", None, **(SYNTHETIC | {"n": 2}))
    with pytest.raises(ValueError, match="dataset changed since sampling"):
        sample_image(smaller, samples, 4)


def test_fingerprint_ignores_where_the_dataset_lives(tmp_path):
    for root in ("a", "b"):
        (tmp_path / root / "c").mkdir(parents=True)
        for i in range(3):
            (tmp_path / root / "c" / f"{i}.png").write_bytes(png(i))
    a, b = (sample_images(open_dataset("imagefolder", str(tmp_path / r)), n=2, per_class=None, seed=0)
            for r in ("a", "b"))
    assert a.attrs["dataset"]["path"] != b.attrs["dataset"]["path"]
    assert a.attrs["fingerprint"] == b.attrs["fingerprint"]


def test_augmentation_ops():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    still = dict(crop_scale=(1, 1), crop_ratio=(1, 1), flip_p=0, jitter_p=0, grayscale_p=0)
    assert np.array_equal(np.asarray(ViewAugmentation(**still)(image, (0, 0, 1))), np.asarray(image))
    flipped = ViewAugmentation(**(still | {"flip_p": 1}))(image, (0, 0, 1))
    assert np.array_equal(np.asarray(flipped), np.asarray(image)[:, ::-1])
    grey = np.asarray(ViewAugmentation(**(still | {"grayscale_p": 1}))(image, (0, 0, 1)))
    assert grey.shape == (12, 12, 3) and np.array_equal(grey[..., 0], grey[..., 1])
    augmentation = ViewAugmentation()
    for key in range(200):
        top, left, h, w = augmentation.draw((1, key, 1), 40, 30).crop
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40
        assert 0.08 * 1200 * 0.8 <= h * w <= 1200
    with pytest.raises(ValueError, match="crop_scale"):
        ViewAugmentation(crop_scale=(0, 1))
