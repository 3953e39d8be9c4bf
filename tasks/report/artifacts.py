"""What the orchestrator publishes beside the report: a markdown summary of the findings, the sections'
tables and the report's link."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.report.data import ReportData
from tasks.report.sections import SECTIONS, Section
from tasks.report.summary import plain


@dataclass
class ReportArtifacts:
    """A markdown summary, tables (key -> rows and description) and the report's link."""

    markdown: str
    tables: dict[str, tuple[list[dict[str, Any]], str]]
    link: str


def report_artifacts(data: ReportData, summary: Mapping[str, Any], index: str,
                     sections: Sequence[Section] = SECTIONS) -> ReportArtifacts:
    """Markdown summary (every section's findings), the sections' tables (`ckaflow-<section>`) and the link
    to the report at `index`."""
    lines = [f"# ckaflow report: {data.run.get('config', {}).get('name', '')}",
             f"{summary['run']['n_samples']} samples, {len(data.models)} models, CKA matrices: "
             f"{', '.join(data.cka_names) or 'none'}.", "", "## Findings", ""]
    lines += [f"- {f['text']}" for s in sections if s.facts_key for f in summary[s.facts_key]] \
        or ["- none (no CKA matrix)"]
    tables = {}
    for s in sections:
        table = s.table(data, summary) if s.table is not None else None
        if table is not None:
            rows, description = table
            tables[f"ckaflow-{s.name}"] = (plain(rows), description)
    link = index if "://" in index else Path(index).resolve().as_uri()
    return ReportArtifacts("\n".join(lines), tables, link)
