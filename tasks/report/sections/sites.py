"""Sites of a per-site analysis result, per model in depth order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tasks.report.data import ReportData


def stored_site_ids(data: ReportData, result: Any) -> Iterator[tuple[str, list[str]]]:
    """(model, its site ids present in an analysis result along `site`, in depth order), per model."""
    present = set(map(str, result.site.values))
    for model, sites in data.order.items():
        ids = [f"{model}/{s}" for s in sites if f"{model}/{s}" in present]
        if ids:
            yield model, ids
