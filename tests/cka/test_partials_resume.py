"""Resume integrity: stored partial sums are reused only by the computation that produced them.

The key covers digests of every site's stored bytes, kernel, estimator, precision, block plan, means and
scales and the RBF bandwidths; anything else starts afresh and says why in the log."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import xarray as xr
import zarr

import storage
from tasks.cka import cka_matrix
from tests.cka.test_engine import crash_after, reference

N, SHARD = 64, 16
KWARGS = dict(method="blocked", block_size=16, precision="float32")


def float16_store(tmp_path, sites: dict[str, np.ndarray]) -> zarr.Group:
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, xr.Dataset({"image_index": ("sample", np.arange(N))}, attrs={"fingerprint": "s"}))
    with storage.ActivationWriter(root, "m", {s: x.shape[1] for s, x in sites.items()}, N, shard_size=SHARD,
                                  fingerprint="fp", dtype="float16") as writer:
        for shard in range(writer.n_shards):
            a, b = writer.shard_bounds(shard)
            writer.write_shard(shard, {s: x[a:b] for s, x in sites.items()})
    return root


def float16_sites(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(N, 4))
    return {f"blocks.{i}/mlp": latent @ rng.normal(size=(4, d)) + rng.normal(size=(N, d)) + 20.0
            for i, d in enumerate((5, 7, 6))}


def interrupted(monkeypatch, arrays: dict, group: zarr.Group, **kwargs) -> None:
    """A run killed after 4 block pairs, leaving their partial sums in `group`."""
    crash_after(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="killed"):
        cka_matrix(arrays, partials=group, **{**KWARGS, **kwargs})
    assert len(list(group.arrays())) == 4
    monkeypatch.undo()


def stored(root: zarr.Group) -> dict[str, zarr.Array]:
    return {f"m/{site}": array for site, array in storage.activation_arrays(root, "m").items()}


@pytest.mark.parametrize("change", ["permute rows", "one stored value"])
def test_changed_data_between_interrupt_and_rerun_reuses_nothing(tmp_path, monkeypatch, caplog, change):
    sites = float16_sites()
    root = float16_store(tmp_path, sites)
    group = storage.partials_group(root, "cka")
    interrupted(monkeypatch, stored(root), group)
    if change == "permute rows":      # the same rows, stored in another order (column sums, minima, maxima unchanged)
        order = np.random.default_rng(5).permutation(N)
        root = float16_store(tmp_path, {s: x[order] for s, x in sites.items()})
    else:
        array = stored(root)["m/blocks.1/mlp"]
        array[3, 2] = np.float16(float(array[3, 2]) + 0.5)
    arrays = stored(root)
    with caplog.at_level(logging.WARNING, logger="tasks.cka._partials"):
        out = cka_matrix(arrays, partials=storage.partials_group(root, "cka"), **KWARGS)
    assert out.attrs["resumed_tasks"] == 0
    assert "discarded (4 tasks)" in caplog.text and "data" in caplog.text
    fresh = cka_matrix(arrays, **KWARGS)
    np.testing.assert_array_equal(out.values, fresh.values)
    np.testing.assert_allclose(out.values, reference({k: np.asarray(a[:]) for k, a in arrays.items()}), atol=1e-5)


@pytest.mark.parametrize("other", [dict(unbiased=True), dict(precision="float64"), dict(block_size=24),
                                   dict(kernel="rbf"), dict(kernel="rbf", rbf_threshold=0.7)])
def test_other_settings_between_interrupt_and_rerun_reuse_nothing(tmp_path, monkeypatch, caplog, other):
    arrays = stored(float16_store(tmp_path, float16_sites()))
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    first = {"kernel": "rbf"} if "rbf_threshold" in other else {}
    interrupted(monkeypatch, arrays, group, **first)
    with caplog.at_level(logging.WARNING, logger="tasks.cka._partials"):
        out = cka_matrix(arrays, partials=group, **{**KWARGS, **other})
    assert out.attrs["resumed_tasks"] == 0 and "discarded" in caplog.text
    np.testing.assert_array_equal(out.values, cka_matrix(arrays, **{**KWARGS, **other}).values)


def test_unchanged_data_resumes(tmp_path, monkeypatch):
    arrays = stored(float16_store(tmp_path, float16_sites()))
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    interrupted(monkeypatch, arrays, group)
    out = cka_matrix(arrays, partials=group, **KWARGS)
    assert out.attrs["resumed_tasks"] == 4
    np.testing.assert_allclose(out.values, cka_matrix(arrays, **KWARGS).values, atol=1e-12)


def test_writer_records_a_digest_of_each_shards_stored_bytes(tmp_path):
    sites = float16_sites()
    root = float16_store(tmp_path, sites)
    digests = storage.shard_digests(root, "m")
    assert list(digests) == list(sites)
    for site, x in sites.items():
        expected = [hashlib.sha256(x[a:a + SHARD].astype(np.float16).tobytes()).hexdigest() for a in range(0, N, SHARD)]
        assert digests[site] == expected
    changed = dict(sites)
    changed["blocks.0/mlp"] = sites["blocks.0/mlp"].copy()
    changed["blocks.0/mlp"][20, 1] += 1.0
    with storage.ActivationWriter(root, "m", {s: x.shape[1] for s, x in sites.items()}, N, shard_size=SHARD,
                                  fingerprint="fp", dtype="float16") as writer:
        writer.write_shard(1, {s: x[16:32] for s, x in changed.items()})
    again = storage.shard_digests(root, "m")
    assert again["blocks.0/mlp"][1] != digests["blocks.0/mlp"][1]
    assert [again[s][i] for s in sites for i in (0, 2, 3)] == [digests[s][i] for s in sites for i in (0, 2, 3)]
