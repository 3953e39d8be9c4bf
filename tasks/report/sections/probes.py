"""Linear probes: test accuracy per site, against chance; degenerate sites marked."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.sections.section import Rows, Section
from tasks.report.sections.sites import stored_site_ids


def probe_summary(ds: xr.Dataset) -> dict[str, Any]:
    return {"probes": {"sites": list(ds.site.values), "test_accuracy": ds["test_accuracy"].values,
                       "train_accuracy": ds["train_accuracy"].values, "backend": ds["backend"].values,
                       "converged": ds["converged"].values, "attrs": dict(ds.attrs)}}


def degenerate_sites(data: ReportData) -> dict[str, str]:
    """Site id -> reason, for the sites any CKA matrix reports as degenerate (NaN rows)."""
    out: dict[str, str] = {}
    for cka in data.similarity.values():
        reasons = cka.attrs.get("nan_reasons") or {}
        if isinstance(reasons, Mapping):
            out.update({str(k): str(v) for k, v in reasons.items()})
    return out


def probe_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    p = data.analyses.get("probes")
    if p is None:
        return []
    n_classes = len(np.unique(data.samples["label"].values))
    return [FigureSpec("probe_accuracy", "probe accuracy", figures.by_depth,
                       dict(values=p["test_accuracy"], ylabel="test accuracy", degenerate=degenerate_sites(data),
                            chance=1 / n_classes if n_classes else None, title="Linear probe test accuracy per site"),
                       cost=p.sizes["site"])]


def probe_rows(data: ReportData) -> Rows:
    """Per model: test accuracy at its last site and at its best site, and the solvers used."""
    p = data.analyses.get("probes")
    if p is None:
        return []
    rows = []
    for m, ids in stored_site_ids(data, p):
        acc = p["test_accuracy"].sel(site=ids).values
        best = int(np.argmax(acc))
        rows.append({"model": m, "last_site": ids[-1], "last": float(acc[-1]), "best_site": ids[best],
                     "best": float(acc[best]), "backend": ", ".join(sorted(set(p["backend"].sel(site=ids).values)))})
    return rows


def probe_table(data: ReportData, summary: Mapping[str, Any]) -> tuple[Rows, str] | None:
    rows = probe_rows(data)
    return (rows, "linear probe test accuracy") if rows else None


PROBES = Section("probes", "Linear probes", nav="Probes", analysis="probes", summary=probe_summary,
                 figures=probe_figures, view=probe_rows, table=probe_table)
