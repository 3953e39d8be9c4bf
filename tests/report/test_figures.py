"""Figure building blocks: tick plans at 10 and 197 sites, the colour range, heatmap legends, the NaN
table grouped by site with its hints, figures drawn in worker processes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import xarray as xr

from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureSpec, draw_all
from tasks.report.sections.run import ZERO_INIT_HINT, nan_sites

VIT = ["patch_embed/output"] + [f"blocks.{i}/{s}" for i in range(12)
                                for s in ("norm1", "attn", "resid1", "norm2", "mlp", "block")] + ["norm/output"]
RESNET = ["stem/output"] + [f"layer{s}.{b}/{t}" for s in range(1, 5) for b in range(2)
                            for t in ("conv1", "bn1", "act1", "conv2", "bn2", "block")]
ALL = [f"vit_a/{s}" for s in VIT] + [f"vit_b/{s}" for s in VIT] + [f"resnet/{s}" for s in RESNET]


def test_every_label_when_it_fits():
    t = figures.site_ticks(VIT[:10], figures._side(10))
    assert t.labels == VIT[:10] and t.major == list(range(10)) and t.minor == [] and t.legend == ""
    t = figures.site_ticks(VIT, 0.75 * figures._side(len(VIT)))
    assert t.labels == VIT  # 74 ViT-S/16 sites fit on their own heatmap


def test_197_sites_get_one_labelled_tick_per_layer_and_a_sublayer_legend():
    assert len(ALL) == 197
    t = figures.site_ticks(ALL, 0.75 * figures._side(len(ALL)))
    assert t.minor == list(range(197)) and set(t.labels) <= set(ALL)
    assert [ALL[i] for i in t.major] == t.labels
    for model, blocks in (("vit_a", [f"blocks.{b}" for b in range(12)]), ("resnet", [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)])):
        starts = {label.rpartition("/")[0] for label in t.labels if label.startswith(model + "/")}
        assert {f"{model}/{b}" for b in blocks} <= starts  # every block labelled at its first site
    assert "blocks.*: norm1, attn, resid1, norm2, mlp, block" in t.legend
    assert "layer*.*: conv1, bn1, act1, conv2, bn2, block" in t.legend
    spacing = np.diff(t.major)
    assert spacing.min() >= 197 / int(0.75 * figures._side(197) * 72 / (figures.LABEL_PT * 1.3))  # no overlaps


def test_colour_range_comes_from_the_data_unless_unit():
    values = np.array([[0.931, 0.95], [np.nan, 0.998]])
    assert figures.color_range(values) == pytest.approx((0.93, 1.0))
    assert figures.color_range(values, "unit") == (0.0, 1.0)
    assert figures.color_range(np.full((2, 2), 0.5)) == pytest.approx((0.49, 0.51))
    assert figures.color_range(np.array([[-0.05, 1.0]]), "unit") == (-0.05, 1.0)
    with pytest.raises(ValueError, match="expected one of data, unit"):
        figures.color_range(values, "full")


def test_a_heatmap_draws_the_colour_range_it_is_given_and_names_it():
    values = np.array([[0.6, 0.7], [0.7, 0.8]])
    for scale, vrange, label in (("data", (0.2, 1.0), "from the data\nof the whole matrix"), ("unit", (0.0, 1.0), "0 to 1")):
        fig = figures.heatmap(values, ["m/a", "m/b"], ["m/a", "m/b"], title="t", vrange=vrange, scale=scale)
        assert fig.axes[0].images[0].get_clim() == vrange  # not the block's own range, 0.6-0.8
        assert label in fig.axes[-1].get_ylabel()  # the colour bar
        figures.plt.close(fig)


def test_heatmap_legends_name_nan_and_model_lines():
    values = np.random.default_rng(0).uniform(0.9, 1.0, (6, 6))
    values[2] = np.nan
    fig = figures.heatmap(values, [f"m/l{i}/s" for i in range(6)], [f"m/l{i}/s" for i in range(6)], title="t",
                          separators={"a": (0, 3), "b": (3, 6)})
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels == ["boundary between models", "NaN (undefined: a degenerate site)"]
    image = fig.axes[0].images[0]
    assert image.get_clim() == pytest.approx(figures.color_range(values)) and image.get_gid() == figures.HEATMAP_GID
    assert tuple(image.cmap.get_bad()) == pytest.approx(tuple(np.append(np.array(
        [int(figures.NAN_COLOR[k:k + 2], 16) for k in (1, 3, 5)]) / 255, 1.0)))
    figures.plt.close(fig)
    clean = figures.heatmap(values[:2, :2], ["a/x", "a/y"], ["a/x", "a/y"], title="t")
    assert clean.legends == []  # no NaN, no models: no legend
    figures.plt.close(clean)


def test_nan_table_has_one_row_per_site_with_a_hint_for_zero_initialised_batchnorm():
    reasons = {"resnet/layer1.0/bn2": "constant activations (zero variance)",
               "resnet/layer1.0/conv2": "constant activations (zero variance)"}
    matrix = xr.DataArray(np.eye(2), dims=("site_a", "site_b"), coords={"site_a": ["a", "b"], "site_b": ["a", "b"]})
    data = ReportData(run={}, samples=xr.Dataset(), similarity={n: matrix.assign_attrs(nan_reasons=reasons) for n in ("x", "y", "z")},
                      models={"resnet": {"nonfinite": {"layer2.0/bn1": 4}, "arch": "resnet18", "weights": "random:0"}})
    assert nan_sites(data) == [
        {"site": "resnet/layer2.0/bn1", "what": "4 non-finite activation values", "where": "activations", "hint": ""},
        {"site": "resnet/layer1.0/bn2", "what": "constant activations (zero variance)", "where": "x, y, z",
         "hint": ZERO_INIT_HINT},
        {"site": "resnet/layer1.0/conv2", "what": "constant activations (zero variance)", "where": "x, y, z", "hint": ""}]
    assert "zero_init_last" in ZERO_INIT_HINT and "arch_kwargs {zero_init_last: false}" in ZERO_INIT_HINT
    trained = ReportData(run={}, samples=xr.Dataset(), similarity={"x": matrix.assign_attrs(nan_reasons=reasons)},
                         models={"resnet": {"arch": "resnet18", "weights": "timm"}})
    assert [row["hint"] for row in nan_sites(trained)] == ["", ""]  # not the random-weights zero init


def test_the_hint_names_a_keyword_that_timm_resnet_takes():
    import inspect

    from timm.models.resnet import ResNet

    assert inspect.signature(ResNet).parameters["zero_init_last"].default is True


def _small_heatmaps() -> list[FigureSpec]:
    sites = {n: [f"m/l{i}/s" for i in range(n)] for n in (2, 3, 4)}
    return [FigureSpec(f"h{n}", f"{n} sites", figures.heatmap,
                       {"values": np.eye(n), "rows": ids, "cols": ids, "title": f"{n} sites"}, cost=n)
            for n, ids in sites.items()]


def test_figures_drawn_in_worker_processes_are_those_drawn_here():
    specs = _small_heatmaps()
    here = draw_all(specs)
    ticks = []
    there = draw_all(specs, workers=3, progress=lambda done, total: ticks.append((done, total)))
    assert [(f.name, f.png, f.svg) for f in there] == [(f.name, f.png, f.svg) for f in here]
    assert ticks == [(1, 3)] * 3


def test_figures_are_drawn_here_when_no_worker_starts(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    assert [f.name for f in draw_all(_small_heatmaps(), workers=2)] == ["h2", "h3", "h4"]
