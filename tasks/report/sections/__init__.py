"""The report's sections, in page order: the one table that says what the report shows. Each entry
(`Section`) brings its summary.json entries, figures, findings, published tables and template block;
adding an analysis to the report is one new entry."""

from tasks.report.sections.agreement import AGREEMENT
from tasks.report.sections.crossarch import CROSSARCH
from tasks.report.sections.depth import DEPTH
from tasks.report.sections.findings import FINDINGS
from tasks.report.sections.finetuning import FINETUNING
from tasks.report.sections.heatmaps import HEATMAPS
from tasks.report.sections.probes import PROBES
from tasks.report.sections.run import RUN
from tasks.report.sections.section import Section
from tasks.report.sections.sublayers import SUBLAYERS
from tasks.report.sections.targets import TARGETS

SECTIONS: tuple[Section, ...] = (
    FINDINGS,
    HEATMAPS,
    Section("guide", "Reading guide"),
    RUN,
    DEPTH,
    CROSSARCH,
    SUBLAYERS,
    TARGETS,
    PROBES,
    AGREEMENT,
    FINETUNING,
    Section("uncertainty", "Uncertainty"),
)
FIRST_SCREEN: tuple[str, ...] = ("findings", "heatmaps")  # side by side at the top of the page (`page.py`)
ANALYSES: tuple[str, ...] = tuple(s.analysis for s in SECTIONS if s.analysis)  # the analyses/ results shown

__all__ = ["ANALYSES", "FIRST_SCREEN", "SECTIONS", "Section"]
