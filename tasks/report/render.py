"""The report: report/index.html (self-contained), report/figures/*.png and *.svg, report/summary.json
(every number, labelled), report/results.nc (the matrices and analyses as one xarray Dataset), written
next to the run store's data (`<store>/report/`, any fsspec URL).

`render_report` reads the store (`data.collect`) and writes the report (`build_report`, pure: data ->
files), both driven by the table of sections (`sections.SECTIONS`), and, when asked, publishes the
Prefect artifacts (`artifacts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tasks.report.artifacts import ReportArtifacts, report_artifacts
from tasks.report.data import ReportData, collect
from tasks.report.drawing import FigureFile, FigureOptions, FigureSpec, Progress, draw_all
from tasks.report.page import render_html
from tasks.report.results import results_dataset
from tasks.report.reuse import FORMATS, figure_keys, forget_keys, kept_figures, record_keys
from tasks.report.sections import ANALYSES, SECTIONS, Section
from tasks.report.summary import build_summary
from tasks.threads import available_cores


def default_workers() -> int:
    """Processes that draw figures: the cores this process may use (`tasks.threads.available_cores`), at most 4."""
    return min(4, available_cores())


def figure_specs(data: ReportData, options: FigureOptions = FigureOptions(),
                 sections: Sequence[Section] = SECTIONS) -> list[tuple[str, FigureSpec]]:
    """(section name, figure) for every figure of every section, in page order."""
    return [(s.name, spec) for s in sections if s.figures is not None for spec in s.figures(data, options)]


def configured_color_range(data: ReportData) -> str:
    """The run config's `report.color_range` (as the run record keeps the config), "data" when it has none."""
    report = (data.run.get("config") or {}).get("report") or {}
    return str(report.get("color_range") or "data")


def build_report(data: ReportData, out_url: str, summary: Mapping[str, Any] | None = None, *,
                 color_range: str | None = None, workers: int | None = None, progress: Progress | None = None) -> str:
    """Write index.html, figures/, summary.json and results.nc under `out_url` (a directory path or
    fsspec URL); returns the path/URL of index.html. color_range: the colour scale of each CKA matrix,
    shared by all its heatmaps, "data" or "unit" (0-1) (default: the run config's `report.color_range`,
    else "data"); workers:
    processes drawing figures, this one included (default `default_workers()`); figures whose inputs did
    not change since the last report there are kept (`reuse`); progress: `(figures done now, figures in all)`."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(out_url)
    fs.makedirs(f"{base}/figures", exist_ok=True)
    summary = summary if summary is not None else build_summary(data)
    options = FigureOptions(color_range=configured_color_range(data) if color_range is None else color_range)
    placed = figure_specs(data, options)
    specs = [spec for _, spec in placed]
    keys = figure_keys(specs)
    kept = kept_figures(fs, base, specs, keys)
    forget_keys(fs, base)
    files = draw_all(specs, workers=default_workers() if workers is None else workers, kept=kept, progress=progress)
    fs.pipe({f"{base}/figures/{f.name}.{fmt}": getattr(f, fmt) for i, f in enumerate(files) if i not in kept
             for fmt in FORMATS})
    record_keys(fs, base, specs, keys)
    figs: dict[str, list[FigureFile]] = {}
    for (section, _), file in zip(placed, files):
        figs.setdefault(section, []).append(file)
    fs.pipe_file(f"{base}/summary.json", json.dumps(summary, indent=1).encode())
    fs.pipe_file(f"{base}/results.nc", results_dataset(data).to_netcdf(engine="scipy"))
    fs.pipe_file(f"{base}/index.html", render_html(data, summary, figs, color_range=options.color_range).encode("utf-8"))
    return out_url.rstrip("/") + "/index.html"


def render_report(root: Any, *, run: Mapping[str, Any] | None = None, color_range: str | None = None,
                  publish: Callable[[ReportArtifacts], None] | None = None, progress: Progress | None = None) -> str:
    """Render `<store>/report/` from the store; returns the path or URL of report/index.html.
    run: the run record to report (default: the last successful run); color_range: "data" or "unit"
    (default: that run's config `report.color_range`, see `build_report`); publish: called with the report's
    artifacts (the flows publish them to Prefect); progress: `progress(figures done now, figures in all)`."""
    data = collect(root, run, analyses=ANALYSES)
    summary = build_summary(data)
    index = build_report(data, data.store_url.rstrip("/") + "/report", summary, color_range=color_range,
                         progress=progress)
    if publish is not None:
        publish(report_artifacts(data, summary, index))
    return index
