"""Analyses on tiny inputs with hand-computed values: agreement, kappa, error consistency, matched-depth
curves, sublayer attribution, target alignment, fine-tuning comparison, findings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from tasks.analyses import (
    agreement_matrix,
    attribution_by_type,
    finetuning_comparison,
    flat_matrix,
    jackknife_band,
    matched_depth,
    pair_agreement,
    sublayer_attribution,
    sublayer_type,
    target_alignment,
    target_features,
)
from tasks.cka import cka
from tasks.report.findings import finetuning_findings, pair_findings
from tasks.report.sentences import entry


def test_pair_agreement_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2])
    a = np.array([0, 0, 1, 1, 2, 0])  # 5/6 right
    b = np.array([0, 1, 1, 1, 2, 2])  # 5/6 right
    stats = pair_agreement(a, b, labels)
    # same class on 4 of 6; marginals a (3,2,1)/6, b (1,3,2)/6 -> p_e = (3+6+2)/36 = 11/36
    assert stats["agreement"] == pytest.approx(4 / 6)
    assert stats["kappa"] == pytest.approx((24 / 36 - 11 / 36) / (25 / 36))  # 0.52
    # both right or both wrong on 4 of 6; expected 25/36 + 1/36 -> (24 - 26) / 10
    assert stats["error_consistency"] == pytest.approx(-0.2)
    assert stats["accuracy_a"] == pytest.approx(5 / 6)


def test_agreement_undefined_cases_are_nan_not_clamped():
    labels = np.array([0, 1, 0, 1])
    perfect = pair_agreement(labels, labels, labels)
    assert perfect["agreement"] == 1 and perfect["kappa"] == 1
    assert np.isnan(perfect["error_consistency"])  # no errors to be consistent about
    constant = pair_agreement(np.zeros(4), np.zeros(4), labels)
    assert np.isnan(constant["kappa"]) and constant["error_consistency"] == 1
    with pytest.raises(ValueError, match="one length"):
        pair_agreement(np.zeros(3), np.zeros(4), labels)


def test_agreement_matrix_is_labelled_and_symmetric():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = {"a": np.array([0, 0, 1, 1, 2, 0]), "b": np.array([0, 1, 1, 1, 2, 2]), "c": labels}
    ds = agreement_matrix(preds, labels)
    assert ds["kappa"].sel(model_a="a", model_b="b") == pytest.approx(0.52)
    np.testing.assert_allclose(ds["agreement"].values, ds["agreement"].values.T)
    assert ds["accuracy"].sel(model="c") == 1.0


ORDER = {"m1": ["embed/output", "b.0/attn", "b.0/mlp", "b.1/attn", "b.1/mlp"],
         "m2": ["embed/output", "b.0/attn", "b.0/mlp", "b.1/attn", "b.1/mlp"],
         "r": ["stem/output", "layer1.0/block"]}
M1_M2 = [0.9, 0.6, 0.7, 0.3, 0.4]  # matched-site CKA m1 vs m2, in depth order


def cka_fixture(multiindex: bool = False) -> xr.DataArray:
    ids = [f"{m}/{s}" for m, sites in ORDER.items() for s in sites]
    rng = np.random.default_rng(0)
    values = rng.uniform(0.0, 1.0, (len(ids), len(ids)))
    values = (values + values.T) / 2
    np.fill_diagonal(values, 1.0)
    for k, v in enumerate(M1_M2):
        values[k, 5 + k] = values[5 + k, k] = v
    if not multiindex:
        return xr.DataArray(values, dims=("site_a", "site_b"), coords={"site_a": ids, "site_b": ids})
    parts = [tuple(i.split("/", 1)[:1] + i.split("/", 1)[1].split("/")) for i in ids]
    index = {s: pd.MultiIndex.from_tuples(parts, names=[f"model_{s}", f"layer_{s}", f"sublayer_{s}"]) for s in "ab"}
    coords = xr.Coordinates.from_pandas_multiindex(index["a"], "site_a").merge(
        xr.Coordinates.from_pandas_multiindex(index["b"], "site_b")).coords
    return xr.DataArray(values, dims=("site_a", "site_b"), coords=coords)


@pytest.mark.parametrize("multiindex", [False, True])
def test_matched_depth_takes_same_named_sites_in_depth_order(multiindex):
    matched = matched_depth(cka_fixture(multiindex), ORDER, similarity="lin")
    pair = matched.isel(point=np.flatnonzero(((matched.model_a == "m1") & (matched.model_b == "m2")).values))
    assert list(pair.site.values) == ORDER["m1"]
    np.testing.assert_allclose(pair["cka"].values, M1_M2)
    assert list(pair.depth.values) == [0, 1, 2, 3, 4]
    assert np.isnan(pair["stderr"].values).all()
    assert set(zip(matched.model_a.values, matched.model_b.values)) == {("m1", "m2")}  # r shares no site name


def test_matched_depth_carries_stderr():
    cka_da = cka_fixture()
    stderr = cka_da.copy(data=np.full(cka_da.shape, 0.01))
    matched = matched_depth(cka_da, ORDER, stderr=stderr)
    np.testing.assert_allclose(matched["stderr"].values, 0.01)


def test_sublayer_type_names():
    assert sublayer_type("blocks.3/attn") == "attn"
    assert sublayer_type("norm/output") == "norm"
    assert sublayer_type("blocks.11.attn.proj/output") == "blocks.*.attn.proj"
    assert sublayer_type("layer1.0/bn2") == "bn2"


def test_sublayer_attribution_hand_computed():
    matched = matched_depth(cka_fixture(), ORDER, similarity="lin")
    attribution = sublayer_attribution(matched, lambda a, b: True)
    np.testing.assert_allclose(attribution["delta"].values, [-0.3, 0.1, -0.4, 0.1])
    assert list(attribution.to_site.values) == ORDER["m1"][1:]
    by_type = attribution_by_type(attribution)[("lin", "m1", "m2")]
    assert by_type["attn"] == pytest.approx({"total": -0.7, "mean": -0.35, "count": 2, "undefined": 0})
    assert by_type["mlp"]["total"] == pytest.approx(0.2)
    assert sublayer_attribution(matched, lambda a, b: False).sizes.get("transition", 0) == 0


def test_finetuning_comparison_lines_up_both_models():
    order = {"pre": ORDER["m1"], "ft": ORDER["m2"], "x": ORDER["m1"]}
    ids = [f"{m}/{s}" for m, sites in order.items() for s in sites]
    values = np.eye(len(ids))
    for k in range(5):  # pre vs x: 0.2, ft vs x: 0.6, ft vs pre: 0.8
        values[k, 10 + k] = values[10 + k, k] = 0.2
        values[5 + k, 10 + k] = values[10 + k, 5 + k] = 0.6
        values[5 + k, k] = values[k, 5 + k] = 0.8
    da = xr.DataArray(values, dims=("site_a", "site_b"), coords={"site_a": ids, "site_b": ids})
    ft = finetuning_comparison(da, order, {"ft": "pre"})
    vs_x = ft.isel(point=np.flatnonzero((ft.other == "x").values))
    np.testing.assert_allclose(vs_x["cka_finetuned"].values, 0.6)
    np.testing.assert_allclose(vs_x["cka_pretrained"].values, 0.2)
    vs_pre = ft.isel(point=np.flatnonzero((ft.other == "pre").values))
    np.testing.assert_allclose(vs_pre["cka_finetuned"].values, 0.8)
    (fact,) = map(entry, finetuning_findings(ft, similarity=""))
    assert (fact["other"], fact["sites_closer"], fact["n_sites"]) == ("x", 5, 5)
    assert fact["mean_cka_finetuned"] == pytest.approx(0.6) and fact["mean_cka_pretrained"] == pytest.approx(0.2)
    assert "+0.40" in fact["text"]


def samples_fixture(views: int = 2, n_images: int = 12, n_classes: int = 3) -> xr.Dataset:
    image = np.tile(np.arange(n_images), views)
    return xr.Dataset({"image_index": ("sample", image), "label": ("sample", image % n_classes),
                       "view": ("sample", np.repeat(np.arange(views), n_images))})


def test_target_features_one_hot():
    t = target_features(samples_fixture())
    assert t["labels"].shape == (24, 3) and t["identity"].shape == (24, 12)
    assert np.array_equal(t["labels"].sum(1), np.ones(24))
    assert "identity" not in target_features(samples_fixture(views=1))


def test_target_cka_of_label_one_hot_features_is_one():
    samples = samples_fixture()
    targets = target_features(samples)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((24, 5))
    arrays = {"m/onehot/output": targets["labels"] * 3.0, "m/noise/output": noise,
              "m/image/output": targets["identity"]}
    result = target_alignment(arrays, targets, precision="float64")
    assert result.sel(site="m/onehot/output", target="labels") == pytest.approx(1.0, abs=1e-9)
    assert result.sel(site="m/image/output", target="identity") == pytest.approx(1.0, abs=1e-9)
    assert result.sel(site="m/noise/output", target="labels") == pytest.approx(
        cka(noise, targets["labels"]), abs=1e-9)


def test_jackknife_band_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    samples = samples_fixture(views=1, n_images=40)
    base = rng.standard_normal((40, 4))
    features = {"a/x/y": base, "b/x/y": base + 0.7 * rng.standard_normal((40, 4))}
    full = cka(features["a/x/y"], features["b/x/y"])
    ids = list(features)
    da = xr.DataArray([[1.0, full], [full, 1.0]], dims=("site_a", "site_b"), coords={"site_a": ids, "site_b": ids})
    matched = matched_depth(da, {"a": ["x/y"], "b": ["x/y"]})
    band = jackknife_band(matched, lambda wanted: {k: features[k] for k in wanted}, samples["image_index"].values,
                          groups=10, seed=0, cka_options={"kernel": "linear"})
    assert band["boot_low"].item() < full < band["boot_high"].item()
    assert band.attrs["band_method"] == "delete-group jackknife" and band.attrs["band_groups"] == 10
    again = jackknife_band(matched, lambda wanted: {k: features[k] for k in wanted}, samples["image_index"].values,
                           groups=10, seed=0, cka_options={"kernel": "linear"})
    assert again["boot_low"].item() == band["boot_low"].item()
    with pytest.raises(ValueError, match="at least 2 groups"):
        jackknife_band(matched, lambda wanted: features, samples["image_index"].values, groups=1)


def test_findings_state_the_measured_facts():
    da = cka_fixture()
    matched = matched_depth(da, ORDER, similarity="lin")
    attribution = attribution_by_type(sublayer_attribution(matched, lambda a, b: True))
    ids = [f"{m}/{s}" for m in ORDER for s in ORDER[m]]
    probes = xr.Dataset({"test_accuracy": ("site", np.linspace(0.5, 0.9, len(ids)))}, coords={"site": ids})
    found = {(f["model_a"], f["model_b"]): f for f in
             map(entry, pair_findings(da, matched, ORDER, similarity="lin", attribution=attribution, probes=probes))}
    f = found[("m1", "m2")]
    assert f["first_below"] == {"site": "b.1/attn", "depth": 3, "cka": pytest.approx(0.3)}
    assert f["most_loss"]["sublayer_type"] == "attn" and f["most_loss"]["total"] == pytest.approx(-0.7)
    acc = probes["test_accuracy"]
    assert f["probes"]["gap"] == pytest.approx(float(acc.sel(site="m1/b.1/mlp") - acc.sel(site="m2/b.1/mlp")))
    assert f["last_site_cka"] == pytest.approx(0.4)
    assert "first drops below 0.5 at b.1/attn" in f["text"] and "'attn'" in f["text"]
    assert found[("m1", "r")]["n_matched"] == 0 and "no sites with the same name" in found[("m1", "r")]["text"]
    assert flat_matrix(cka_fixture(True)).equals(flat_matrix(da))
