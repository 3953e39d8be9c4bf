"""The CKA engine on a distributed.LocalCluster: block pairs as tasks, tree-reduced, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from distributed import Client, LocalCluster

from tasks.cka import cka, cka_matrix, minibatch_cka_matrix


def zarr_sites(path, n: int, dims: list[int]) -> tuple[dict, dict]:
    """The same random sites as numpy arrays and as Zarr arrays under `path`."""
    rng = np.random.default_rng(7)
    latent = rng.normal(size=(n, 4))
    root = zarr.open_group(str(path), mode="w")
    arrays, stored = {}, {}
    for i, d in enumerate(dims):
        x = (latent @ rng.normal(size=(4, d)) + rng.normal(size=(n, d))).astype(np.float32)
        key = f"m/blocks.{i}/mlp"
        arrays[key] = x
        stored[key] = root.create_array(f"site{i}", shape=x.shape, chunks=(32, d), dtype="float32")
        stored[key][...] = x
    return arrays, stored


def reference(arrays: dict, **kwargs) -> np.ndarray:
    values = list(arrays.values())
    return np.array([[cka(a, b, **kwargs) for b in values] for a in values])


@pytest.mark.parametrize("processes", [False, True])
def test_local_cluster_matches_reference(tmp_path, processes):
    arrays, stored = zarr_sites(tmp_path / "acts", 90, [5, 9, 4])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=processes, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        partials = zarr.open_group(str(tmp_path / "partials"), mode="w")
        seen = []
        out = cka_matrix(stored, kernel="rbf", unbiased=True, method="blocked", block_size=20,
                         precision="float64", client=client, partials=partials, progress=lambda done, total: seen.append(done / total))
        np.testing.assert_allclose(out.values, reference(arrays, kernel="rbf", unbiased=True), atol=1e-9)
        assert out.attrs["n_tasks"] == 15 and sum(seen) == pytest.approx(1.0)
        seen.clear()     # minibatches of Zarr inputs under a tiny budget: staged shuffled copy on the workers
        copied = minibatch_cka_matrix(stored, batch_size=30, seed=2, client=client, precision="float64",
                                      memory_budget="8KiB", scratch=partials, progress=lambda done, total: seen.append(done / total))
        local = minibatch_cka_matrix(arrays, batch_size=30, seed=2, precision="float64")
        assert copied.attrs["shuffled_copy"] and sum(seen) == pytest.approx(1.0)
        np.testing.assert_allclose(copied.cka.values, local.cka.values, atol=1e-12)
        assert list(partials.members()) == []
        if not processes:
            features = cka_matrix(arrays, method="features", block_size=25, precision="float64", client=client)
            np.testing.assert_allclose(features.values, reference(arrays), atol=1e-9)
            mb = minibatch_cka_matrix(stored, batch_size=30, client=client, precision="float64")
            local = minibatch_cka_matrix(arrays, batch_size=30, precision="float64")
            np.testing.assert_allclose(mb.cka.values, local.cka.values, atol=1e-12)
            np.testing.assert_allclose(mb.stderr.values, local.stderr.values, atol=1e-12)
