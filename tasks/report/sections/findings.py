"""Findings: measured facts per model pair of the first CKA matrix, each against its random-weights
baseline where the run has one."""

from __future__ import annotations

import xarray as xr

from tasks.analyses import attribution_by_type
from tasks.report.data import ReportData
from tasks.report.findings import baseline_findings, pair_findings
from tasks.report.records import PairFinding
from tasks.report.sections.section import Section


def pair_facts(data: ReportData) -> list[PairFinding]:
    if data.primary is None:
        return []
    matched = data.analyses.get("matched_cka", xr.Dataset())
    attribution = data.analyses.get("sublayer_attribution")
    found = pair_findings(data.similarity[data.primary], matched, data.order, similarity=data.primary,
                          attribution=attribution_by_type(attribution) if attribution is not None else None,
                          probes=data.analyses.get("probes"), agreement=data.analyses.get("agreement"))
    return baseline_findings(found, data.models, matched)


FINDINGS = Section("findings", "Findings", facts=pair_facts, facts_key="findings")
