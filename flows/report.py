"""Stage 5: render report/ (index.html, figures, summary.json) and, under Prefect, the run's artifacts.

The store decides what is done, as for every stage: the report is rendered again only when the
fingerprints it is drawn from (sample, activations, matrices, analyses, the run's name, the config's
`report` settings) changed, or when it is refreshed; `ckaflow report STORE` re-renders on demand."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import storage
from flows.config import RunConfig
from flows.logs import run_logger
from flows.progress import progress_bar
from flows.runner import in_prefect_run, unit
from flows.stages import RunContext, Stage

REPORT = "report"


def publish_artifacts(artifacts: Any) -> None:
    """The report's markdown summary, tables and link as Prefect artifacts of the current run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    create_markdown_artifact(markdown=artifacts.markdown, key="ckaflow-summary", description="ckaflow findings")
    for key, (rows, description) in artifacts.tables.items():
        create_table_artifact(table=rows, key=key, description=description)
    create_link_artifact(link=artifacts.link, link_text="ckaflow HTML report", key="ckaflow-report")


def render(store_url: str, run: dict[str, Any] | None = None, color_range: str | None = None) -> str:
    """Render the report of `run` (a run record; default the store's last successful run) from the
    store, heatmap colours by `color_range` (the config's `report.color_range`; default: the run's);
    returns the path or URL of index.html."""
    from tasks.report import render_report

    publish = publish_artifacts if in_prefect_run() else None
    with progress_bar("report", None, "figures") as advance:
        index = render_report(storage.open_store(store_url), run=run, color_range=color_range, publish=publish,
                              progress=advance)
    run_logger().info("report: %s", index)
    return index


def report_inputs(context: RunContext) -> dict[str, Any]:
    """What the report is drawn from: every upstream fingerprint (models in config order), the run's name,
    the config's `report` settings and the version of ckaflow that draws it."""
    upstream = context.upstream
    return {"samples": upstream["samples"], "activations": [[m, fp] for m, fp in upstream["models"].items()],
            "similarity": upstream["similarity"], "analyses": upstream["analyses"], "name": context.config.name,
            "report": context.config.report.model_dump(mode="json"), "ckaflow": metadata.version("ckaflow")}


def _render_recorded(store_url: str, run: dict[str, Any], inputs: dict[str, Any]) -> str:
    index = render(store_url, run, inputs["report"]["color_range"])
    storage.record_report(storage.open_store(store_url), inputs)
    return index


def run(context: RunContext) -> str:
    """The report of this run unless the store holds one drawn from the same inputs; returns its fingerprint."""
    inputs = report_inputs(context)
    expected = storage.fingerprint(inputs)
    if storage.report_fingerprint(context.root) == expected:
        run_logger().info("report: up to date in the store (fingerprint %s)", expected)
        return expected
    record = dict(context.record, outcome=storage.SUCCEEDED, finished=datetime.now(timezone.utc).isoformat(),
                  stages_done=[*context.record.get("stages_done", []), REPORT])
    unit("render-report", _render_recorded, context.config.store, record, inputs, retries=1, delay=5)
    return expected


def forget(root: Any, config: RunConfig) -> list[str]:
    storage.forget_report(root)
    return ["report record"]


REPORT_STAGE = Stage(name=REPORT, output="report", run=run, forget=forget,
                     fingerprint=lambda context: storage.fingerprint(report_inputs(context)))
