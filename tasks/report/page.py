"""index.html: the page template (`templates/report.html.j2`) with each section's block, self-contained
(heatmaps as inline SVG, other figures as embedded PNG). The sections of `FIRST_SCREEN` (the findings and the
heatmaps, whose matrix overviews stay open and whose pair heatmaps are folded) stand side by side at the top of
a wide window, so the first screen shows the findings and the overview."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from tasks.report.data import ReportData
from tasks.report.drawing import FigureFile
from tasks.report.sections import FIRST_SCREEN, SECTIONS, Section
from tasks.report.sections.run import duration


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_html(data: ReportData, summary: Mapping[str, Any], figures: Mapping[str, Sequence[FigureFile]],
                sections: Sequence[Section] = SECTIONS, *, color_range: str = "data") -> str:
    """The page of `sections` in their order; `figures`: section name -> its drawn figures; color_range: the
    heatmaps' colour scale (`FigureOptions.color_range`), which the page names. The leading sections named in
    `FIRST_SCREEN` go side by side in one block at the top."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("tasks.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["num"] = _num
    first = [s.name for s in sections[:len(FIRST_SCREEN)]]
    first = first if first == list(FIRST_SCREEN) else []
    return env.get_template("report.html.j2").render(
        title=data.run.get("config", {}).get("name", "ckaflow"), store=data.store_url, summary=summary,
        data=summary["run"]["data"], duration=duration(data.run), order=data.order,
        similarity_info={n: summary["similarity"][n] for n in data.cka_names}, analyses=summary["analyses"],
        sections=sections, first_screen=first, section_figures={s.name: figures.get(s.name, []) for s in sections},
        section_views={s.name: s.view(data) if s.view is not None else None for s in sections},
        color_range=color_range)
