"""Stage 5: render report/ (index.html, figures, summary.json) and the Prefect artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

import storage
from flows.errors import retry_transient
from flows.progress import progress_bar
from tasks.report import ReportArtifacts, render_report


def publish_artifacts(artifacts: ReportArtifacts) -> None:
    """The report's markdown summary, tables and link as Prefect artifacts of the current run."""
    create_markdown_artifact(markdown=artifacts.markdown, key="ckaflow-summary", description="ckaflow findings")
    for key, (rows, description) in artifacts.tables.items():
        create_table_artifact(table=rows, key=key, description=description)
    create_link_artifact(link=artifacts.link, link_text="ckaflow HTML report", key="ckaflow-report")


@task(name="render-report", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=retry_transient)
def report_task(store_url: str, run: dict[str, Any] | None = None) -> str:
    """Render the report of `run` (a run record; default the store's last successful run) from the
    store; returns the path or URL of index.html."""
    with progress_bar("report", None, "figures") as advance:
        index = render_report(storage.open_store(store_url), run=run, publish=publish_artifacts, progress=advance)
    get_run_logger().info("report: %s", index)
    return index


@flow(name="ckaflow-report")
def report_stage(store_url: str, run: dict[str, Any] | None = None) -> str:
    """Always re-rendered: cheap, and it must reflect the store as it is now."""
    return report_task(store_url, run)
