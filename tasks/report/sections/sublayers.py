"""Sublayer attribution: matched-site CKA change per sublayer type, for same-architecture pairs."""

from __future__ import annotations

from typing import Any

import xarray as xr

from tasks.analyses import attribution_by_type
from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.sections.pairs import per_pair
from tasks.report.sections.section import Section


def sublayer_summary(ds: xr.Dataset) -> dict[str, Any]:
    return {"sublayer_attribution": [{"similarity": k[0], "model_a": k[1], "model_b": k[2], "by_type": v}
                                     for k, v in attribution_by_type(ds).items()],
            "sublayer_transitions": per_pair(ds, ("similarity", "model_a", "model_b"), "to_site", ("delta",))}


def sublayer_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    """Per CKA matrix: grouped bars of every pair's summed change per sublayer type."""
    attribution = data.analyses.get("sublayer_attribution")
    if attribution is None:
        return []
    by_pair, out = attribution_by_type(attribution), []
    for name in data.cka_names:
        chosen = {f"{k[1]} vs {k[2]}": v for k, v in by_pair.items() if k[0] == name}
        if chosen:
            out.append(FigureSpec(f"sublayers_{name}", name, figures.sublayer_bars,
                                  dict(by_type=chosen,
                                       title=f"{name}: CKA change per sublayer type (same-architecture pairs)"),
                                  cost=len(chosen)))
    return out


SUBLAYERS = Section("sublayers", "Sublayer attribution", nav="Sublayers", analysis="sublayer_attribution",
                    summary=sublayer_summary, figures=sublayer_figures)
