"""Statistical validity of the analyses: the jackknife band's coverage against a known population CKA,
bands on wide sites, exact kappa, offset features, NaN-safe findings."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from sklearn.metrics import cohen_kappa_score

from tasks.analyses import (
    attribution_by_type,
    jackknife_band,
    matched_depth,
    pair_agreement,
    sublayer_attribution,
)
from tasks.analyses.probes.protocol import split_by_image
from tasks.analyses.probes.solvers import probe_in_memory
from tasks.cka import cka
from tasks.report.findings import pair_findings
from tasks.report.sentences import entry


def _one_pair(x: np.ndarray, y: np.ndarray, unbiased: bool) -> tuple[xr.Dataset, dict[str, np.ndarray], float]:
    point = cka(x, y, unbiased=unbiased)
    ids = ["a/s/output", "b/s/output"]
    da = xr.DataArray([[1.0, point], [point, 1.0]], dims=("site_a", "site_b"), coords={"site_a": ids, "site_b": ids})
    return matched_depth(da, {"a": ["s/output"], "b": ["s/output"]}), dict(zip(ids, (x, y))), point


def _band(x: np.ndarray, y: np.ndarray, unbiased: bool, groups: int = 10, seed: int = 0) -> tuple[float, float, float]:
    matched, features, point = _one_pair(x, y, unbiased)
    band = jackknife_band(matched, lambda wanted: {k: features[k] for k in wanted}, np.arange(x.shape[0]),
                          groups=groups, seed=seed, cka_options={"kernel": "linear", "unbiased": unbiased})
    return band["boot_low"].item(), point, band["boot_high"].item()


def test_jackknife_band_covers_the_population_cka_at_its_nominal_rate():
    """X ~ N(0, I_5), Y = X + E with E ~ N(0, I_5): population linear CKA = tr(S_xy S_yx) /
    sqrt(tr(S_xx^2) tr(S_yy^2)) = 5 / sqrt(5 * 5 * 2^2) = 0.5. 200 replicates at N = 120."""
    rng = np.random.default_rng(0)
    covered = 0
    for r in range(200):
        x = rng.standard_normal((120, 5))
        low, _, high = _band(x, x + rng.standard_normal((120, 5)), unbiased=True, seed=r)
        covered += low <= 0.5 <= high
    assert 0.85 <= covered / 200 <= 0.99


@pytest.mark.parametrize(("n", "d", "unbiased"), [(300, 768, False), (60, 400, True)])
def test_band_contains_the_point_estimate_on_wide_sites(n, d, unbiased):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal((d, d)) / np.sqrt(d) + (0.5 if unbiased else 0.1) * rng.standard_normal((n, d))
    low, point, high = _band(x, y, unbiased)
    assert low < point < high


def test_kappa_matches_sklearn_when_one_minus_p_e_is_tiny():
    n = 10**6
    a, b = np.zeros(n, int), np.zeros(n, int)
    a[:4], b[:3], b[4] = 1, 1, 1  # 1 - p_e = 8e-6 (to 1e-11)
    stats = pair_agreement(a, b, np.zeros(n, int))
    assert stats["kappa"] == pytest.approx(cohen_kappa_score(a, b), rel=1e-12)
    assert stats["kappa"] == pytest.approx(0.75, abs=1e-5)
    assert stats["error_consistency"] == pytest.approx(cohen_kappa_score(a == 0, b == 0), rel=1e-12)


def test_an_offset_informative_feature_is_not_taken_for_a_constant():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    x = (1e4 + 5e-3 * (2 * labels - 1) + 1e-4 * rng.standard_normal(100))[:, None]
    mask = split_by_image(np.arange(100), labels, 0.3, seed=0)
    assert probe_in_memory(x, labels, mask, device="cpu").test_accuracy == 1.0


SITES = ["b.0/attn", "b.0/mlp", "b.1/attn", "b.1/mlp"]


def _findings(values: list[float]) -> dict:
    ids = [f"m{i}/{s}" for i in (1, 2) for s in SITES]
    matrix = np.full((8, 8), 0.95)
    for i, v in enumerate(values):
        matrix[i, 4 + i] = matrix[4 + i, i] = v
    da = xr.DataArray(matrix, dims=("site_a", "site_b"), coords={"site_a": ids, "site_b": ids})
    order = {"m1": SITES, "m2": SITES}
    matched = matched_depth(da, order, similarity="lin")
    attribution = attribution_by_type(sublayer_attribution(matched, lambda a, b: True))
    return entry(pair_findings(da, matched, order, similarity="lin", attribution=attribution)[0])


def test_findings_name_undefined_sites_and_exclude_them_from_counts():
    f = _findings([0.9, 0.8, np.nan, 0.6])
    assert list(f["undefined_sites"]) == ["b.1/attn"]
    assert "CKA undefined at b.1/attn: constant activations" in f["text"]
    assert "at all 4 matched sites" not in f["text"]
    assert "at all 3 matched sites where it is defined" in f["text"]


def test_a_type_without_defined_transitions_says_so_and_hides_no_drop():
    f = _findings([0.9, np.nan, 0.7, 0.7])  # both transitions touching b.0/mlp are undefined, one of them attn's
    assert list(f["types_without_transitions"]) == ["attn"]
    assert "'attn': no transition with defined CKA" in f["text"]
    assert "over 0 transitions" not in f["text"]
    assert f["most_loss"]["sublayer_type"] == "mlp" and f["most_loss"]["count"] == 1
    assert "from 0.90 at b.0/attn to 0.70 at b.1/attn" in f["text"]
