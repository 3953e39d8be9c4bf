"""One part of the report: what it adds to summary.json, the figures it draws, the findings it states,
the tables it publishes beside the report, and its block of the page (`templates/section_<name>.html.j2`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xarray as xr

from tasks.report.data import ReportData
from tasks.report.drawing import FigureOptions, FigureSpec
from tasks.report.records import Finding

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Section:
    """name: the page's anchor (`<section id=...>`), the key of its figures and its template block's name;
    title: its heading; nav: its link in the navigation bar (default: the title).
    analysis: the `analyses/` result it shows (read from the store for it); summary: its entries of
    summary.json's `analyses`, from that result (called only when the store holds it).
    figures: the figures it draws (`FigureOptions`: how); facts, under summary.json's `facts_key`: its findings.
    view: what its block shows beyond summary.json (rows of a table), as `view` in the block;
    table: (rows, description) of a Prefect table artifact `ckaflow-<name>`, or None."""

    name: str
    title: str
    nav: str = ""
    analysis: str | None = None
    summary: Callable[[xr.Dataset], Mapping[str, Any]] | None = None
    figures: Callable[[ReportData, FigureOptions], Sequence[FigureSpec]] | None = None
    facts: Callable[[ReportData], Sequence[Finding]] | None = None
    facts_key: str | None = None
    view: Callable[[ReportData], Any] | None = None
    table: Callable[[ReportData, Mapping[str, Any]], tuple[Rows, str] | None] | None = None

    def __post_init__(self) -> None:
        if (self.facts is None) != (self.facts_key is None):
            raise ValueError(f"section {self.name!r}: `facts` and `facts_key` go together")
        if self.summary is not None and self.analysis is None:
            raise ValueError(f"section {self.name!r}: a `summary` is drawn from its `analysis`, which is missing")

    @property
    def template(self) -> str:
        return f"section_{self.name}.html.j2"

    @property
    def link(self) -> str:
        return self.nav or self.title
