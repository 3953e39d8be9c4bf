"""Cross-model CKA by depth: CKA between same-named sites of two models (`matched_cka`)."""

from __future__ import annotations

from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.points import points
from tasks.report.sections.pairs import per_pair
from tasks.report.sections.section import Section


def depth_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    """Per CKA matrix and model a: the matched curves of a with each other model."""
    matched = data.analyses.get("matched_cka")
    if matched is None or not matched.sizes.get("point", 0):
        return []
    out = []
    for name in data.cka_names:
        for a, sites in data.order.items():
            curves = points(matched, similarity=name, model_a=a)
            if curves.sizes["point"]:
                out.append(FigureSpec(f"depth_{name}_{a}", f"{name}: pairs with {a}", figures.depth_curves,
                                      dict(matched=curves, sites=sites,
                                           title=f"{name}: CKA at matched sites, {a} vs each model"),
                                      cost=curves.sizes["point"]))
    return out


DEPTH = Section(
    "depth", "Cross-model CKA by depth", nav="CKA by depth", analysis="matched_cka",
    summary=lambda ds: {"matched_cka": per_pair(ds, ("similarity", "model_a", "model_b"), "site",
                                                ("cka", "stderr", "boot_low", "boot_high"))},
    figures=depth_figures)
