"""Hard activations: large offsets, extreme scales, float16 storage, near-degenerate sites, and the RBF
bandwidth and memory budget. Every path against the float64 reference on the values as stored."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tasks.cka import DegenerateSiteWarning, cka, cka_matrix, exact, gram, hsic, minibatch_cka_matrix

N = 160
GOAL = 1e-5        # float32 Grams against the float64 truth


def hard_sites(offset: float, std: float, scales: tuple[float, float, float] = (1.0, 1.0, 1.0),
               dtype=np.float64, seed: int = 0) -> dict[str, np.ndarray]:
    """Three correlated sites: features std * signal + offset (per-column offsets around it), times a scale."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(N, 8))
    a = latent @ rng.normal(size=(8, 20))
    signals = (a, a[:, :10] + rng.normal(size=(N, 10)), latent[:, :6] + rng.normal(size=(N, 6)))
    return {f"m/s{i}": ((x * std + offset * (1 + 0.1 * rng.normal(size=x.shape[1]))) * scale).astype(dtype)
            for i, (x, scale) in enumerate(zip(signals, scales))}


def truth(arrays: dict, **kwargs) -> np.ndarray:
    values = [np.asarray(a, dtype=np.float64) for a in arrays.values()]
    return np.array([[cka(a, b, **kwargs) for b in values] for a in values])


HARD = {
    "offset 1e4 x std, std 1": dict(offset=1e4, std=1.0),
    "offset 1e4 x std, std 0.01": dict(offset=1e2, std=0.01),
    "offset 1e6 x std": dict(offset=1e4, std=0.01),
    "scales 1e-12, 1, 1e12": dict(offset=0.0, std=1.0, scales=(1e-12, 1.0, 1e12)),
    "scales 1e12, 1e12, 1e-12 with offset": dict(offset=5.0, std=1.0, scales=(1e12, 1e12, 1e-12)),
    "float16, offset 1e2 x std": dict(offset=30.0, std=0.3, dtype=np.float16),
    "float16, scale 1e-3": dict(offset=0.0, std=1.0, scales=(1e-3, 1e-3, 1e-3), dtype=np.float16),
    "float32, offset 1e6 x std": dict(offset=1e4, std=0.01, dtype=np.float32),
    "float32, scales 1e-12, 1, 1e12 with offset": dict(offset=50.0, std=1.0, scales=(1e-12, 1.0, 1e12),
                                                        dtype=np.float32),
}
SCHEDULES = {"block pairs": 48, "sites": None}     # block_size: a forced block, or the site-major schedule
PATHS = [("linear", False, "blocked"), ("linear", True, "blocked"), ("linear", False, "features"),
         ("linear", True, "features"), ("rbf", False, "blocked"), ("rbf", True, "blocked")]


@pytest.mark.parametrize("case", list(HARD))
@pytest.mark.parametrize(("kernel", "unbiased", "method", "schedule"),
                         [(*p, s) for p in PATHS for s in (SCHEDULES if p[2] == "blocked" else ["block pairs"])])
def test_float32_paths_within_goal_on_hard_inputs(case, kernel, unbiased, method, schedule):
    arrays = hard_sites(**HARD[case])
    out = cka_matrix(arrays, kernel=kernel, unbiased=unbiased, method=method, precision="float32",
                     block_size=SCHEDULES[schedule])
    assert out.attrs["nan_reasons"] == {}
    assert out.attrs.get("schedule", "block pairs") == schedule
    np.testing.assert_allclose(out.values, truth(arrays, kernel=kernel, unbiased=unbiased), rtol=0, atol=GOAL)


def minibatch_truth(arrays: dict, batch_size: int, seed: int) -> np.ndarray:
    """Mean float64 reference unbiased HSIC over the documented minibatch draw, as CKA."""
    n = next(iter(arrays.values())).shape[0]
    order = np.random.default_rng(seed).permutation(n)[: n // batch_size * batch_size].reshape(-1, batch_size)
    values = [np.asarray(a, dtype=np.float64) for a in arrays.values()]
    total = np.zeros((len(values), len(values)))
    for rows in order:
        grams = [gram(v[rows] - v[rows].mean(0)) for v in values]
        total += np.array([[hsic(k, l, unbiased=True) for l in grams] for k in grams])
    scale = np.sqrt(np.diag(total))
    return total / np.outer(scale, scale)


@pytest.mark.parametrize("case", list(HARD))
@pytest.mark.parametrize("batch_size", [N, 40])
def test_minibatch_within_goal_on_hard_inputs(case, batch_size):
    arrays = hard_sites(**HARD[case])
    out = minibatch_cka_matrix(arrays, batch_size=batch_size, seed=2, precision="float32")
    np.testing.assert_allclose(out.cka.values, minibatch_truth(arrays, batch_size, 2), rtol=0, atol=GOAL)


def test_reference_is_stable_on_offsets_and_scales():
    arrays = hard_sites(0.0, 1.0)
    clean = truth(arrays)
    clean_unbiased = truth(arrays, unbiased=True)
    for offset, std in ((1e3, 0.01), (1e4, 1.0)):
        shifted = {k: v * std + offset for k, v in arrays.items()}
        np.testing.assert_allclose(truth(shifted), clean, atol=1e-9)
        np.testing.assert_allclose(truth(shifted, unbiased=True), clean_unbiased, atol=1e-9)
    for scale in (1e-12, 1e8, 1e9, 1e12):
        scaled = {k: v * scale for k, v in arrays.items()}
        np.testing.assert_allclose(truth(scaled), clean, atol=1e-12)
        np.testing.assert_allclose(truth(scaled, kernel="rbf", unbiased=True),
                                   truth(arrays, kernel="rbf", unbiased=True), atol=1e-12)


def spike_sites() -> dict[str, np.ndarray]:
    """A site constant except in one row (exact HSIC_1(K, K) = 0), a tiny real signal, and an ordinary one."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N, 10))
    spike = np.full((N, 7), 3.0)
    spike[17] += rng.normal(size=7)
    return {"m/x": x, "m/spike": spike, "m/tiny": x[:, :6] * 1e-6 + 3e-7 * rng.normal(size=(N, 6))}


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize(("kernel", "unbiased", "method", "schedule"),
                         [(*p, s) for p in PATHS if p[1] or p[0] == "rbf"
                          for s in (SCHEDULES if p[2] == "blocked" else ["block pairs"])])
def test_spike_site_is_nan_with_a_reason_and_tiny_signal_is_valid(precision, kernel, unbiased, method, schedule):
    arrays = spike_sites()
    with pytest.warns(DegenerateSiteWarning, match="m/spike"):
        out = cka_matrix(arrays, kernel=kernel, unbiased=unbiased, method=method, precision=precision,
                         block_size=SCHEDULES[schedule])
    assert out.attrs.get("schedule", "block pairs") == schedule
    assert list(out.attrs["nan_reasons"]) == ["m/spike"]
    reason = out.attrs["nan_reasons"]["m/spike"]
    assert ("N*eps*||K||_F^2" in reason) if kernel == "linear" else ("median" in reason)
    assert np.isnan(out.sel(site_a="m/spike").values).all()
    tol = 1e-5 if precision == "float32" else 1e-9
    ok = ["m/x", "m/tiny"]
    expected = truth({k: arrays[k] for k in ok}, kernel=kernel, unbiased=unbiased)
    np.testing.assert_allclose(out.sel(site_a=ok, site_b=ok).values, expected, atol=tol)
    assert expected[0, 1] > 0.5


def test_spike_site_is_nan_in_the_reference_and_minibatch():
    arrays = spike_sites()
    for kernel in ("linear", "rbf"):
        with pytest.warns(DegenerateSiteWarning, match="input x"):
            assert np.isnan(cka(arrays["m/spike"], arrays["m/x"], kernel=kernel, unbiased=True))
    with pytest.warns(DegenerateSiteWarning, match="N\\*eps"):
        assert np.isnan(cka(arrays["m/spike"], arrays["m/x"], unbiased=True))
    for precision in ("float32", "float64"):
        for batch_size in (N, 40):
            with pytest.warns(DegenerateSiteWarning, match="m/spike"):
                out = minibatch_cka_matrix(arrays, batch_size=batch_size, precision=precision)
            assert list(out.attrs["nan_reasons"]) == ["m/spike"]
            assert np.isfinite(out.cka.sel(site_a="m/tiny", site_b="m/x").item())


def test_rbf_bandwidth_does_not_depend_on_the_memory_budget():
    arrays = hard_sites(1.0, 1.0)
    big = cka_matrix(arrays, kernel="rbf", precision="float64", memory_budget="1GiB")
    small = cka_matrix(arrays, kernel="rbf", precision="float64", memory_budget="64KiB")
    assert small.attrs["block_size"] < big.attrs["block_size"]
    assert small.attrs["rbf_median"] == pytest.approx(big.attrs["rbf_median"], rel=1e-13)   # first-pass sum order
    assert small.attrs["rbf_median_samples"] == N and small.attrs["rbf_median_exact"]
    np.testing.assert_allclose(small.values, truth(arrays, kernel="rbf"), atol=1e-9)
    np.testing.assert_allclose(big.values, small.values, atol=1e-12)


def test_a_budget_too_small_for_any_plan_is_an_early_error(monkeypatch):
    arrays = hard_sites(1.0, 1.0)

    def never(*args, **kwargs):
        raise AssertionError("no pass may start")

    monkeypatch.setattr(exact, "first_pass", never)
    for kernel in ("linear", "rbf"):
        with pytest.raises(ValueError, match=r"compute\.memory_budget 1 bytes .* at least \d+ bytes"):
            cka_matrix(arrays, kernel=kernel, memory_budget=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.undo()
        assert cka_matrix(arrays, memory_budget="64KiB").attrs["nan_reasons"] == {}
