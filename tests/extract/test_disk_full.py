"""Disk full during extraction (a real, small tmpfs store): the write fails with ENOSPC, the shards
written so far stay done, and after space is freed the same call resumes to the arrays of an
uninterrupted run."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import storage
from tasks.data import open_dataset, sample_images
from tasks.extract import ExtractOptions, ModelSpec, extract_model
from tests.conftest import tiny_vit
from tests.mounts import resize, tmpfs

DATASET = {"n": 48, "size": 32, "n_classes": 4, "seed": 0}
SPEC = ModelSpec("m", "vit_tiny_patch16_224", "random:0", "vit-sublayers", "tokens",
                 arch_kwargs=tiny_vit("m", 0)["arch_kwargs"])
OPTIONS = ExtractOptions(batch_size=8, device="cpu", shard_size=8)


def extract(path):
    dataset = open_dataset("synthetic", None, **DATASET)
    root = storage.open_store(str(path))
    if "samples" not in root:
        storage.write_samples(root, sample_images(dataset, n=48, per_class=None, seed=0))
    return extract_model(root, SPEC, dataset=dataset, samples=storage.read_samples(root), options=OPTIONS)


def test_disk_full_leaves_the_store_resumable(tmp_path):
    reference = extract(tmp_path / "reference")
    assert reference["shards_written"] == 6
    with tmpfs(tmp_path / "small", "1m") as mount:
        with pytest.raises(OSError) as info:
            extract(mount / "store")
        assert info.value.errno == errno.ENOSPC
        root = storage.open_store(str(mount / "store"), mode="r")
        done, total = storage.model_progress(root, "m")
        assert 0 < done < total == 6
        resize(mount, "16m")
        resumed = extract(mount / "store")
        assert resumed["shards_skipped"] == done and resumed["shards_written"] == total - done
        assert resumed["fingerprint"] == reference["fingerprint"]
        ours = storage.activation_arrays(mount / "store", "m")
        theirs = storage.activation_arrays(tmp_path / "reference", "m")
        for site, array in theirs.items():
            np.testing.assert_array_equal(ours[site][:], array[:], err_msg=site)
