"""The CKA engine (`tasks.cka.exact`) against the float64 reference, on every path and input kind."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import given, settings, strategies as st

import tasks.cka.exact as similarity
import tasks.cka._features as cka_features
import tasks.cka._grams as gram_blocks
import tasks.cka._shuffle as cka_shuffle
from tasks.cka import DegenerateSiteWarning, cka, cka_matrix, minibatch_cka_matrix
from tasks.cka._shuffle import gather_range, sort_region

TOL = {"float64": 1e-9, "float32": 1e-5}


def site_arrays(n: int, dims: list[int], seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Correlated sites with offsets (so centring matters), named like site ids."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    return {f"m{i % 2}/blocks.{i}/attn": (latent @ rng.normal(size=(6, d)) + 0.7 * rng.normal(size=(n, d))
                                          + rng.normal(size=d) * 3).astype(dtype)
            for i, d in enumerate(dims)}


def reference(arrays: dict, **kwargs) -> np.ndarray:
    values = list(arrays.values())
    return np.array([[cka(a, b, **kwargs) for b in values] for a in values])


CASES = [("linear", False, "blocked"), ("linear", True, "blocked"), ("linear", False, "features"),
         ("linear", True, "features"), ("rbf", False, "blocked"), ("rbf", True, "blocked")]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize(("kernel", "unbiased", "method"), CASES)
@pytest.mark.parametrize(("n", "dims", "block"), [(50, [3, 9, 16], 16), (97, [5, 12, 7, 30], 32)])
def test_paths_match_reference(kernel, unbiased, method, precision, n, dims, block):
    arrays = site_arrays(n, dims, seed=n)
    ref = reference(arrays, kernel=kernel, unbiased=unbiased)
    out = cka_matrix(arrays, kernel=kernel, unbiased=unbiased, method=method, precision=precision,
                     block_size=block, device="cpu")
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=TOL[precision])
    assert out.dims == ("site_a", "site_b")
    assert list(out.site_a.values) == list(arrays) == list(out.site_b.values)
    assert out.attrs["kernel"] == kernel and out.attrs["method"] == method
    assert out.attrs["estimator"] == ("unbiased" if unbiased else "biased")
    assert out.attrs["n_samples"] == n and out.attrs["block_size"] == block
    assert out.attrs["nan_reasons"] == {} and out.attrs["seconds"] > 0
    if kernel == "rbf":
        assert out.attrs["rbf_median_samples"] == n
        assert set(out.attrs["rbf_median"]) == set(arrays)


@pytest.mark.parametrize(("kernel", "unbiased", "method"), CASES)
@pytest.mark.parametrize(("tile", "chunk"), [(5, 40), (7, 64), (32, 1000)])
def test_symmetric_tiles_of_diagonal_blocks(monkeypatch, kernel, unbiased, method, tile, chunk):
    """Diagonal blocks (and diagonal feature-group pairs) built from upper-triangle tiles, products
    chunked across tile edges: still exact."""
    monkeypatch.setattr(gram_blocks, "GRAM_TILE", tile)
    monkeypatch.setattr(cka_features, "GRAM_TILE", tile)
    monkeypatch.setattr(gram_blocks, "PRODUCT_CHUNK", chunk)
    arrays = site_arrays(97, [5, 12, 7, 30], seed=4)
    ref = reference(arrays, kernel=kernel, unbiased=unbiased)
    out = cka_matrix(arrays, kernel=kernel, unbiased=unbiased, method=method, precision="float64",
                     block_size=32, device="cpu")
    np.testing.assert_allclose(out.values, ref, rtol=0, atol=1e-9)


def test_default_block_size_from_budget_and_auto_method():
    arrays = site_arrays(300, [4, 6, 5])
    small = cka_matrix(arrays, memory_budget="1MiB", method="blocked", precision="float64")
    big = cka_matrix(arrays, memory_budget="1GiB", method="blocked", precision="float64")
    assert small.attrs["block_size"] < 300 == big.attrs["block_size"]
    np.testing.assert_allclose(small.values, big.values, atol=1e-12)
    # N >> sum(d): the feature-space path is cheaper; N << sum(d): the sample-space path
    assert cka_matrix(arrays).attrs["method"] == "features"
    assert cka_matrix(site_arrays(20, [50, 60])).attrs["method"] == "blocked"
    assert cka_matrix(arrays, kernel="rbf").attrs["method"] == "blocked"


def test_rbf_median_on_seeded_subsample_for_large_n():
    arrays = site_arrays(120, [4, 6])
    out = cka_matrix(arrays, kernel="rbf", precision="float64", rbf_median_samples=40)
    assert out.attrs["rbf_median_samples"] == 40 and not out.attrs["rbf_median_exact"]
    again = cka_matrix(arrays, kernel="rbf", precision="float64", rbf_median_samples=40, memory_budget="64KiB")
    assert out.attrs["rbf_median"] == again.attrs["rbf_median"]
    np.testing.assert_allclose(out.values, reference(arrays, kernel="rbf"), atol=0.05)


@pytest.mark.parametrize("kind", ["dask", "zarr", "xarray"])
def test_lazy_inputs(kind, tmp_path):
    arrays = site_arrays(61, [5, 8, 3])
    if kind == "dask":
        inputs = {k: da.from_array(v, chunks=(16, -1)) for k, v in arrays.items()}
    elif kind == "zarr":
        root = zarr.open_group(str(tmp_path / "acts"), mode="w")
        inputs = {}
        for i, (k, v) in enumerate(arrays.items()):
            inputs[k] = root.create_array(f"s{i}", shape=v.shape, chunks=(16, v.shape[1]), dtype=v.dtype)
            inputs[k][...] = v
    else:
        inputs = {k: xr.DataArray(da.from_array(v, chunks=(20, -1)), dims=("sample", "feature"))
                  for k, v in arrays.items()}
    out = cka_matrix(inputs, method="blocked", block_size=20, precision="float64")
    np.testing.assert_allclose(out.values, reference(arrays), atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31), st.integers(8, 40), st.integers(3, 12), st.sampled_from(["linear", "rbf"]),
       st.booleans(), st.sampled_from(["blocked", "features"]))
def test_engine_properties(seed, n, block, kernel, unbiased, method):
    if kernel == "rbf":
        method = "blocked"
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 3)) + rng.normal(size=(n, 1))
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    arrays = {"a/x/o": x, "a/y/o": y, "a/xr/o": x @ rotation * 2.5 + 1.0}
    kwargs = dict(kernel=kernel, unbiased=unbiased, method=method, block_size=block, precision="float64")
    out = cka_matrix(arrays, **kwargs).values
    np.testing.assert_allclose(out, out.T, atol=1e-12)                    # symmetry
    np.testing.assert_allclose(np.diag(out), 1.0, atol=1e-9)              # CKA(X, X) = 1
    np.testing.assert_allclose(out[0], out[2], atol=1e-9)                 # rotation + isotropic scale + shift
    np.testing.assert_allclose(out, reference(arrays, kernel=kernel, unbiased=unbiased), atol=1e-9)


def test_degenerate_sites_are_nan_with_reasons():
    arrays = site_arrays(40, [4, 5, 6], dtype=np.float64)
    arrays["m/const/o"] = np.full((40, 3), 0.1)
    bad = arrays["m0/blocks.0/attn"].copy()
    bad[3, 1] = np.nan
    arrays["m/nan/o"] = bad
    good = ["m0/blocks.0/attn", "m1/blocks.1/attn", "m0/blocks.2/attn"]
    for kernel, method in (("linear", "blocked"), ("linear", "features"), ("rbf", "blocked")):
        with pytest.warns(DegenerateSiteWarning, match="m/const/o"):
            out = cka_matrix(arrays, kernel=kernel, method=method, precision="float64")
        reasons = out.attrs["nan_reasons"]
        assert "constant" in reasons["m/const/o"] and "non-finite" in reasons["m/nan/o"]
        assert set(reasons) == {"m/const/o", "m/nan/o"}
        assert np.isnan(out.sel(site_a="m/const/o")).all() and np.isnan(out.sel(site_b="m/nan/o")).all()
        sub = out.sel(site_a=good, site_b=good).values
        np.testing.assert_allclose(sub, reference({k: arrays[k] for k in good}, kernel=kernel), atol=1e-9)


def test_too_few_samples_for_unbiased():
    arrays = site_arrays(3, [2, 2], dtype=np.float64)
    with pytest.warns(DegenerateSiteWarning, match="at least 4"):
        out = cka_matrix(arrays, unbiased=True)
    assert np.isnan(out.values).all()
    assert cka_matrix(arrays).values[0, 0] == pytest.approx(1.0)


def test_input_errors_name_the_problem():
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="'b'.*9 samples"):
        cka_matrix({"a": x, "b": x[:9]})
    with pytest.raises(ValueError, match="'a'.*shape"):
        cka_matrix({"a": np.zeros(10)})
    with pytest.raises(ValueError, match="kernel"):
        cka_matrix({"a": x}, kernel="poly")
    with pytest.raises(ValueError, match="features.*linear"):
        cka_matrix({"a": x}, kernel="rbf", method="features")
    with pytest.raises(ValueError, match="precision"):
        cka_matrix({"a": x}, precision="float16")
    with pytest.raises(ValueError, match="memory_budget"):
        cka_matrix({"a": x}, memory_budget="lots")
    with pytest.raises(ValueError, match="site 'w'.*features"):
        cka_matrix({"w": np.zeros((10, 5000))}, method="features", memory_budget="1MiB")


def crash_after(monkeypatch, count: int) -> list:
    """Make block-pair tasks fail ("killed") once `count` have run since the returned list was last cleared."""
    calls, original = [], similarity.block_pair_sums

    def crashing(spec, a, b):
        if len(calls) == count:
            raise RuntimeError("killed")
        calls.append((a, b))
        return original(spec, a, b)

    monkeypatch.setattr(similarity, "block_pair_sums", crashing)
    return calls


def test_resume_skips_finished_block_pairs(monkeypatch):
    arrays = site_arrays(70, [4, 7, 5])
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    calls = crash_after(monkeypatch, 4)
    kwargs = dict(method="blocked", block_size=16, precision="float64", partials=group)
    with pytest.raises(RuntimeError, match="killed"):
        cka_matrix(arrays, **kwargs)
    assert len(list(group.arrays())) == 4
    monkeypatch.undo()
    calls = crash_after(monkeypatch, -1)           # counts, never crashes
    out = cka_matrix(arrays, **kwargs)
    assert out.attrs["resumed_tasks"] == 4 and len(calls) == out.attrs["n_tasks"] - 4 == 15 - 4
    np.testing.assert_allclose(out.values, reference(arrays), atol=1e-9)
    assert list(group.arrays()) == []           # cleared once the matrix is complete


def test_partials_of_other_data_are_discarded():
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    kwargs = dict(method="blocked", block_size=16, precision="float64", partials=group)
    first = site_arrays(40, [3, 4], seed=1)
    similarity.Partials(group, {"stale": True}).save("blocks_0_0", similarity.Sums(np.ones((2, 2))))
    out = cka_matrix(first, **kwargs)
    assert out.attrs["resumed_tasks"] == 0
    np.testing.assert_allclose(out.values, reference(first), atol=1e-9)


def test_progress_counts_every_task_once():
    seen = []
    out = cka_matrix(site_arrays(50, [3, 4]), method="blocked", block_size=16,
                     progress=lambda done, total: seen.append((done, total)))
    totals = {total for _, total in seen}
    assert len(seen) > 4 and len(totals) == 1 and sum(done for done, _ in seen) == totals.pop()
    assert out.attrs["n_tasks"] <= seen[0][1]


def test_minibatch_full_batch_equals_unbiased_reference():
    arrays = site_arrays(45, [3, 6, 4])
    for precision in ("float64", "float32"):
        ds = minibatch_cka_matrix(arrays, batch_size=1000, precision=precision)
        np.testing.assert_allclose(ds.cka.values, reference(arrays, unbiased=True), atol=TOL[precision])
        assert ds.attrs["n_batches"] == 1 and np.isnan(ds.stderr.values).all()


def test_minibatch_average_and_stderr():
    arrays = site_arrays(203, [3, 6, 4], seed=5)
    ds = minibatch_cka_matrix(arrays, batch_size=50, seed=1, precision="float64", memory_budget="1MiB")
    assert ds.attrs["n_batches"] == 4 and ds.attrs["samples_used"] == 200
    assert ds.cka.dims == ds.stderr.dims == ("site_a", "site_b")
    # explicit oracle: mean unbiased HSIC over the same seeded minibatches
    order = np.random.default_rng(1).permutation(203)[:200].reshape(4, 50)
    values = list(arrays.values())

    def hsic_mean(a, b):
        from tasks.cka import gram, hsic
        return np.mean([hsic(gram(a[i]), gram(b[i]), unbiased=True) for i in order])

    expected = np.array([[hsic_mean(a, b) / np.sqrt(hsic_mean(a, a) * hsic_mean(b, b)) for b in values]
                         for a in values])
    np.testing.assert_allclose(ds.cka.values, expected, atol=1e-9)
    off = ~np.eye(3, dtype=bool)
    assert (ds.stderr.values[off] > 0).all() and (ds.stderr.values[off] < 0.5).all()
    same = minibatch_cka_matrix(arrays, batch_size=50, seed=1, precision="float64")
    np.testing.assert_array_equal(same.cka.values, ds.cka.values)


@pytest.mark.parametrize(("kind", "budget", "staged"), [("zarr", "200KiB", True), ("dask", "200KiB", True),
                                                   ("zarr-scratch", "200KiB", True), ("zarr", "400KiB", False),
                                                   ("zarr-scratch", "400KiB", False)])
def test_minibatch_chunked_inputs_read_a_shuffled_copy(tmp_path, monkeypatch, kind, budget, staged):
    """Chunked inputs needing several task groups are copied in minibatch order first: staged in
    several regions and gathered (tiny budget), or directly (each site fits a task). Same values as
    in memory, and the scratch copy is removed."""
    monkeypatch.setattr(cka_shuffle, "CHUNK_TARGET_BYTES", 2000)
    monkeypatch.setattr(cka_shuffle, "INNER_TARGET_BYTES", 500)
    sorts, gathers = [], []
    monkeypatch.setattr(cka_shuffle, "sort_region", lambda job, *item: sorts.append(item) or sort_region(job, *item))
    monkeypatch.setattr(cka_shuffle, "gather_range",
                        lambda job, *item: gathers.append(item) or gather_range(job, *item))
    arrays = site_arrays(411, [3, 30, 7, 12], seed=8, dtype=np.float64)
    root = zarr.open_group(str(tmp_path / "acts"), mode="w")
    chunked = {}
    for key, value in arrays.items():
        stored = root.create_array(key.replace("/", "_"), shape=value.shape, chunks=(64, value.shape[1]),
                                   dtype=value.dtype)
        stored[...] = value
        chunked[key] = da.from_zarr(stored) if kind == "dask" else stored
    scratch = zarr.open_group(str(tmp_path / "scratch"), mode="w") if kind == "zarr-scratch" else None
    options = dict(batch_size=20, seed=3, precision="float64", memory_budget=budget)
    expected = minibatch_cka_matrix(arrays, **options)
    out = minibatch_cka_matrix(chunked, scratch=scratch, **options)
    assert out.attrs["shuffled_copy"] and not expected.attrs["shuffled_copy"]
    assert out.attrs["n_batches"] == 21 and out.attrs["samples_used"] == 411  # 20 x 20 + a short batch of 11
    assert len(sorts) == 4 * len({region for _, region in sorts}) and (len(sorts) > 4) == staged
    if staged:
        assert {site for site, _, _ in gathers} == {0, 1, 2, 3} and len(gathers) > 4
        assert sorted((a, b) for site, a, b in gathers if site == 1)[-1][1] == 411  # every used row gathered
    else:
        assert gathers == []
    np.testing.assert_allclose(out.cka.values, expected.cka.values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.stderr.values, expected.stderr.values, rtol=0, atol=1e-12)
    if scratch is not None:
        assert list(scratch.members()) == []


def test_float32_accuracy_with_large_blocks_and_inputs_untouched():
    arrays = site_arrays(1200, [40, 90, 60], seed=9)
    copies = {k: v.copy() for k, v in arrays.items()}
    ref = cka_matrix(arrays, method="features", precision="float64").values
    for kernel in ("linear", "rbf"):
        exact = ref if kernel == "linear" else cka_matrix(arrays, kernel=kernel, precision="float64").values
        out = cka_matrix(arrays, kernel=kernel, method="blocked", precision="float32", block_size=1200)
        np.testing.assert_allclose(out.values, exact, atol=1e-5)
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, copies[key])
