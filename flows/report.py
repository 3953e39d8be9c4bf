"""Stage 5: render report/ (index.html, figures, summary.json) and the Prefect artifacts."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

import storage
from tasks.report import render_report


@task(name="render-report", retries=1, retry_delay_seconds=5)
def report_task(store_url: str) -> str:
    """Render the report from the store; returns the path or URL of index.html."""
    index = render_report(storage.open_store(store_url), prefect_artifacts=True)
    get_run_logger().info("report: %s", index)
    return index


@flow(name="ckaflow-report")
def report_stage(store_url: str) -> str:
    """Always re-rendered: cheap, and it must reflect the store as it is now."""
    return report_task(store_url)
