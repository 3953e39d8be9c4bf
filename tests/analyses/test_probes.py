"""Linear probes: the split by image, the three solvers of one objective, separable data."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tasks.analyses import choose_backend, probe_in_memory, probe_site, probe_streaming, split_by_image


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


@pytest.mark.parametrize("backend", ["sklearn", "torch"])
def test_separable_data_reaches_100_percent(backend):
    x, labels, image = separable(views=2)
    mask = split_by_image(image, labels, 0.3, seed=0)
    result = probe_in_memory(x, labels, mask, backend=backend, device="cpu")
    assert result.test_accuracy == 1.0 and result.train_accuracy == 1.0
    assert np.array_equal(result.predictions, labels[mask])
    assert result.backend == backend and result.converged


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


def test_torch_and_sklearn_solve_the_same_objective():
    """Overlapping classes: both solvers of the penalised objective agree on (almost) every prediction."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 300)
    x = rng.standard_normal((300, 12)) + 0.8 * np.eye(4, 12)[labels] * 3
    image = np.arange(300)
    mask = split_by_image(image, labels, 0.3, seed=0)
    a = probe_in_memory(x, labels, mask, backend="sklearn")
    b = probe_in_memory(x, labels, mask, backend="torch", device="cpu")
    assert 0.4 < a.test_accuracy < 1.0
    assert np.mean(a.predictions == b.predictions) >= 0.97
    assert abs(a.train_accuracy - b.train_accuracy) <= 0.02


def test_constant_features_are_ignored_not_amplified():
    x, labels, image = separable()
    x = np.concatenate([x, np.full((x.shape[0], 2), 3.7)], axis=1)
    mask = split_by_image(image, labels, 0.3, seed=0)
    assert probe_in_memory(x, labels, mask).test_accuracy == 1.0


def test_backend_choice_and_probe_site():
    assert choose_backend(100, 10, 2**30) == "sklearn"
    assert choose_backend(100, 5000, 2**30) == "torch"
    assert choose_backend(10**6, 1000, 2**30) == "sgd"
    x, labels, image = separable()
    mask = split_by_image(image, labels, 0.3, seed=0)
    result = probe_site(x, labels, mask, memory_budget=1000, device="cpu")
    assert result.backend == "sgd" and result.test_accuracy == 1.0
    with pytest.raises(ValueError, match="do not match"):
        probe_in_memory(x[:-1], labels, mask)
