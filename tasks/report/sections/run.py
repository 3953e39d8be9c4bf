"""Run summary: data, models, CKA matrices and timings, rows and views, skipped images, NaN sites,
other results in the store, versions."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tasks.report.data import ReportData
from tasks.report.sections.section import Section


def duration(run: Mapping[str, Any]) -> str | None:
    try:
        seconds = (datetime.fromisoformat(run["finished"]) - datetime.fromisoformat(run["started"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None
    return f"{seconds:.0f} s"


def nan_sites(data: ReportData) -> list[dict[str, Any]]:
    """One row per site with non-finite activations or NaN CKA: its reasons and where they were seen."""
    rows: dict[str, dict[str, dict[str, None]]] = {}

    def note(site: str, what: str, where: str) -> None:
        entry = rows.setdefault(site, {"what": {}, "where": {}})
        entry["what"][what] = None
        entry["where"][where] = None

    for m, attrs in data.models.items():
        for site, count in (attrs.get("nonfinite") or {}).items():
            if count:
                note(f"{m}/{site}", f"{count} non-finite activation values", "activations")
    for name, cka in data.similarity.items():
        reasons = cka.attrs.get("nan_reasons") or {}
        for site, reason in (reasons.items() if isinstance(reasons, Mapping) else enumerate(reasons)):
            note(str(site), str(reason), name)
    return [{"site": site, "what": "; ".join(e["what"]), "where": ", ".join(e["where"])} for site, e in rows.items()]


RUN = Section("run", "Run summary", nav="Run", view=nan_sites)
