"""CKA heatmaps: every site of every model per CKA matrix, and each model pair of the first matrix
(after that matrix's overview, folded behind <details>); one colour scale per matrix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from tasks.analyses import model_pairs
from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.sections.section import Section


def _block(cka: xr.DataArray, a: str, b: str, order: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, list, list]:
    rows = [s for s in order[a] if f"{a}/{s}" in cka.site_a.values]
    cols = [s for s in order[b] if f"{b}/{s}" in cka.site_b.values]
    return cka.sel(site_a=[f"{a}/{s}" for s in rows], site_b=[f"{b}/{s}" for s in cols]).values, rows, cols


def _heatmap(name: str, caption: str, gid: str, values: np.ndarray, rows: list[str], cols: list[str],
             folded: str = "", **kwargs) -> FigureSpec:
    return FigureSpec(name, caption, figures.heatmap, dict(values=values, rows=rows, cols=cols, gid=gid, **kwargs),
                      hover={"gid": gid, "rows": rows, "cols": cols, "values": values.tolist()},
                      cost=len(rows) + len(cols), folded=folded)


def pair_line(values: np.ndarray, same_model: bool = False) -> str:
    """The summary line of a folded pair heatmap: its mean and max CKA over the finite cells (off the
    diagonal for a model against itself, whose diagonal is 1), its size and its NaN cells."""
    rows, cols = values.shape
    off = ~np.eye(rows, cols, dtype=bool) if same_model and rows == cols else np.ones(values.shape, dtype=bool)
    finite = values[np.isfinite(values) & off]
    where = " off the diagonal" if same_model and rows == cols else ""
    stats = f"mean CKA {finite.mean():.2f}, max {finite.max():.2f}{where}" if finite.size else "no finite CKA"
    nan = int((~np.isfinite(values)).sum())
    return f"{stats} ({rows} x {cols} sites" + (f", {nan} NaN cells)" if nan else ")")


def _overview(cka: xr.DataArray, name: str, order: Mapping[str, Sequence[str]], **colours) -> FigureSpec:
    ids = [f"{m}/{s}" for m, sites in order.items() for s in sites if f"{m}/{s}" in cka.site_a.values]
    bounds, start = {}, 0
    for m in order:
        n = sum(1 for i in ids if i.startswith(m + "/"))
        if n:
            bounds[m] = (start, start + n)
        start += n
    return _heatmap(f"cka_{name}_all", f"{name}: all sites", f"hm-{name}-all", cka.sel(site_a=ids, site_b=ids).values,
                    ids, ids, separators=bounds, title=f"{name}: CKA between all sites", **colours)


def matrix_colours(cka: xr.DataArray, scale: str) -> dict[str, object]:
    """The colour scale of one CKA matrix, over the whole matrix: the `figures.heatmap` arguments that every
    heatmap drawn from it shares (so its colours compare across the overview and the pair heatmaps)."""
    return {"vrange": figures.color_range(np.asarray(cka.values, dtype=float), scale), "scale": scale}


def heatmap_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    """Per CKA matrix its overview (shown open); for the first matrix, then each model pair (folded behind
    <details>, its mean and max CKA on the summary line). All heatmaps of a matrix share its colour scale."""
    order, out = data.order, []
    for name in data.cka_names:
        cka = data.similarity[name]
        colours = matrix_colours(cka, options.color_range)
        out.append(_overview(cka, name, order, **colours))
        if name != data.primary:
            continue
        for a, b in [(m, m) for m in order] + model_pairs(list(order)):
            values, rows, cols = _block(cka, a, b, order)
            if values.size:
                out.append(_heatmap(f"cka_{name}_{a}__{b}", f"{a} vs {b}", f"hm-{name}-{a}--{b}", values, rows, cols,
                                    folded=pair_line(values, same_model=a == b), title=f"{name}: {a} (rows) vs {b} (columns)",
                                    ylabel=a, xlabel=b, **colours))
    return out


HEATMAPS = Section("heatmaps", "CKA heatmaps", nav="Heatmaps", figures=heatmap_figures)
