"""Views: clean (view 0) rows by default for CKA matrices, probes, agreement and label alignment, every
view for the identity target, and the rows and views recorded. Augmented rows here carry a large signal
of a *wrong* label, so any that entered a clean-view result would change it."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import storage
from tasks.analyses import AnalysesOptions, flat_matrix, run_analyses, target_features
from tasks.cka import CkaOptions, cka, update_similarity, view_rows
from tests.stores import write_features

N_IMAGES, VIEWS, CLASSES = 60, 2, 3


def _store(tmp_path):
    rng = np.random.default_rng(0)
    image = np.tile(np.arange(N_IMAGES), VIEWS)
    labels = image % CLASSES
    view = np.repeat(np.arange(VIEWS), N_IMAGES)
    samples = xr.Dataset({"image_index": ("sample", image), "label": ("sample", labels),
                          "view": ("sample", view)}, coords={"sample": np.arange(image.size)},
                         attrs={"fingerprint": "views-test"})
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, samples)
    features = {}
    for model in ("m1", "m2"):
        clean = 3 * np.eye(CLASSES, 6)[labels] + rng.standard_normal((image.size, 6))
        wrong = 50 * np.eye(CLASSES, 6)[(labels + 1) % CLASSES] + rng.standard_normal((image.size, 6))
        x = np.where((view == 0)[:, None], clean, wrong).astype(np.float32)
        features[model] = {"b.0/output": x, "b.1/output": x[:, :4] ** 2}
        write_features(root, model, features[model], shard_size=32)
    return root, samples, features


def test_view_rows():
    samples = xr.Dataset({"view": ("sample", np.repeat([0, 1], 4))})
    assert list(view_rows(samples, "clean")) == [0, 1, 2, 3] and view_rows(samples, "all").size == 8
    assert view_rows(xr.Dataset({"image_index": ("sample", np.arange(3))}), "clean").size == 3  # one view each
    with pytest.raises(ValueError, match="views must be one of"):
        view_rows(samples, "augmented")


def test_cka_matrix_uses_clean_rows_by_default_and_records_them(tmp_path):
    root, _, features = _store(tmp_path)
    fps = {"m1": "fp-m1", "m2": "fp-m2"}
    clean = update_similarity(root, "lin", fps, CkaOptions(precision="float64"))["lin"]
    assert clean.attrs["views"] == "clean" and clean.attrs["rows"] == N_IMAGES
    x, y = (features[m]["b.0/output"][:N_IMAGES].astype(np.float64) for m in ("m1", "m2"))
    stored = flat_matrix(storage.open_similarity(root, "lin"))
    assert float(stored.sel(site_a="m1/b.0/output", site_b="m2/b.0/output")) == pytest.approx(cka(x, y), abs=1e-9)
    every = update_similarity(root, "lin", fps, CkaOptions(precision="float64", views="all"))["lin"]
    assert every.attrs["views"] == "all" and every.attrs["rows"] == VIEWS * N_IMAGES
    assert np.abs(every.values - clean.values).max() > 0.05  # not reused across views


def test_analyses_never_see_augmented_rows_in_a_clean_view(tmp_path):
    root, samples, features = _store(tmp_path)
    update_similarity(root, "lin", {"m1": "fp-m1", "m2": "fp-m2"}, CkaOptions(precision="float64"))
    aligned = []
    run_analyses(root, AnalysesOptions(device="cpu"), alignment_progress=lambda n, total: aligned.append((n, total)))
    done, totals = sum(n for n, _ in aligned), [total for _, total in aligned]
    assert done == totals[-1] and totals == sorted(totals) and totals[0] < totals[-1]  # labels, then identity
    probes = storage.read_analysis(root, "probes")
    assert probes.attrs["views"] == "clean" and probes.attrs["rows"] == N_IMAGES
    assert probes.attrs["n_train"] + probes.attrs["n_test"] == N_IMAGES
    assert (samples["view"].values[probes["test_sample"].values] == 0).all()
    assert float(probes["test_accuracy"].sel(site="m1/b.0/output")) >= 0.9  # the wrong-label views would give ~0
    agreement = storage.read_analysis(root, "agreement")
    assert agreement.attrs["views"] == "clean"
    alignment = storage.read_analysis(root, "target_alignment")
    assert alignment.attrs["rows"] == N_IMAGES and alignment.attrs["identity_rows"] == VIEWS * N_IMAGES
    onehot = target_features(samples.isel(sample=slice(0, N_IMAGES)))["labels"]
    x = features["m1"]["b.0/output"].astype(np.float64)
    assert float(alignment["cka"].sel(site="m1/b.0/output", target="labels")) == pytest.approx(
        cka(x[:N_IMAGES], onehot), abs=1e-4)
    identity = target_features(samples)["identity"]
    assert float(alignment["cka"].sel(site="m1/b.0/output", target="identity")) == pytest.approx(
        cka(x, identity), abs=1e-4)
    matched = storage.read_analysis(root, "matched_cka")
    assert matched.attrs["views_by_matrix"] == {"lin": {"views": "clean", "rows": N_IMAGES}}


def test_all_views_opt_in(tmp_path):
    root, samples, _ = _store(tmp_path)
    update_similarity(root, "lin", {"m1": "fp-m1", "m2": "fp-m2"}, CkaOptions(precision="float64", views="all"))
    run_analyses(root, AnalysesOptions(device="cpu", views="all", probes=True))
    probes = storage.read_analysis(root, "probes")
    assert probes.attrs["views"] == "all" and probes.attrs["n_train"] + probes.attrs["n_test"] == VIEWS * N_IMAGES
    assert set(samples["view"].values[probes["test_sample"].values]) == {0, 1}


def test_views_options_are_validated_by_the_config():
    from flows.config import ConfigError, validate_config

    base = {"store": "s", "dataset": {"kind": "synthetic"},
            "models": [{"name": "a", "arch": "vit_tiny_patch16_224", "weights": "random:0"}]}
    config = validate_config(base)
    assert config.similarity[0].views == "clean" and config.analyses.views == "clean"
    assert config.similarity[0].options(config.compute).views == "clean"
    with pytest.raises(ConfigError, match=r"similarity\.0\.views"):
        validate_config(base | {"similarity": [{"views": "augmented"}]})
    with pytest.raises(ConfigError, match=r"analyses\.views"):
        validate_config(base | {"analyses": {"views": "view1"}})
    with pytest.raises(ConfigError, match=r"analyses\.bootstrap: the jackknife band needs at least 2 groups"):
        validate_config(base | {"analyses": {"bootstrap": 1}})
