"""Target alignment: CKA of each site with the label kernel and the instance-identity kernel."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.sections.section import Section
from tasks.report.sections.sites import stored_site_ids

STYLES = {"labels": "-", "identity": "--"}


def target_summary(ds: xr.Dataset) -> dict[str, Any]:
    ta = ds["cka"]
    return {"target_alignment": {"sites": list(ta.site.values), "attrs": dict(ta.attrs)}
            | {str(t): ta.sel(target=t).values for t in ta.target.values}}


def target_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    t = data.analyses.get("target_alignment")
    if t is None:
        return []
    return [FigureSpec("target_alignment", "target alignment", figures.by_depth,
                       dict(values=t["cka"], styles=STYLES, ylabel="CKA with target kernel",
                            title="CKA with the label kernel (solid) and the instance-identity kernel (dashed)"),
                       cost=t.sizes["site"])]


def target_rows(data: ReportData) -> list[dict[str, Any]]:
    """Per model: each target's CKA at the middle and last site, and its maximum."""
    t = data.analyses.get("target_alignment")
    if t is None:
        return []
    rows = []
    for m, ids in stored_site_ids(data, t):
        row = {"model": m}
        for target in t.target.values:
            values = t["cka"].sel(site=ids, target=target).values
            mid = len(ids) // 2
            row[str(target)] = {"middle": float(values[mid]), "middle_site": ids[mid], "last": float(values[-1]),
                                "max": float(np.nanmax(values)) if np.isfinite(values).any() else None}
        rows.append(row)
    return rows


TARGETS = Section("targets", "Target alignment", analysis="target_alignment", summary=target_summary,
                  figures=target_figures, view=target_rows)
