"""Prediction agreement of the models' last-site probes: same class, Cohen's kappa, error consistency."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import xarray as xr

from tasks.analyses import AGREEMENT_VARS
from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.sections.section import Rows, Section


def agreement_summary(ds: xr.Dataset) -> dict[str, Any]:
    return {"agreement": {"models": list(ds.model_a.values), "site": list(ds.site.values),
                          "accuracy": ds["accuracy"].values} | {v: ds[v].values for v in AGREEMENT_VARS}}


def agreement_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    g = data.analyses.get("agreement")
    return [] if g is None else [FigureSpec("agreement", "agreement", figures.agreement_panels, dict(agreement=g),
                                            cost=g.sizes["model_a"] ** 2)]


def agreement_table(data: ReportData, summary: Mapping[str, Any]) -> tuple[Rows, str] | None:
    """One row per pair of models, from summary.json's agreement matrices."""
    g = summary["analyses"].get("agreement")
    if not g:
        return None
    rows = [{"model_a": a, "model_b": b, **{v: g[v][i][j] for v in AGREEMENT_VARS}}
            for i, a in enumerate(g["models"]) for j, b in enumerate(g["models"]) if i < j]
    return rows, "last-site probe agreement"


AGREEMENT = Section("agreement", "Prediction agreement", nav="Agreement", analysis="agreement",
                    summary=agreement_summary, figures=agreement_figures, table=agreement_table)
