"""Kornblith et al.'s demo values on every path that supports the kernel, and regressions for bugs that
shipped in other CKA implementations, tested through the public entry points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

import storage
from tasks.cka import CkaOptions, cka, cka_matrix, gram, hsic, minibatch_cka_matrix, update_similarity
from tasks.extract import SiteError, build_model, reduce, resolve_sites
from tests.cka.test_engine import reference
from tests.stores import write_features

# Kornblith et al., representation_similarity/Demo.ipynb: np.random.seed(1337); X = randn(100, 10); Y = randn + X
GOLDEN = {("linear", False, 0.5): 0.5576132566117589, ("linear", True, 0.5): 0.5134564895055259,
          ("rbf", False, 0.5): 0.6548311822614982, ("rbf", True, 0.5): 0.41927675102205175,
          ("rbf", False, 1.0): 0.5758322230135366, ("rbf", True, 1.0): 0.5016102703531156}


def demo() -> dict[str, np.ndarray]:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return {"x": x, "y": y}


@pytest.mark.parametrize(("kernel", "unbiased", "threshold"), list(GOLDEN))
def test_golden_values_on_every_path(kernel, unbiased, threshold):
    data, expected = demo(), GOLDEN[kernel, unbiased, threshold]
    assert cka(data["x"], data["y"], kernel=kernel, unbiased=unbiased, rbf_threshold=threshold) == pytest.approx(
        expected, abs=1e-12)
    for method in ("blocked", "features") if kernel == "linear" else ("blocked",):
        for block in (None, 16):
            out = cka_matrix(data, kernel=kernel, unbiased=unbiased, rbf_threshold=threshold, method=method,
                             precision="float64", block_size=block)
            assert out.sel(site_a="x", site_b="y").item() == pytest.approx(expected, abs=1e-12)
    if kernel == "linear" and unbiased:          # one minibatch of all samples: exact unbiased CKA
        out = minibatch_cka_matrix(data, batch_size=100, precision="float64")
        assert out.cka.sel(site_a="x", site_b="y").item() == pytest.approx(expected, abs=1e-12)


def test_a_second_model_is_scored_on_its_own_activations(tmp_path):
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, xr.Dataset({"image_index": ("sample", np.arange(40))}, attrs={"fingerprint": "s"}))
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(40, 3))
    models = {"m1": {"l.0/out": latent @ rng.normal(size=(3, 6)) + rng.normal(size=(40, 6)),
                     "l.1/out": rng.normal(size=(40, 5))},
              "m2": {"l.0/out": rng.normal(size=(40, 6)), "l.1/out": latent @ rng.normal(size=(3, 5))}}
    for model, sites in models.items():
        write_features(root, model, {s: x.astype(np.float32) for s, x in sites.items()}, shard_size=16)
    out = update_similarity(root, "cka", {"m1": "fp1", "m2": "fp2"}, CkaOptions(precision="float64", device="cpu"))["cka"]
    arrays = {f"{m}/{s}": x.astype(np.float32) for m, sites in models.items() for s, x in sites.items()}
    np.testing.assert_allclose(out.values, reference(arrays), atol=1e-9)
    assert abs(out.values[0, 2] - out.values[0, 0]) > 0.1        # m1 vs m2 is not m1 vs itself


def minibatch_cka(data: dict[str, np.ndarray], batches: list[np.ndarray] | np.ndarray) -> float:
    """CKA of the mean unbiased HSIC over the given batches, weighted by their sizes (float64 reference)."""
    x, y = data["x"], data["y"]
    sums = np.zeros(3)
    for rows in batches:
        k, l = gram(x[rows]), gram(y[rows])
        sums += len(rows) * np.array([hsic(k, l, unbiased=True), hsic(k, k, unbiased=True), hsic(l, l, unbiased=True)])
    return sums[0] / np.sqrt(sums[1] * sums[2])


def test_minibatch_accumulates_every_batch_including_a_short_last_one():
    data = demo()
    data = {k: v[:95] for k, v in data.items()}       # 95 = 4 x 20 + 15: the short last batch counts
    out = minibatch_cka_matrix(data, batch_size=20, seed=4, precision="float64")
    order = np.random.default_rng(4).permutation(95)
    batches = [order[i:i + 20] for i in range(0, 95, 20)]
    value = out.cka.sel(site_a="x", site_b="y").item()
    assert out.attrs["n_batches"] == 5 and out.attrs["samples_used"] == 95
    assert value == pytest.approx(minibatch_cka(data, batches), abs=1e-12)
    assert abs(value - minibatch_cka(data, batches[-1:])) > 1e-3      # not only the last batch
    assert abs(value - minibatch_cka(data, batches[:-1])) > 1e-6      # nor without the short one
    # a remainder below 4 samples cannot give an unbiased HSIC: left out, and said so
    short = minibatch_cka_matrix({k: v[:83] for k, v in data.items()}, batch_size=20, seed=4, precision="float64")
    assert short.attrs["n_batches"] == 4 and short.attrs["samples_used"] == 80


def test_a_site_matching_no_module_is_an_error():
    model = build_model("resnet18", {"layers": (1, 1, 1, 1), "num_classes": 0}, "random:0")
    with pytest.raises(SiteError, match="no_such_block"):
        resolve_sites(model, ["layer1", "no_such_block"], size=(3, 32, 32))


def test_negative_unbiased_values_are_kept():
    rng = np.random.default_rng(11)
    found = 0
    for _ in range(10):
        data = {"x": rng.normal(size=(12, 3)), "y": rng.normal(size=(12, 2))}
        truth = cka(data["x"], data["y"], unbiased=True)
        for method in ("blocked", "features"):
            value = cka_matrix(data, unbiased=True, method=method, precision="float64").sel(site_a="x", site_b="y")
            assert value.item() == pytest.approx(truth, abs=1e-12)
        value = minibatch_cka_matrix(data, batch_size=12, precision="float64").cka.sel(site_a="x", site_b="y")
        assert value.item() == pytest.approx(truth, abs=1e-12)
        found += truth < 0
    assert found >= 2


def test_tokens_reduction_rows_are_images():
    rng = np.random.default_rng(2)
    images, tokens, channels = 12, 5, 4
    a = torch.as_tensor(rng.normal(size=(images, tokens, channels)), dtype=torch.float32)
    b = a * 2 + 0.5 * torch.as_tensor(rng.normal(size=(images, tokens, channels)), dtype=torch.float32)
    xa, xb = reduce(a, "tokens").numpy(), reduce(b, "tokens").numpy()
    assert xa.shape == (images, tokens * channels)
    np.testing.assert_array_equal(xa[3], a[3].reshape(-1).numpy())     # one row per image, all its tokens
    out = cka_matrix({"a": xa, "b": xb}, precision="float64")
    across = cka(a.reshape(images, -1).numpy(), b.reshape(images, -1).numpy())
    within = cka(a[0].numpy(), b[0].numpy())                           # tokens of one image as samples
    assert out.sel(site_a="a", site_b="b").item() == pytest.approx(across, abs=1e-9)
    assert abs(across - within) > 1e-3


def test_minibatch_takes_explicit_batches_and_equals_the_oracle_on_them(tmp_path):
    """Another tool's minibatches (uneven, in its own order), in memory and from a chunked store that needs the
    shuffled copy: the mean unbiased HSIC over exactly those batches; the batches are recorded by a digest."""
    import zarr

    rng = np.random.default_rng(3)
    arrays = {f"m/s{i}": rng.normal(size=(90, d)) for i, d in enumerate([3, 7, 5])}
    batches = [list(b) for b in np.split(rng.permutation(90), [32, 64])]  # 32, 32 and 26 rows
    values = list(arrays.values())

    def hsic_mean(a, b):
        return sum(len(i) * hsic(gram(a[i]), gram(b[i]), unbiased=True) for i in batches) / 90

    expected = np.array([[hsic_mean(a, b) / np.sqrt(hsic_mean(a, a) * hsic_mean(b, b)) for b in values]
                         for a in values])
    ds = minibatch_cka_matrix(arrays, batches=batches, precision="float64")
    np.testing.assert_allclose(ds.cka.values, expected, atol=1e-10)
    assert ds.attrs["n_batches"] == 3 and ds.attrs["samples_used"] == 90 and ds.attrs["batches"].startswith("given:")
    group = zarr.open_group(str(tmp_path / "z"), mode="w")
    stored = {k: group.create_array(k.replace("/", "_"), data=v, chunks=(10, v.shape[1])) for k, v in arrays.items()}
    chunked = minibatch_cka_matrix(dict(zip(arrays, stored.values())), batches=batches, precision="float64",
                                   memory_budget="64KiB", scratch=group.require_group("scratch"))
    assert chunked.attrs["shuffled_copy"]
    np.testing.assert_allclose(chunked.cka.values, expected, atol=1e-10)
    np.testing.assert_allclose(chunked.stderr.values, ds.stderr.values, atol=1e-10)
    with pytest.raises(ValueError, match=r"batches\[1\]: a minibatch needs .* at least 4"):
        minibatch_cka_matrix(arrays, batches=[list(range(10)), [1, 2, 3]])
    with pytest.raises(ValueError, match=r"batches\[0\]: row numbers must lie in \[0, 90\)"):
        minibatch_cka_matrix(arrays, batches=[[0, 1, 2, 90]])
