"""Incremental CKA (`known=`): entries of a previous matrix are reused exactly, only pairs involving a new
site are computed, and the result equals a from-scratch computation (float64 reference)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import storage
from storage import site_index
from tasks.cka import CkaOptions, DegenerateSiteWarning, cka, cka_matrix, minibatch_cka_matrix, update_similarity
from tasks.cka._grams import stack_products
from tasks.cka._plan import feature_items, features_cost
from tests.cka.test_engine import CASES, crash_after, reference, site_arrays
from tests.stores import write_features

OLD = ["m0/blocks.0/attn", "m1/blocks.1/attn", "m0/blocks.2/attn"]


def multiindexed(matrix: xr.DataArray) -> xr.DataArray:
    """The matrix with (model, layer, sublayer) MultiIndex coords, as the run store returns it."""
    plain = xr.DataArray(matrix.values, dims=matrix.dims, attrs=matrix.attrs)
    return plain.assign_coords(site_index(list(matrix.site_a.values), "a")).assign_coords(
        site_index(list(matrix.site_b.values), "b"))


@pytest.mark.parametrize(("kernel", "unbiased", "method"), CASES)
def test_known_entries_reused_new_ones_match_reference(kernel, unbiased, method):
    arrays = site_arrays(61, [3, 9, 5, 7, 4], seed=3, dtype=np.float64)
    kwargs = dict(kernel=kernel, unbiased=unbiased, method=method, precision="float64", block_size=16)
    known = cka_matrix({k: arrays[k] for k in OLD}, **kwargs)
    # a new site first, an old one, the other new one, then the rest of the old ones
    order = ["m1/blocks.3/attn", OLD[1], "m0/blocks.4/attn", OLD[0], OLD[2]]
    current = {k: arrays[k] for k in order}
    for previous in (known, multiindexed(known)):
        out = cka_matrix(current, known=previous, **kwargs)
        np.testing.assert_allclose(out.values, reference(current, kernel=kernel, unbiased=unbiased), atol=1e-9)
        np.testing.assert_array_equal(out.sel(site_a=OLD, site_b=OLD).values, known.sel(site_a=OLD, site_b=OLD).values)
        assert out.attrs["reused_entries"] == 9 and out.attrs["computed_entries"] == 16
        assert list(out.site_a.values) == order and out.attrs["method"] == method


def test_all_known_sites_read_nothing():
    arrays = site_arrays(50, [4, 6, 5, 3], dtype=np.float64)
    known = cka_matrix(arrays, precision="float64")
    assert known.attrs["reused_entries"] == 0 and known.attrs["computed_entries"] == 16
    # a site of the previous run dropped: everything left is reused, without a pass over the data
    kept = {k: np.full((50, 1), np.nan) for k in list(arrays)[:3]}
    out = cka_matrix(kept, known=multiindexed(known))
    np.testing.assert_array_equal(out.values, known.values[:3, :3])
    assert out.attrs["computed_entries"] == 0 and out.attrs["kernel"] == "linear"
    assert set(out.attrs["nan_reasons"]) == set()


def test_only_pairs_with_a_new_site_are_formed():
    dims, new = [4, 6, 5, 3, 7, 2], frozenset({1, 4})
    items = feature_items(dims, 10, new)
    covered = {(s, t) for a, b in items for s in a for t in b} | {(t, s) for a, b in items for s in a for t in b}
    needed = {(s, t) for s in range(6) for t in range(6) if s == t or s in new or t in new}
    assert covered == needed
    assert features_cost(50, dims, items) < features_cost(50, dims, feature_items(dims, 10))
    stack = torch.randn(6, 5, 7, dtype=torch.float64)
    full, part = stack_products(stack, None), stack_products(stack, new)
    rows = sorted(new)
    np.testing.assert_allclose(part[rows], full[rows], rtol=1e-12)
    np.testing.assert_allclose(part[:, rows], full[:, rows], rtol=1e-12)
    np.testing.assert_allclose(np.diag(part), np.diag(full), rtol=1e-12)
    old = [s for s in range(6) if s not in new]
    assert not part[np.ix_(old, old)][~np.eye(4, dtype=bool)].any()      # old x old products never formed


def test_incremental_run_resumes_only_its_own_partial_sums(monkeypatch):
    arrays = site_arrays(70, [4, 7, 5, 6], dtype=np.float64)
    known = cka_matrix({k: arrays[k] for k in OLD}, precision="float64")
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    calls = crash_after(monkeypatch, 2)
    kwargs = dict(method="blocked", block_size=16, precision="float64", partials=group)
    for previous in (None, known):                 # a full run, then an incremental one, both killed
        calls.clear()
        with pytest.raises(RuntimeError, match="killed"):
            cka_matrix(arrays, known=previous, **kwargs)
    monkeypatch.undo()
    out = cka_matrix(arrays, known=known, **kwargs)
    assert out.attrs["resumed_tasks"] == 2 and out.attrs["reused_entries"] == 9
    np.testing.assert_allclose(out.values, reference(arrays), atol=1e-9)


def test_new_degenerate_site_and_incompatible_known():
    arrays = site_arrays(40, [4, 5, 6], dtype=np.float64)
    known = cka_matrix(arrays, precision="float64")
    with pytest.warns(DegenerateSiteWarning, match="m/const/o"):
        out = cka_matrix(dict(arrays, **{"m/const/o": np.ones((40, 2))}), known=known, precision="float64")
    assert np.isnan(out.sel(site_a="m/const/o")).all() and "constant" in out.attrs["nan_reasons"]["m/const/o"]
    np.testing.assert_array_equal(out.values[:3, :3], known.values)
    with pytest.raises(ValueError, match="known.*kernel='linear'.*'rbf'"):
        cka_matrix(arrays, kernel="rbf", known=known)
    with pytest.raises(ValueError, match="n_samples=40.*39"):
        cka_matrix({k: v[:39] for k, v in arrays.items()}, known=known)


def test_minibatch_reuses_cka_and_stderr():
    arrays = site_arrays(83, [3, 6, 4, 5], seed=4, dtype=np.float64)
    kwargs = dict(batch_size=20, seed=2, precision="float64")
    known = minibatch_cka_matrix({k: arrays[k] for k in OLD}, **kwargs)
    scratch = minibatch_cka_matrix(arrays, **kwargs)
    for previous in ({"known": known}, {"known": multiindexed(known.cka.assign_attrs(known.attrs)),
                                        "known_stderr": multiindexed(known.stderr)}):
        out = minibatch_cka_matrix(arrays, **kwargs, **previous)
        np.testing.assert_allclose(out.cka.values, scratch.cka.values, atol=1e-9)
        np.testing.assert_allclose(out.stderr.values, scratch.stderr.values, atol=1e-9)
        np.testing.assert_array_equal(out.stderr.sel(site_a=OLD, site_b=OLD).values, known.stderr.values)
        assert out.attrs["reused_entries"] == 9 and out.attrs["computed_entries"] == 7
    full = minibatch_cka_matrix(arrays, batch_size=1000, precision="float64",
                                known=minibatch_cka_matrix({k: arrays[k] for k in OLD}, batch_size=1000))
    assert full.cka.values[3, 0] == pytest.approx(cka(arrays[OLD[0]], list(arrays.values())[3], unbiased=True),
                                                  abs=1e-9)
    with pytest.raises(ValueError, match="known_stderr"):
        minibatch_cka_matrix(arrays, **kwargs, known=known.cka)
    with pytest.raises(ValueError, match="seed=2.*3"):
        minibatch_cka_matrix(arrays, batch_size=20, seed=3, known=known)


def write_model(root, model: str, seed: int, n: int = 48) -> dict[str, np.ndarray]:
    """Two sites of one model written through the store's ActivationWriter; returns them by site id."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 3))
    sites = {f"blocks.{i}/attn": (latent @ rng.normal(size=(3, d)) + rng.normal(size=(n, d))).astype(np.float32)
             for i, d in enumerate((5, 8))}
    write_features(root, model, sites, shard_size=16)
    return {f"{model}/{s}": x for s, x in sites.items()}


@pytest.mark.parametrize("entry", [{"kernel": "rbf", "estimator": "unbiased"},
                                   {"estimator": "unbiased", "method": "minibatch", "batch_size": 12}])
def test_stage_adds_a_model_and_reuses_unchanged_ones(tmp_path, entry):
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, xr.Dataset({"image_index": ("sample", np.arange(48))}, attrs={"fingerprint": "s"}))
    options = CkaOptions(**entry, precision="float64", device="cpu")
    arrays = {**write_model(root, "m1", 1), **write_model(root, "m2", 2)}
    fingerprints = {"m1": "fp1", "m2": "fp2"}
    first = update_similarity(root, "cka", fingerprints, options)["cka"]
    assert first.attrs["reused_entries"] == 0
    arrays.update(write_model(root, "m3", 3))
    fingerprints["m3"] = "fp3"
    update_similarity(root, "cka", fingerprints, options)
    stored = storage.open_similarity(root, "cka")
    assert stored.attrs["reused_entries"] == 16 and stored.attrs["computed_entries"] == 20
    assert stored.attrs["model_fingerprints"] == fingerprints
    assert storage.site_ids(stored, "site_a")[:4] == list(first.site_a.values)
    np.testing.assert_array_equal(stored.values[:4, :4], first.values)
    if entry.get("method") == "minibatch":
        scratch = minibatch_cka_matrix(arrays, batch_size=12, precision="float64")
        np.testing.assert_allclose(stored.values, scratch.cka.values, atol=1e-9)
        np.testing.assert_allclose(storage.open_similarity(root, "cka_stderr").values,
                                   scratch.stderr.values, atol=1e-9)
    else:
        np.testing.assert_allclose(stored.values, reference(arrays, kernel="rbf", unbiased=True), atol=1e-9)
    # a new checkpoint of m1 (new fingerprint): only m2 and m3 entries are kept; without reuse, none
    fingerprints["m1"] = "fp1-new"
    again = update_similarity(root, "cka", fingerprints, options)["cka"]
    assert again.attrs["reused_entries"] == 16
    np.testing.assert_allclose(again.values, stored.values, atol=1e-9)
    fresh = update_similarity(root, "cka", fingerprints, options, reuse=False)["cka"]
    assert fresh.attrs["reused_entries"] == 0
    # same name, other settings: the stored entries are not reused (and the stage does not fail)
    other = dataclasses.replace(options, rbf_threshold=0.7, batch_size=16)
    changed = update_similarity(root, "cka", fingerprints, other)["cka"]
    assert changed.attrs["reused_entries"] == 0 and "known" in changed.attrs["known_rejected"]
