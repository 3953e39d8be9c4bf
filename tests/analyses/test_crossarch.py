"""Cross-architecture curves against a brute-force float64 reference: planted best matches are found,
every best-match and depth-aligned value equals the reference CKA of that site pair, degenerate sites
and pairs that share site names are handled; their findings."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.analyses import crossarch_cka, crossarch_pairs
from tasks.cka import cka, cka_matrix
from tasks.report.findings import crossarch_findings
from tasks.report.sentences import entry

VIT = ["patch_embed/output", "blocks.0/attn", "blocks.0/block", "blocks.1/attn", "blocks.1/block", "blocks.2/block",
       "norm/output"]
CNN = ["stem/output", "layer1.0/block", "layer2.0/block", "layer3.0/block"]
PLANTED = {"stem/output": "blocks.0/attn", "layer1.0/block": "blocks.1/attn", "layer2.0/block": "blocks.2/block",
           "layer3.0/block": "norm/output"}  # cnn site -> the vit site it is a rotated, scaled copy of


@pytest.fixture(scope="module")
def features() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 40
    vit = {s: rng.standard_normal((n, 6)) @ rng.standard_normal((6, 9)) for s in VIT}
    vit["blocks.0/block"] = np.ones((n, 9))  # constant: degenerate, its row is NaN
    cnn = {s: 3.0 * vit[PLANTED[s]] @ np.linalg.qr(rng.standard_normal((9, 9)))[0] for s in CNN}
    copy = {s: vit[s] + 0.5 * rng.standard_normal((n, 9)) for s in VIT}  # same site names as vit
    return ({f"vit/{s}": x for s, x in vit.items()} | {f"cnn/{s}": x for s, x in cnn.items()}
            | {f"copy/{s}": x for s, x in copy.items()})


def test_best_match_and_alignment_equal_the_reference(features):
    order = {"vit": VIT, "cnn": CNN, "copy": VIT}
    with pytest.warns(Warning):
        matrix = cka_matrix(features, precision="float64")
    out = crossarch_cka(matrix, order, similarity="lin")
    assert crossarch_pairs(order) == [("vit", "cnn"), ("cnn", "copy")]
    assert list(dict.fromkeys(zip(out.model_a.values, out.model_b.values))) == [("vit", "cnn"), ("cnn", "copy")]
    for a, b in crossarch_pairs(order):
        part = out.isel(point=np.flatnonzero(((out.model_a == a) & (out.model_b == b)).values))
        assert list(part.site.values) == order[a] and np.allclose(part.relative_depth, np.linspace(0, 1, len(order[a])))
        for p in range(part.sizes["point"]):
            site = str(part.site.values[p])
            ref = np.array([cka(features[f"{a}/{site}"], features[f"{b}/{t}"]) for t in order[b]])
            if np.isnan(ref).all():  # the degenerate site
                assert part.best_site.values[p] == "" and np.isnan(part.best_cka.values[p])
                continue
            k = int(np.nanargmax(ref))
            assert part.best_site.values[p] == order[b][k]
            assert part.best_cka.values[p] == pytest.approx(ref[k], abs=1e-9)
            assert part.best_relative_depth.values[p] == pytest.approx(k / (len(order[b]) - 1))
            j = order[b].index(str(part.aligned_site.values[p]))
            assert part.aligned_cka.values[p] == pytest.approx(ref[j], abs=1e-9) or np.isnan(ref[j])
    vit_cnn = out.isel(point=np.flatnonzero((out.model_a == "vit").values))
    # the planted copies are found with CKA 1; nearest relative depth: 7 sites onto 4, ties to the deeper site
    assert [str(vit_cnn.aligned_site.values[i]) for i in range(7)] == [CNN[k] for k in (0, 1, 1, 2, 2, 3, 3)]
    cnn_copy = out.isel(point=np.flatnonzero((out.model_a == "cnn").values))
    for s, v in PLANTED.items():
        i = VIT.index(v)
        assert vit_cnn.best_site.values[i] == s and vit_cnn.best_cka.values[i] == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.isfinite(cnn_copy.best_cka.values))


def test_no_cross_architecture_pair_gives_an_empty_result(features):
    order = {"vit": VIT, "copy": VIT}
    matrix = cka_matrix({k: v for k, v in features.items() if not k.startswith("cnn/") and "blocks.0/block" not in k})
    out = crossarch_cka(matrix, {m: [s for s in VIT if s != "blocks.0/block"] for m in order})
    assert out.sizes["point"] == 0 and crossarch_findings(out, similarity="") == []


def test_crossarch_findings_state_the_measured_numbers(features):
    order = {"cnn": CNN, "vit": VIT}
    with pytest.warns(Warning):
        out = crossarch_cka(cka_matrix(features, precision="float64"), order, similarity="lin")
    (f,) = map(entry, crossarch_findings(out, similarity="lin"))
    assert (f["model_a"], f["model_b"], f["n_sites"]) == ("cnn", "vit", 4)
    assert f["mean_best_cka"] == pytest.approx(1.0, abs=1e-9)  # every cnn site is a copy of a vit site
    assert f["depth_spearman"] == pytest.approx(1.0)  # the copies keep depth order
    assert f["n_below"] == 0
    assert f["mean_aligned_cka"] == pytest.approx(float(np.nanmean(out.aligned_cka.values)))
    assert "mean CKA 1.00" in f["text"] and "Spearman" in f["text"]
