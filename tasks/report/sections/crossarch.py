"""CKA across architectures: best-matching and depth-aligned CKA for model pairs with different site
names (`crossarch_cka`), on the first CKA matrix, and their findings."""

from __future__ import annotations

from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.findings import crossarch_findings
from tasks.report.points import points
from tasks.report.records import CrossarchFinding
from tasks.report.sections.pairs import per_pair
from tasks.report.sections.section import Section


def crossarch_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    """Per model a: its pairs with the models of other site names."""
    cross = data.analyses.get("crossarch_cka")
    if cross is None or not cross.sizes.get("point", 0) or data.primary is None:
        return []
    name, out = data.primary, []
    for a in data.order:
        pairs = points(cross, similarity=name, model_a=a)
        if pairs.sizes["point"]:
            title = f"{name}: {a} vs models with other site names"
            out.append(FigureSpec(f"crossarch_{name}_{a}", title, figures.crossarch_curves,
                                  dict(cross=pairs, model_a=a, title=title), cost=pairs.sizes["point"]))
    return out


def crossarch_facts(data: ReportData) -> list[CrossarchFinding]:
    cross = data.analyses.get("crossarch_cka")
    return [] if cross is None or data.primary is None else crossarch_findings(cross, similarity=data.primary)


CROSSARCH = Section(
    "crossarch", "CKA across architectures", nav="Across architectures", analysis="crossarch_cka",
    summary=lambda ds: {"crossarch_cka": per_pair(ds, ("similarity", "model_a", "model_b"), "site",
                                                  ("best_cka", "best_site", "best_relative_depth", "aligned_cka",
                                                   "aligned_site", "relative_depth"))},
    figures=crossarch_figures, facts=crossarch_facts, facts_key="crossarch_findings")
