"""Linear probes: the split by image, the principal basis, the three solvers of one objective against
scikit-learn, batching and Dask independence, separable data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from sklearn.linear_model import LogisticRegression

from tasks.analyses.probes import probe_sites
from tasks.analyses.probes.fanout import site_groups
from tasks.analyses.probes.protocol import principal_basis, split_by_image, standardise, validation_mask
from tasks.analyses.probes.solvers import (
    C_GRID,
    GRAD_TOL,
    RIDGE_GRID,
    choose_solver,
    fit_logistic,
    probe_group,
    probe_in_memory,
    probe_ridge,
    probe_streaming,
)


def separable(n_per_class: int = 20, n_classes: int = 3, d: int = 5, seed: int = 0, views: int = 1):
    """Gaussian blobs far apart (centres 10 apart, noise 0.5): linearly separable. Views of one
    image are noisy copies of it."""
    rng = np.random.default_rng(seed)
    centres = 10 * rng.standard_normal((n_classes, d))
    labels = np.repeat(np.arange(n_classes), n_per_class)
    base = centres[labels] + 0.5 * rng.standard_normal((labels.size, d))
    x = np.concatenate([base + 0.1 * rng.standard_normal(base.shape) for _ in range(views)])
    return x, np.tile(labels, views), np.tile(np.arange(labels.size), views)


def test_split_keeps_views_of_an_image_together_and_is_stratified():
    _, labels, image = separable(n_per_class=10, views=3)
    mask = split_by_image(image, labels, 0.3, seed=1)
    for im in np.unique(image):
        assert np.unique(mask[image == im]).size == 1
    for label in range(3):
        assert mask[(labels == label)].sum() == 3 * 3  # 3 of 10 images, 3 views each
    assert np.array_equal(mask, split_by_image(image, labels, 0.3, seed=1))
    assert not np.array_equal(mask, split_by_image(image, labels, 0.3, seed=2))


def test_split_errors():
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_image(np.arange(4), np.zeros(4), 1.0, seed=0)
    with pytest.raises(ValueError, match="different labels"):
        split_by_image(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 0]), 0.5, seed=0)
    with pytest.raises(ValueError, match="sample more images"):
        split_by_image(np.array([0, 1]), np.array([0, 1]), 0.5, seed=0)


def test_separable_data_reaches_100_percent():
    x, labels, image = separable(views=2)
    mask = split_by_image(image, labels, 0.3, seed=0)
    result = probe_in_memory(x, labels, mask, image_index=image, device="cpu")
    assert result.test_accuracy == 1.0 and result.train_accuracy == 1.0
    assert np.array_equal(result.predictions, labels[mask])
    assert result.backend == "lbfgs" and result.converged and result.C in C_GRID
    assert set(result.validation_accuracy) == set(C_GRID)


def test_streaming_probe_over_a_zarr_array_reaches_100_percent():
    x, labels, image = separable(n_per_class=30)
    labels = labels + 5  # class ids need not start at 0
    array = zarr.create_array(store=zarr.storage.MemoryStore(), shape=x.shape, chunks=(16, x.shape[1]), dtype="f4")
    array[:] = x
    mask = split_by_image(image, labels, 0.3, seed=0)
    result = probe_streaming(array, labels, mask, seed=0, device="cpu")
    assert result.test_accuracy == 1.0 and result.backend == "sgd"
    assert np.array_equal(result.predictions, labels[mask])
    again = probe_streaming(array, labels, mask, seed=0, device="cpu")
    assert np.array_equal(again.predictions, result.predictions)
    ridge = probe_ridge(array, labels, mask, validation_mask(image, labels, mask, 0))
    assert ridge.test_accuracy == 1.0 and ridge.backend == "ridge" and ridge.C in RIDGE_GRID


def overlapping(n: int = 600, d: int = 12, seed: int = 3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    return rng.standard_normal((n, d)) + 2.4 * np.eye(4, d)[labels], labels


def test_lbfgs_solves_the_objective_of_the_float64_reference():
    """Overlapping classes: the float32 batched L-BFGS at the chosen C and scikit-learn's float64 lbfgs at the
    same C (its objective: n_train x ours) predict the same class on >= 99% of the test rows."""
    x, labels = overlapping()
    mask = split_by_image(np.arange(labels.size), labels, 0.3, seed=0)
    ours = probe_in_memory(x, labels, mask, device="cpu")
    train = ~mask
    mean, std = x[train].mean(0), x[train].std(0)
    reference = LogisticRegression(C=ours.C, max_iter=10000, tol=1e-10).fit((x[train] - mean) / std, labels[train])
    assert 0.4 < ours.test_accuracy < 1.0 and ours.converged
    assert np.mean(reference.predict((x[mask] - mean) / std) == ours.predictions) >= 0.99


def test_the_batched_fit_reaches_the_reference_minimum():
    """`fit_logistic` on two sites at once (from zeros, or warm-started from a weaker penalty's solution)
    stops at scikit-learn's float64 minimiser of the same objective, to the stopping rule's accuracy:
    weights (a row per class) and class probabilities."""
    x, labels = overlapping(d=12)
    z = (x - x.mean(0)) / x.std(0)
    sites = np.stack([z, z[:, ::-1]])
    features, y, c = torch.as_tensor(sites, dtype=torch.float32), torch.as_tensor(labels), np.array([1.0, 0.1])
    weaker = fit_logistic(features, y, 10 * c, 4)
    for init in (None, (weaker.weight, weaker.bias)):
        fit = fit_logistic(features, y, c, 4, init=init)
        assert fit.weight.shape == (2, 4, 12) and (fit.gradient <= GRAD_TOL).all()
        for g in range(2):
            reference = LogisticRegression(C=c[g], max_iter=10000, tol=1e-12).fit(sites[g], labels)
            weight, bias = fit.weight[g].double().numpy(), fit.bias[g].double().numpy()
            assert np.abs(weight - reference.coef_).max() <= 0.05 * np.abs(reference.coef_).max()
            probs = torch.softmax(torch.as_tensor(sites[g] @ weight.T + bias), 1).numpy()
            np.testing.assert_allclose(probs, reference.predict_proba(sites[g]), atol=5e-3)


def test_batched_sites_equal_one_at_a_time_fits():
    """Sites of different widths fit together (zero-padded) equal their one-site fits on >= 99% of the test
    predictions, and reach the recorded stopping rule."""
    rng = np.random.default_rng(5)
    x, labels = overlapping(d=12)
    sites = {"m/a/output": x[:, :6], "m/b/output": x, "m/c/output": x @ rng.standard_normal((12, 20))}
    mask = split_by_image(np.arange(labels.size), labels, 0.3, seed=0)
    together = probe_sites(sites, labels, mask, device="cpu")
    assert len(site_groups({s: a.shape[1] for s, a in sites.items()}, labels.size, 2**30)) == 1
    val = validation_mask(np.arange(labels.size), labels, mask, 0)
    alone = [probe_group([a], labels, mask, val, device="cpu")[0] for a in sites.values()]
    same = (together["prediction"].values == np.stack([r.predictions for r in alone])).mean(1)
    assert (same >= 0.99).all()
    np.testing.assert_array_equal(together["C"].values, [r.C for r in alone])
    assert together["converged"].all() and (together["gradient"] <= GRAD_TOL).all()
    assert "gradient RMS" in together.attrs["stopping_rule"]
    exact = [probe_group([a], labels, mask, val, device="cpu")[0] for a in sites.values()]
    assert all(np.array_equal(a.predictions, b.predictions) for a, b in zip(alone, exact))  # deterministic


def test_a_site_fits_the_same_whatever_sites_share_its_batch():
    """Each site keeps its own L-BFGS in the batch: fit beside an easy site or beside a hard, slow one,
    a site's C, iterations and predictions are its own (up to float32 rounding of the batched products)."""
    rng = np.random.default_rng(7)
    x, labels = overlapping(d=12)
    mask = split_by_image(np.arange(labels.size), labels, 0.3, seed=0)
    val = validation_mask(np.arange(labels.size), labels, mask, 0)
    spiky = 1e3 * rng.standard_normal((labels.size, 1)) * x[:, :1]  # one direction 1000x the others
    hard = np.concatenate([x, spiky], 1) @ rng.standard_normal((13, 40))
    alone = probe_group([x], labels, mask, val, device="cpu")[0]
    for neighbour in (x[:, :4], hard):
        beside = probe_group([x, neighbour], labels, mask, val, device="cpu")[0]
        assert beside.C == alone.C and abs(beside.iterations - alone.iterations) <= 2
        assert np.mean(beside.predictions == alone.predictions) >= 0.99


def test_the_principal_basis_keeps_inner_products_and_diagonalises_the_training_gram():
    """A rotation (n_train >= d) or the training rows' span (n_train < d, rank <= n_train): inner products with
    the training rows kept, their Gram diagonal, numerically null axes dropped."""
    rng = np.random.default_rng(11)
    labels = np.arange(90) % 3
    x = rng.standard_normal((90, 200))
    mask = split_by_image(np.arange(90), labels, 0.3, seed=0)
    z = standardise(x, ~mask)
    for width, rank in ((200, (~mask).sum() - 1), (50, 50)):  # centred training rows: rank n_train - 1
        basis = principal_basis(z[:, :width], ~mask)
        assert basis.shape == (90, rank)
        np.testing.assert_allclose(basis @ basis[~mask].T, z[:, :width] @ z[~mask, :width].T, atol=1e-9)
        gram = basis[~mask].T @ basis[~mask]
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-9)


def test_fewer_training_rows_than_features_predict_as_the_reference():
    """n_train < d: the probe fit in the training rows' span predicts as scikit-learn's float64 fit in all d
    features at the same C."""
    rng = np.random.default_rng(11)
    labels = np.arange(90) % 3
    x = rng.standard_normal((90, 200)) + 0.8 * np.repeat(np.eye(3), [70, 70, 60], axis=1)[labels]
    mask = split_by_image(np.arange(90), labels, 0.3, seed=0)
    z = standardise(x, ~mask)
    ours = probe_in_memory(x, labels, mask, device="cpu")
    reference = LogisticRegression(C=ours.C, max_iter=10000, tol=1e-10).fit(z[~mask], labels[~mask])
    assert ours.converged and np.mean(reference.predict(z[mask]) == ours.predictions) >= 0.99


def test_the_c_path_scores_the_reference_fits_on_the_validation_rows():
    """Every C of the path is fit to the stopping rule: its validation accuracy is scikit-learn's at that C
    on the same fit rows, within one validation row."""
    x, labels = overlapping(d=40, seed=4)
    mask = split_by_image(np.arange(labels.size), labels, 0.3, seed=0)
    val = validation_mask(np.arange(labels.size), labels, mask, 0)
    ours = probe_group([x], labels, mask, val, device="cpu")[0]
    fit = ~mask & ~val
    z = standardise(x, ~mask)
    for c, accuracy in ours.validation_accuracy.items():
        reference = LogisticRegression(C=c, max_iter=10000, tol=1e-10)
        expected = np.mean(reference.fit(z[fit], labels[fit]).predict(z[val]) == labels[val])
        assert abs(accuracy - expected) <= 1 / val.sum() + 1e-12
    assert len(set(ours.validation_accuracy.values())) > 1  # the grid is not flat here


def test_probes_on_dask_workers_equal_probes_in_process():
    """With a client the L-BFGS groups run as tasks on the workers, several groups per worker thread, and
    give exactly the in-process results."""
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(5)
    x, labels = overlapping(d=12)
    sites = {f"m/s{i}/output": x @ rng.standard_normal((12, 8 + i)) for i in range(6)}
    mask = split_by_image(np.arange(labels.size), labels, 0.3, seed=0)
    here = probe_sites(sites, labels, mask, device="cpu")
    calls = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        there = probe_sites(sites, labels, mask, device="cpu", client=client,
                            progress=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 5 and calls[0] == (0, 6) and sum(d for d, _ in calls) == 6  # groups, as they finish
    assert {t for _, t in calls} == {6}
    for name in ("prediction", "C", "iterations", "test_accuracy", "converged"):
        np.testing.assert_array_equal(there[name].values, here[name].values)


def test_constant_features_are_ignored_not_amplified():
    x, labels, image = separable()
    x = np.concatenate([x, np.full((x.shape[0], 2), 3.7)], axis=1)
    mask = split_by_image(image, labels, 0.3, seed=0)
    assert probe_in_memory(x, labels, mask, device="cpu").test_accuracy == 1.0


def test_solver_choice_and_progress():
    assert choose_solver(100, 10, 2**30) == "lbfgs"
    assert choose_solver(10**6, 1000, 2**30) == "sgd"
    x, labels, image = separable()
    mask = split_by_image(image, labels, 0.3, seed=0)
    calls = []
    ds = probe_sites({"m/a/output": x, "m/b/output": x[:, :3]}, labels, mask, memory_budget=1000, device="cpu",
                     progress=lambda done, total: calls.append((done, total)))
    assert list(ds["backend"].values) == ["sgd", "sgd"] and (ds["test_accuracy"] == 1.0).all()
    assert calls == [(0, 2), (1, 2), (1, 2)]  # once as the probes start (none done), then each site done
    with pytest.raises(ValueError, match="do not match"):
        probe_in_memory(x[:-1], labels, mask)
    with pytest.raises(ValueError, match="'m/a/output' has 59 rows"):
        probe_sites({"m/a/output": x[:-1]}, labels, mask)
