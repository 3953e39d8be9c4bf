"""The report: summary.json keys and numbers, figures, results.nc, the HTML sections; built from real
activations of small synthetic models through the real CKA engine and analyses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tasks.analyses import AnalysesOptions, compute_analyses, flat_matrix
from tasks.cka import cka_matrix, minibatch_cka_matrix
from tasks.report import build_report
from tasks.report.data import ReportData
from tasks.report.findings import baseline_findings
from tasks.report.records import PairFinding
from tasks.report.results import results_dataset
from tasks.report.sentences import sentence
from tasks.report.summary import build_summary

VIT_SITES = ["patch_embed/output"] + [f"blocks.{i}/{s}" for i in range(2)
                                      for s in ("norm1", "attn", "resid1", "norm2", "mlp", "block")] + ["norm/output"]
CNN_SITES = ["stem/output", "layer1.0/conv1", "layer1.0/bn1", "layer1.0/block"]
VIT_MODELS = ["vit_a", "vit_b", "vit_b_ft"]


def synthetic_inputs() -> tuple[xr.Dataset, dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """Samples, features (model -> site -> (sample, feature)) and model attrs of four models on 24 images
    x 2 views of 4 classes: two same-architecture 'ViTs' whose sites mix the label signal with
    model-specific noise (more with depth, more for vit_b), a fine-tuned copy of vit_b, and a 'CNN'
    with different site names."""
    rng = np.random.default_rng(0)
    n_images, views, classes = 24, 2, 4
    image = np.tile(np.arange(n_images), views)
    label = image % classes
    samples = xr.Dataset({"image_index": ("sample", image), "label": ("sample", label),
                          "label_name": ("sample", np.array([f"digit{c}" for c in label], dtype=object)),
                          "key": ("sample", np.array([f"img{i}.png" for i in image], dtype=object)),
                          "view": ("sample", np.repeat(np.arange(views), n_images))},
                         attrs={"dataset": "synthetic", "seed": 0, "skipped": [{"key": "bad.png", "reason": "truncated"}]})
    signal = np.eye(classes)[label] @ rng.standard_normal((classes, 8))
    shared = signal + 0.5 * rng.standard_normal((n_images, 8))[image]

    def model(sites: list[str], noise: float, seed: int) -> dict[str, np.ndarray]:
        g = np.random.default_rng(seed)
        return {s: (shared + noise * (1 + k) * g.standard_normal(shared.shape)).astype(np.float32)
                for k, s in enumerate(sites)}

    features = {"vit_a": model(VIT_SITES, 0.1, 1), "vit_b": model(VIT_SITES, 0.4, 2),
                "vit_b_ft": model(VIT_SITES, 0.2, 3), "cnn": model(CNN_SITES, 0.3, 4)}
    attrs = {m: {"arch": "cnn" if m == "cnn" else "vit_tiny", "weights": f"random:{k}", "sites": list(features[m]),
                 "reduction": "mean", "fingerprint": f"{k:040d}"} for k, m in enumerate(features)}
    attrs["vit_b_ft"]["finetuned_from"] = "vit_b"
    attrs["cnn"]["nonfinite"] = {"layer1.0/bn1": 3, "layer1.0/conv1": 0}
    return samples, features, attrs


def synthetic_report_data(bootstrap: int = 0) -> ReportData:
    """`synthetic_inputs` through the real CKA engine (exact and minibatch) and every analysis."""
    samples, features, attrs = synthetic_inputs()
    arrays = {f"{m}/{s}": x for m, sites in features.items() for s, x in sites.items()}
    order = {m: list(sites) for m, sites in features.items()}
    similarity = {"linear_biased": cka_matrix(arrays, precision="float64")}
    mb = minibatch_cka_matrix(arrays, batch_size=16, seed=0)
    similarity["linear_unbiased_minibatch"] = mb["cka"].assign_attrs(mb.attrs)
    similarity["linear_unbiased_minibatch_stderr"] = mb["stderr"].assign_attrs(mb.attrs)
    analyses = compute_analyses(AnalysesOptions(test_fraction=0.25, bootstrap=bootstrap), similarity=similarity,
                                order=order, model_attrs=attrs, samples=samples, arrays=arrays)
    run = {"config": {"name": "synthetic", "compute": {"device": "cpu"}}, "started": "2025-01-01T00:00:00+00:00",
           "finished": "2025-01-01T00:01:40+00:00", "versions": {"python": "3.11"}}
    return ReportData(run=run, samples=samples, models=attrs,
                      similarity={n: flat_matrix(da) for n, da in similarity.items()}, analyses=analyses,
                      store_url="memory://synthetic")


@pytest.fixture(scope="module")
def report_data() -> ReportData:
    return synthetic_report_data(bootstrap=5)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, report_data) -> Path:
    out = tmp_path_factory.mktemp("report")
    index = build_report(report_data, str(out))
    assert index == f"{out}/index.html"
    return out


def test_summary_json_has_the_required_keys_and_numbers(report_dir):
    summary = json.loads((report_dir / "summary.json").read_text())
    assert {"run", "models", "similarity", "analyses", "findings"} <= set(summary)
    assert summary["run"]["n_samples"] == 48 and {"config", "started", "finished", "versions"} <= set(summary["run"])
    assert summary["models"]["vit_a"]["sites"] == VIT_SITES and summary["models"]["cnn"]["arch"] == "cnn"
    lin = summary["similarity"]["linear_biased"]
    assert lin["kernel"] == "linear" and lin["estimator"] == "biased"
    matrix = np.array(lin["matrix"], dtype=float)
    assert len(lin["sites"]) == matrix.shape[0] == 3 * len(VIT_SITES) + len(CNN_SITES)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-12)
    assert "linear_unbiased_minibatch_stderr" not in summary["similarity"]
    assert np.all(np.array(summary["similarity"]["linear_unbiased_minibatch"]["stderr"], dtype=float) >= 0)
    analyses = summary["analyses"]
    assert {"matched_cka", "sublayer_attribution", "target_alignment", "probes", "agreement", "finetuning"} <= set(analyses)
    curve = next(c for c in analyses["matched_cka"] if c["similarity"] == "linear_biased"
                 and (c["model_a"], c["model_b"]) == ("vit_a", "vit_b"))
    assert curve["sites"] == VIT_SITES and all(lo <= hi for lo, hi in zip(curve["boot_low"], curve["boot_high"]))
    i, j = lin["sites"].index("vit_a/blocks.1/attn"), lin["sites"].index("vit_b/blocks.1/attn")
    assert curve["cka"][VIT_SITES.index("blocks.1/attn")] == pytest.approx(matrix[i, j])
    assert not any(c["model_b"] == "cnn" and c["model_a"].startswith("vit") for c in analyses["matched_cka"])
    assert len(analyses["probes"]["sites"]) == len(lin["sites"])
    assert all(0 <= a <= 1 for a in analyses["probes"]["test_accuracy"])
    assert len(summary["findings"]) == 6 and all(f["text"] for f in summary["findings"])
    cross = {(c["model_a"], c["model_b"]) for c in analyses["crossarch_cka"] if c["similarity"] == "linear_biased"}
    assert cross == {("vit_a", "cnn"), ("vit_b", "cnn"), ("vit_b_ft", "cnn")}  # only pairs without shared site names
    assert [(f["model_a"], f["model_b"]) for f in summary["crossarch_findings"]] == sorted(cross, key=lambda p: VIT_MODELS.index(p[0]))
    assert all("best-matching site of cnn" in f["text"] for f in summary["crossarch_findings"])


def test_figures_are_written_as_png_and_svg(report_dir):
    pngs = sorted(p.stem for p in (report_dir / "figures").glob("*.png"))
    assert pngs == sorted(p.stem for p in (report_dir / "figures").glob("*.svg"))
    for expected in ("cka_linear_biased_all", "cka_linear_biased_vit_a__vit_b", "depth_linear_biased_vit_a",
                     "sublayers_linear_biased", "target_alignment", "probe_accuracy", "agreement", "finetuning_vit_b_ft",
                     "crossarch_linear_biased_vit_a"):
        assert expected in pngs
    assert (report_dir / "figures" / "agreement.png").read_bytes().startswith(b"\x89PNG")


def test_html_is_self_contained_with_every_section(report_dir):
    html = (report_dir / "index.html").read_text()
    for section in ("findings", "guide", "run", "heatmaps", "depth", "crossarch", "sublayers", "targets", "probes",
                    "agreement", "finetuning", "uncertainty"):
        assert f'<section id="{section}">' in html
    sources = re.findall(r'<img src="([^"]+)"', html)
    heatmaps = re.findall(r'<figure id="fig-([^"]+)" class="heatmap"><div class="hm"><svg', html)
    pngs = [p.stem for p in (report_dir / "figures").glob("*.png")]
    assert sorted(heatmaps) == sorted(p for p in pngs if p.startswith("cka_"))  # every heatmap inline, with hover data
    assert len(sources) + len(heatmaps) == len(pngs)
    assert html.count('<script type="application/json" class="hm-data">') == len(heatmaps)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(src|href)="https?://', html)
    assert "bad.png" in html and "truncated" in html  # skipped images
    assert "cnn/layer1.0/bn1" in html  # non-finite site
    assert "first drops below" in html or "stays at or above" in html


def test_results_nc_round_trips(report_dir):
    ds = xr.open_dataset(report_dir / "results.nc", engine="scipy").load()
    assert "similarity_linear_biased__cka" in ds and "probes__test_accuracy" in ds
    np.testing.assert_allclose(np.diag(ds["similarity_linear_biased__cka"].values), 1.0, atol=1e-9)
    assert json.loads(ds.attrs["run"])["config"]["name"] == "synthetic"


def test_summary_without_optional_analyses():
    data = synthetic_report_data()
    data.analyses = {}
    summary = build_summary(data)
    assert summary["analyses"] == {} and summary["findings"][0]["probes"] is None
    assert "similarity_linear_biased__cka" in results_dataset(data)


def test_report_to_an_fsspec_url():
    import fsspec

    index = build_report(synthetic_report_data(), "memory://reports/run1")
    fs = fsspec.filesystem("memory")
    assert index == "memory://reports/run1/index.html"
    assert fs.cat_file("/reports/run1/index.html").startswith(b"<!DOCTYPE html>")
    assert fs.exists("/reports/run1/summary.json")


def test_prefect_artifacts_summary_tables_and_link(prefect_server, tmp_path):
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.report import publish_artifacts
    from tasks.report.artifacts import report_artifacts

    data = synthetic_report_data()
    summary = build_summary(data)

    @flow
    def publish() -> str:
        index = build_report(data, str(tmp_path), summary)
        publish_artifacts(report_artifacts(data, summary, index))
        return index

    index = publish()
    markdown = Artifact.get("ckaflow-summary")
    assert markdown.type == "markdown" and summary["findings"][0]["text"] in markdown.data
    probes = json.loads(Artifact.get("ckaflow-probes").data)
    assert {row["model"] for row in probes} == set(data.models)
    agreement = json.loads(Artifact.get("ckaflow-agreement").data)
    assert len(agreement) == 6 and {"kappa", "error_consistency"} <= set(agreement[0])
    link = Artifact.get("ckaflow-report")
    assert Path(index).resolve().as_uri() in link.data  # Prefect stores link artifacts as markdown links


def test_run_analyses_and_render_report_on_a_real_store(tmp_path):
    """Store round trip: activations through ActivationWriter, CKA via the engine, analyses/ and report/."""
    import storage
    from tasks.analyses import AnalysesOptions, run_analyses
    from tasks.report import render_report

    samples, features, model_attrs = synthetic_inputs()
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, samples.assign_attrs(fingerprint="synthetic-0"))
    n = samples.sizes["sample"]
    arrays = {}
    for model, attrs in model_attrs.items():
        widths = {site: x.shape[1] for site, x in features[model].items()}
        extra = {k: v for k, v in attrs.items() if k not in ("sites", "fingerprint")} | {"samples_fingerprint": "synthetic-0"}
        with storage.ActivationWriter(root, model, widths, n, shard_size=16, attrs=extra,
                                      fingerprint=attrs["fingerprint"]) as writer:
            for shard in range(writer.n_shards):
                a, b = writer.shard_bounds(shard)
                writer.write_shard(shard, {site: x[a:b] for site, x in features[model].items()})
        arrays |= {f"{model}/{site}": array for site, array in storage.activation_arrays(root, model).items()}
    storage.write_similarity(root, "linear_biased", cka_matrix(arrays))
    root.attrs["run"] = {"config": {"name": "store"}, "started": None, "finished": None, "versions": {}}

    names = run_analyses(root, AnalysesOptions(probe_seed=0, test_fraction=0.25))
    assert set(names) == {"matched_cka", "crossarch_cka", "sublayer_attribution", "finetuning", "target_alignment", "probes",
                          "agreement"}
    probes = storage.read_analysis(root, "probes")
    assert sorted(probes.site.values) == sorted(arrays) and probes.attrs["n_test"] == 4 * 2  # per class round(0.25 * 6) images, clean view only
    assert probes.attrs["views"] == "clean"
    assert set(storage.read_analysis(root, "agreement").site.values) == {f"{m}/{a['sites'][-1]}"
                                                                         for m, a in model_attrs.items()}
    drawn = []
    index = render_report(root, progress=lambda done, total: drawn.append((done, total)))
    assert index == f"{storage.store_url(root).rstrip('/')}/report/index.html"
    figures = len(list((Path(index).parent / "figures").glob("*.png")))
    assert sum(done for done, _ in drawn) == figures and {total for _, total in drawn} == {figures}  # a tick a figure
    summary = json.loads((Path(index).parent / "summary.json").read_text())
    assert summary["models"]["vit_a"]["sites"] == VIT_SITES
    assert summary["similarity"]["linear_biased"]["sites"] == list(arrays)
    pairs = {frozenset((f["model_a"], f["model_b"])) for f in summary["findings"]}
    assert len(pairs) == 6 and frozenset(("vit_a", "cnn")) in pairs


def _pair(a: str, b: str, last_site_cka: float) -> PairFinding:
    return PairFinding(model_a=a, model_b=b, similarity="lin", threshold=0.5, n_matched=0, n_sites_a=2,
                       first_below=None, minimum=None, undefined_sites=(), undefined_spans=(),
                       types_without_transitions=(), most_loss=None, last_site_cka=last_site_cka, probes=None,
                       agreement=None)


def test_findings_refer_to_the_random_weights_baseline():
    models = {"vit_a": {"arch": "vit"}, "vit_b": {"arch": "vit"}, "cnn": {"arch": "cnn"},
              "vit_random": {"arch": "vit", "baseline_of": "vit"}, "cnn_random": {"arch": "cnn", "baseline_of": "cnn"}}
    names = list(models)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    findings = [_pair(a, b, 0.1 * k) for k, (a, b) in enumerate(pairs)]
    points = [("vit_a", "vit_b", [0.5, 0.7]), ("vit_a", "vit_random", [0.8, 1.0]), ("other", "x", [0.0, 0.0])]
    matched = xr.Dataset({"cka": ("point", [v for *_, vs in points for v in vs])},
                         coords={"similarity": ("point", ["lin"] * 6),
                                 "model_a": ("point", [a for a, _, vs in points for _ in vs]),
                                 "model_b": ("point", [b for _, b, vs in points for _ in vs])})
    out = {(f.model_a, f.model_b): f for f in baseline_findings(findings, models, matched)}
    last = {(f.model_a, f.model_b): f.last_site_cka for f in findings}
    same = out[("vit_a", "vit_b")].baseline
    assert (same.model_a, same.model_b) == ("vit_a", "vit_random")  # same architecture: a vs its twin
    assert same.mean_matched_cka == pytest.approx(0.9) and same.pair_mean_matched_cka == pytest.approx(0.6)
    assert same.last_site_cka == last[("vit_a", "vit_random")]
    assert "mean matched-site CKA 0.90 against 0.60 for vit_a vs vit_b" in sentence(out[("vit_a", "vit_b")])
    cross = out[("vit_a", "cnn")].baseline
    assert (cross.model_a, cross.model_b) == ("vit_random", "cnn_random")  # two architectures: their twins
    assert cross.last_site_cka == last[("vit_random", "cnn_random")] and cross.mean_matched_cka is None
    assert out[("vit_a", "vit_random")].baseline is None and "Baseline" not in sentence(out[("vit_a", "vit_random")])
    assert all(f.baseline is None for f in baseline_findings(findings, {m: {"arch": "vit"} for m in models}, matched))


def test_models_keep_config_order_in_the_summary_and_figures():
    data = synthetic_report_data()
    configured = ["cnn", "vit_b_ft", "vit_a", "vit_b"]
    data = ReportData(run=data.run | {"config": {"name": "x", "models": [{"name": m} for m in configured]}},
                      samples=data.samples, models=dict(sorted(data.models.items())), similarity=data.similarity,
                      analyses={}, store_url=data.store_url)
    summary = build_summary(data)
    assert list(summary["models"]) == configured
    assert [(f["model_a"], f["model_b"]) for f in summary["findings"]][:3] == [("cnn", "vit_b_ft"), ("cnn", "vit_a"),
                                                                              ("cnn", "vit_b")]


PASSED_THROUGH = ("attrs", "config", "versions")  # the upstream stages' and the run's own metadata, as they record it


def structure(value):
    """Keys and value kinds of a JSON value (a list as the structure of its first item; what the report only
    passes through as one mapping)."""
    if isinstance(value, dict):
        return {k: "mapping" if k in PASSED_THROUGH else structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return [structure(value[0])] if value else []
    return {bool: "bool", int: "number", float: "number", str: "string", type(None): "null"}[type(value)]


def test_summary_json_keeps_its_recorded_structure(report_dir):
    """summary_structure.json: the structure of this summary.json as written before the report was driven by a
    table of sections (plus the findings' `baseline`, now always present); a change to it is a change of the
    format that readers of summary.json see."""
    recorded = json.loads(Path(__file__).with_name("summary_structure.json").read_text())
    assert structure(json.loads((report_dir / "summary.json").read_text())) == recorded


def test_points_selects_rows_by_their_coordinates():
    from tasks.report.points import points

    table = xr.Dataset({"cka": ("point", [0.1, 0.2, 0.3, 0.4])},
                       coords={"model_a": ("point", ["a", "a", "b", "a"]), "site": ("point", ["x", "y", "x", "x"])})
    assert points(table, model_a="a", site="x")["cka"].values.tolist() == [0.1, 0.4]
    assert points(table) is table and points(table, model_a="c").sizes["point"] == 0
    with pytest.raises(ValueError, match="one dimension"):
        points(table.assign_coords(other=("extra", [1])), model_a="a", other=1)


def test_a_report_drawn_again_keeps_the_figures_whose_inputs_did_not_change(report_data, report_dir, tmp_path):
    import dataclasses
    import shutil

    shutil.copytree(report_dir, tmp_path, dirs_exist_ok=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    n = len(list((tmp_path / "figures").glob("*.png")))
    ticks = []
    build_report(report_data, str(tmp_path), progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(n, n)]  # every figure kept, in one step
    halved = dataclasses.replace(report_data, similarity={k: v.copy(data=v.values * 0.5)
                                                          for k, v in report_data.similarity.items()})
    ticks.clear()
    build_report(halved, str(tmp_path), progress=lambda done, total: ticks.append((done, total)))
    after = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    heatmaps = [name for name in before if name.startswith("cka_")]
    assert ticks[0] == (n - len(heatmaps) // 2, n) and ticks[1:] == [(1, n)] * (len(heatmaps) // 2)
    assert all(after[name] != before[name] for name in heatmaps if name.endswith(".png"))
    assert all(after[name] == before[name] for name in before if not name.startswith(("cka_", "keys")))


def test_every_section_has_its_own_name_and_template_block():
    from tasks.report.sections import SECTIONS

    templates = Path(__file__).parents[2] / "tasks" / "report" / "templates"
    assert len({s.name for s in SECTIONS}) == len(SECTIONS)
    assert all((templates / s.template).is_file() for s in SECTIONS)


# ---------------------------------------------------------------- colour scale, folded pair heatmaps, config key

def _heatmap_specs(data: ReportData, color_range: str = "data"):
    from tasks.report.drawing import FigureOptions
    from tasks.report.render import figure_specs

    return [spec for section, spec in figure_specs(data, FigureOptions(color_range=color_range)) if section == "heatmaps"]


def test_every_heatmap_of_a_matrix_shares_its_colour_scale(report_data):
    from tasks.report import figures

    specs = _heatmap_specs(report_data)
    for name in report_data.cka_names:
        mine = [s for s in specs if s.name.startswith(f"cka_{name}_")]
        whole = figures.color_range(report_data.similarity[name].values)
        assert len(mine) > (1 if name == report_data.primary else 0)
        assert {s.kwargs["vrange"] for s in mine} == {whole} and {s.kwargs["scale"] for s in mine} == {"data"}
    assert len({s.kwargs["vrange"] for s in specs}) == len(report_data.cka_names)  # one scale per matrix
    pair = next(s for s in specs if s.name == f"cka_{report_data.primary}_vit_a__cnn")
    assert figures.color_range(pair.kwargs["values"]) != pair.kwargs["vrange"]  # the block alone would differ
    fig = pair.draw(**pair.kwargs)  # as the drawing workers call it
    assert fig.axes[0].images[0].get_clim() == pair.kwargs["vrange"]
    figures.plt.close(fig)
    assert {s.kwargs["vrange"] for s in _heatmap_specs(report_data, "unit")} <= {(0.0, 1.0), (min(0.0, float(np.nanmin(
        report_data.similarity["linear_unbiased_minibatch"].values))), 1.0)}


def test_the_colour_scale_is_part_of_each_heatmaps_reuse_key(report_data):
    import dataclasses

    from tasks.report.reuse import figure_keys

    specs = _heatmap_specs(report_data)
    keys = dict(zip((s.name for s in specs), figure_keys(specs)))
    unit = dict(zip((s.name for s in specs), figure_keys(_heatmap_specs(report_data, "unit"))))
    assert all(keys[n] != unit[n] for n in keys)
    # a new minimum in one block (cnn vs cnn) changes the scale of the whole matrix, so every heatmap of it is
    # drawn again, also those whose own values did not change
    cka = report_data.similarity["linear_biased"].copy()
    i = list(cka.site_a.values).index("cnn/stem/output")
    j = list(cka.site_a.values).index("cnn/layer1.0/block")
    cka[i, j] = cka[j, i] = float(np.nanmin(cka.values)) - 0.2
    changed = dataclasses.replace(report_data, similarity=dict(report_data.similarity, linear_biased=cka))
    specs2 = _heatmap_specs(changed)
    again = dict(zip((s.name for s in specs2), figure_keys(specs2)))
    untouched = next(s for s in specs2 if s.name == "cka_linear_biased_vit_a__vit_b")
    assert np.array_equal(untouched.kwargs["values"], next(s for s in specs if s.name == untouched.name).kwargs["values"])
    assert again[untouched.name] != keys[untouched.name]
    assert all(again[n] == keys[n] for n in keys if not n.startswith("cka_linear_biased_"))  # the other matrix kept


def test_pair_heatmaps_are_folded_behind_details_and_the_overviews_stay_open(report_dir, report_data):
    html = (report_dir / "index.html").read_text()
    top = html[html.index('<div class="first-screen">'):]
    assert (top.index('<section id="findings">') < top.index('<section id="heatmaps">') < top.index("</section>\n</div>")
            < top.index('<section id="guide">'))  # findings and heatmaps side by side, the other sections after them
    heatmaps = html[html.index('<section id="heatmaps">'):html.index('<section id="guide">')]
    folded = re.findall(r'<details class="folded" id="details-(cka_[^"]+)"><summary>([^<]+)</summary>\s*'
                        r'<figure id="fig-\1" class="heatmap">', heatmaps)
    pairs = [(m, m) for m in report_data.order] + [(a, b) for k, a in enumerate(report_data.order)
                                                   for b in list(report_data.order)[k + 1:]]
    assert [name for name, _ in folded] == [f"cka_linear_biased_{a}__{b}" for a, b in pairs]
    matrix = report_data.similarity["linear_biased"]
    for (name, line), (a, b) in zip(folded, pairs):
        block = matrix.sel(site_a=[s for s in matrix.site_a.values if s.startswith(a + "/")],
                           site_b=[s for s in matrix.site_b.values if s.startswith(b + "/")]).values
        cells = block[~np.eye(*block.shape, dtype=bool)] if a == b else block.ravel()
        assert line.startswith(f"{a} vs {b}: mean CKA {np.nanmean(cells):.2f}, max {np.nanmax(cells):.2f}")
        assert f"({block.shape[0]} x {block.shape[1]} sites" in line
    assert heatmaps.count("<details") == len(pairs)
    for overview in ("cka_linear_biased_all", "cka_linear_unbiased_minibatch_all"):
        at = heatmaps.index(f'<figure id="fig-{overview}"')
        assert heatmaps.count("<details", 0, at) == heatmaps.count("</details>", 0, at)  # not inside a <details>
    assert "colour range from the data" in heatmaps and "of the whole matrix" in heatmaps  # colour bar label


def test_models_table_shows_each_models_effective_preprocessing(tmp_path):
    import dataclasses

    data = synthetic_report_data()
    pre = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}
    models = {m: dict(a, preprocessing=pre) if m == "vit_a" else a for m, a in data.models.items()}
    html = Path(build_report(dataclasses.replace(data, models=models), str(tmp_path))).read_text()
    models_table = html[html.index("<h3>Models</h3>"):html.index("<h3>CKA matrices")]
    assert "<th>preprocessing (effective)</th>" in models_table
    row = next(r for r in models_table.split("<tr>") if r.startswith("<td>vit_a</td>"))
    assert ("224x224 px, bicubic resize, center crop (crop_pct 0.875), mean (0.485, 0.456, 0.406), "
            "std (0.229, 0.224, 0.225)") in row
    assert "n/a" in next(r for r in models_table.split("<tr>") if r.startswith("<td>cnn</td>"))


def test_config_color_range_reaches_the_renderer_through_the_report_stage(tmp_path):
    """`report: {color_range: unit}` in the config: the stage's fingerprint changes, the report is drawn
    0-1 (colour bar), and switching back re-renders from the data's range; a constant BatchNorm site gets
    the zero_init_last hint in the NaN table."""
    from stores import write_features

    import storage
    from flows import report as report_stage
    from flows.config import validate_config
    from flows.stages import RunContext
    from tasks.threads import ThreadPlan

    samples, features, _ = synthetic_inputs()
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, samples.assign_attrs(fingerprint="s0"))
    sites = {"a": features["vit_a"], "b": features["cnn"] | {"layer1.0/bn2": np.ones((48, 8), np.float32)}}
    for model, arrays in sites.items():
        write_features(root, model, arrays, shard_size=24)
    arrays = {f"{m}/{s}": a for m in sites for s, a in storage.activation_arrays(root, m).items()}
    with pytest.warns(Warning):  # the constant bn2 site
        storage.write_similarity(root, "linear_biased", cka_matrix(arrays))

    def context(color_range: str | None) -> RunContext:
        raw = {"store": str(tmp_path / "store"), "dataset": {"kind": "synthetic"},
               "models": [{"name": "a", "arch": "vit_tiny_patch16_224", "weights": "random:0"},
                          {"name": "b", "arch": "resnet18", "weights": "random:0"}]}
        config = validate_config(raw | ({"report": {"color_range": color_range}} if color_range else {}))
        return RunContext(config, ThreadPlan(1, 1, 1, 1, 1),
                          upstream={"samples": "s0", "models": {"a": "fp-a", "b": "fp-b"}, "similarity": {"x": "y"},
                                    "analyses": None},
                          record={"config": config.model_dump(mode="json"), "started": None, "versions": {}})

    assert context(None).config.report.color_range == "data"
    with pytest.raises(Exception, match="report.color_range"):
        context("full")
    fingerprints = {c: report_stage.REPORT_STAGE.fingerprint(context(c)) for c in ("data", "unit")}
    assert fingerprints["data"] != fingerprints["unit"] == report_stage.run(context("unit"))
    assert storage.report_fingerprint(root) == fingerprints["unit"]
    index = Path(storage.store_url(root).rstrip("/")) / "report" / "index.html"
    html = index.read_text()
    assert "(colour range 0 to 1)" in html and "colour range from the data" not in html  # the colour bars
    assert 'colour range 0 to 1' in (index.parent / "figures" / "cka_linear_biased_a__b.svg").read_text()
    nan_table = html[html.index("NaN / non-finite sites"):html.index("Other results in this store")]
    assert "b/layer1.0/bn2" in nan_table and "zero_init_last" in nan_table and "{zero_init_last: false}" in nan_table
    assert report_stage.run(context("data")) == fingerprints["data"] == storage.report_fingerprint(root)
    assert "colour range from the data" in index.read_text()
