"""Stage 5, the report: what a user reads. `render` (collect the store's results, summary.json, results.nc,
index.html from `templates/`), `figures` (matplotlib), `findings` (measured facts as sentences)."""

from tasks.report.findings import baseline_findings, crossarch_findings, finetuning_findings, pair_findings
from tasks.report.render import (
                                 ReportArtifacts,
                                 ReportData,
                                 build_report,
                                 build_summary,
                                 collect,
                                 render_report,
                                 report_artifacts,
                                 results_dataset,
)

__all__ = ["ReportArtifacts", "ReportData", "baseline_findings", "build_report", "build_summary", "collect", "crossarch_findings",
           "finetuning_findings", "pair_findings",
           "render_report", "report_artifacts", "results_dataset"]
