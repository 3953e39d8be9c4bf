"""The float64 reference `tasks.cka.reference.cka`: published values, a second independent oracle, invariances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tasks.cka import DegenerateSiteWarning, cka, gram, hsic

# Printed outputs of Kornblith et al.'s demo notebook (google-research/google-research,
# representation_similarity/Demo.ipynb, commit 10bf941a): seed 1337, X ~ randn(100, 10), Y = randn + X.
PUBLISHED = {"linear": 0.55761, "rbf": 0.65483, "linear_debiased": 0.51346}


def notebook_data() -> tuple[np.ndarray, np.ndarray]:
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


# --- second oracle: the notebook's formulation (centred Grams, U-centring for the debiased form) ---
def nb_gram_linear(x: np.ndarray) -> np.ndarray:
    return x @ x.T


def nb_gram_rbf(x: np.ndarray, threshold: float) -> np.ndarray:
    dots = x @ x.T
    norms = np.diag(dots)
    sq = norms[:, None] + norms[None, :] - 2 * dots
    return np.exp(-sq / (2 * threshold**2 * np.median(sq)))


def nb_center(k: np.ndarray, unbiased: bool) -> np.ndarray:
    k = k.copy()
    n = k.shape[0]
    if unbiased:
        np.fill_diagonal(k, 0)
        means = k.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
    else:
        means = k.mean(0)
        means -= means.mean() / 2
    k -= means[:, None] + means[None, :]
    if unbiased:
        np.fill_diagonal(k, 0)
    return k


def nb_cka(k: np.ndarray, l: np.ndarray, debiased: bool = False) -> float:
    kc, lc = nb_center(k, debiased), nb_center(l, debiased)
    return float(kc.ravel() @ lc.ravel() / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def nb_feature_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]

    def dot_sim(a: np.ndarray, b: np.ndarray) -> float:
        value = np.linalg.norm(a.T @ b) ** 2
        if debiased:
            ra, rb = (a * a).sum(1), (b * b).sum(1)
            value = value - n / (n - 2) * ra @ rb + ra.sum() * rb.sum() / ((n - 1) * (n - 2))
        return value

    return float(dot_sim(x, y) / np.sqrt(dot_sim(x, x) * dot_sim(y, y)))


def test_reproduces_published_notebook_values():
    x, y = notebook_data()
    assert round(cka(x, y), 5) == PUBLISHED["linear"]
    assert round(cka(x, y, kernel="rbf", rbf_threshold=0.5), 5) == PUBLISHED["rbf"]
    assert round(cka(x, y, unbiased=True), 5) == PUBLISHED["linear_debiased"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n", [6, 37])
def test_matches_notebook_formulas(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)) + 2.0
    y = x @ rng.normal(size=(5, 8)) + rng.normal(size=(n, 8))
    kx, ky = nb_gram_linear(x), nb_gram_linear(y)
    assert cka(x, y) == pytest.approx(nb_cka(kx, ky), abs=1e-12)
    assert cka(x, y) == pytest.approx(nb_feature_cka(x, y), abs=1e-12)
    assert cka(x, y, unbiased=True) == pytest.approx(nb_cka(kx, ky, debiased=True), abs=1e-12)
    assert cka(x, y, unbiased=True) == pytest.approx(nb_feature_cka(x, y, debiased=True), abs=1e-12)
    for t in (0.5, 1.0):
        rx, ry = nb_gram_rbf(x, t), nb_gram_rbf(y, t)
        assert cka(x, y, kernel="rbf", rbf_threshold=t) == pytest.approx(nb_cka(rx, ry), abs=1e-12)
        assert cka(x, y, kernel="rbf", rbf_threshold=t, unbiased=True) == pytest.approx(
            nb_cka(rx, ry, debiased=True), abs=1e-12)


def test_rbf_bandwidth_is_median_over_all_pairs_including_diagonal():
    x = np.array([[0.0], [1.0], [3.0]])
    # squared distances: 0,0,0 on the diagonal, 1,9,4 twice off it -> median of 9 values = 1
    k = gram(x, "rbf", rbf_threshold=1.0)
    assert k[0, 1] == pytest.approx(np.exp(-1 / 2))
    assert k[0, 2] == pytest.approx(np.exp(-9 / 2))


def test_unbiased_hsic_needs_four_samples_and_may_be_negative():
    with pytest.raises(ValueError, match="at least 4"):
        hsic(np.eye(3), np.eye(3), unbiased=True)
    rng = np.random.default_rng(3)
    values = [cka(rng.normal(size=(8, 2)), rng.normal(size=(8, 2)), unbiased=True) for _ in range(20)]
    assert min(values) < 0 < max(values)


def test_degenerate_and_bad_inputs():
    x = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.warns(DegenerateSiteWarning, match="input x: constant"):
        assert np.isnan(cka(np.ones((10, 3)), x))
    with pytest.warns(DegenerateSiteWarning, match="input y: 3 non-finite"):
        assert np.isnan(cka(x, np.where(np.eye(10, 3) > 0, np.inf, x)))
    with pytest.warns(DegenerateSiteWarning, match="median squared pairwise distance is 0"):
        assert np.isnan(cka(x, np.repeat([[0.0], [1.0]], [8, 2], axis=0), kernel="rbf"))
    with pytest.raises(ValueError, match="same N"):
        cka(x, x[:5])
    with pytest.raises(ValueError, match="kernel"):
        cka(x, x, kernel="poly")


matrices = st.integers(min_value=0, max_value=2**32 - 1).flatmap(
    lambda seed: st.tuples(st.just(seed), st.integers(6, 20), st.integers(1, 6), st.integers(1, 6)))


@settings(max_examples=30, deadline=None)
@given(matrices, st.sampled_from(["linear", "rbf"]), st.booleans())
def test_invariances(case, kernel, unbiased):
    seed, n, dx, dy = case
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, dx)), rng.normal(size=(n, dy))
    rotation, _ = np.linalg.qr(rng.normal(size=(dx, dx)))
    value = cka(x, y, kernel=kernel, unbiased=unbiased)
    assert cka(y, x, kernel=kernel, unbiased=unbiased) == pytest.approx(value, abs=1e-9)
    assert cka(x @ rotation, y, kernel=kernel, unbiased=unbiased) == pytest.approx(value, abs=1e-9)
    assert cka(3.7 * x + 1.5, y, kernel=kernel, unbiased=unbiased) == pytest.approx(value, abs=1e-9)
    assert cka(x, x, kernel=kernel, unbiased=unbiased) == pytest.approx(1.0, abs=1e-9)
    assert -1.0 - 1e-9 <= value <= 1.0 + 1e-9
