"""Fine-tuning: CKA of each fine-tuned model and of its pretrained model with every other model, at
matched sites of the first CKA matrix, and their findings."""

from __future__ import annotations

from tasks.report import figures
from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.findings import finetuning_findings
from tasks.report.points import points
from tasks.report.records import FinetuningFinding
from tasks.report.sections.pairs import per_pair
from tasks.report.sections.section import Section


def finetuning_figures(data: ReportData, options: FigureOptions) -> list[FigureSpec]:
    """Per fine-tuned model: its curves (solid) and its pretrained model's (dashed)."""
    ft = data.analyses.get("finetuning")
    if ft is None or not ft.sizes.get("point", 0) or data.primary is None:
        return []
    name, out = data.primary, []
    for f in map(str, dict.fromkeys(ft.finetuned.values)):
        curves = points(ft, finetuned=f, similarity=name)
        out.append(FigureSpec(f"finetuning_{f}", f, figures.finetuning_curves,
                              dict(ft=curves, finetuned=f, sites=data.order[f],
                                   title=f"{name}: {f} (solid) vs its pretrained model (dashed)"),
                              cost=curves.sizes["point"]))
    return out


def finetuning_facts(data: ReportData) -> list[FinetuningFinding]:
    ft = data.analyses.get("finetuning")
    return [] if ft is None or data.primary is None else finetuning_findings(ft, similarity=data.primary)


FINETUNING = Section(
    "finetuning", "Fine-tuning", analysis="finetuning",
    summary=lambda ds: {"finetuning": per_pair(ds, ("similarity", "finetuned", "pretrained", "other"), "site",
                                               ("cka_finetuned", "cka_pretrained"))},
    figures=finetuning_figures, facts=finetuning_facts, facts_key="finetuning_findings")
