"""Stage 5, the report: what a user reads. `render_report` (store in, report/ out: summary.json,
results.nc, index.html and figures), `build_report` (the same from a `data.ReportData`), and the
artifacts published beside it (`ReportArtifacts`). Machinery: `sections` (the table of what the report
shows), `data`, `summary`, `drawing`, `figures`, `findings` / `records` / `sentences`, `page`, `results`.
Names are imported on first use (`storage.lazy`)."""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "artifacts": ("ReportArtifacts",),
    "render": ("build_report", "render_report"),
})
