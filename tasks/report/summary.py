"""summary.json: run, models, similarity (every CKA matrix with its labels), each section's analyses
entries and findings, and the store's other results; as plain JSON types with NaN as null."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from storage import STDERR_SUFFIX, json_safe
from tasks.report.data import ReportData
from tasks.report.sections import SECTIONS, Section
from tasks.report.sentences import entry

VIEW_KEYS = ("views", "rows", "views_by_matrix", "identity_views", "identity_rows", "rows_meaning")


def plain(value: Any) -> Any:
    """`value` as JSON types (`storage.json_safe`), NaN and infinities as None (null)."""
    return json.loads(json.dumps(json_safe(value)), parse_constant=lambda _: None)


def _describe(value: Any) -> str | None:
    """A dataset description (often a dict of kind, path, split, ...) as one line."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items() if v not in (None, "", {}))
    return None if value is None else str(value)


def _data_facts(s: xr.Dataset) -> dict[str, Any]:
    labels = s["label"].values
    names = dict(zip(labels.tolist(), s["label_name"].values.tolist())) if "label_name" in s else {}
    return {"n_samples": int(s.sizes["sample"]), "n_images": int(np.unique(s["image_index"].values).size),
            "views": int(np.unique(s["view"].values).size) if "view" in s else 1,
            "classes": [names.get(c, str(c)) for c in sorted(names)] or sorted(np.unique(labels).tolist()),
            "skipped": list(s.attrs.get("skipped", [])),
            "dataset": _describe(s.attrs.get("dataset", s.attrs.get("description"))), "seed": s.attrs.get("seed")}


def _similarity(data: ReportData, n_samples: int) -> dict[str, Any]:
    out = {}
    for name in data.cka_names:
        cka = data.similarity[name]
        out[name] = {"kernel": cka.attrs.get("kernel", "linear"), "estimator": cka.attrs.get("estimator", "biased"),
                     "views": cka.attrs.get("views", "all"), "rows": cka.attrs.get("rows", n_samples),
                     "sites": list(cka.site_a.values), "matrix": cka.values,
                     "attrs": {k: v for k, v in cka.attrs.items() if k not in ("kernel", "estimator")}}
        if name + STDERR_SUFFIX in data.similarity:
            out[name]["stderr"] = data.similarity[name + STDERR_SUFFIX].values
    return out


def build_summary(data: ReportData, sections: Sequence[Section] = SECTIONS) -> dict[str, Any]:
    """summary.json of `data`: run, models, similarity, `analyses` (each section's entries, and the views
    and rows each analysis used), each section's findings under its key, other results."""
    facts = _data_facts(data.samples)
    r = data.run
    run = {"n_samples": facts["n_samples"], "config": r.get("config", {}), "started": r.get("started"),
           "finished": r.get("finished"), "versions": r.get("versions", {}), "data": facts, "outcome": r.get("outcome"),
           "stages_done": r.get("stages_done", []), "stages": r.get("stages", {}), "threads": r.get("threads", {}),
           "fingerprints": r.get("fingerprints")}
    models = {m: {"sites": list(a.get("sites", []))} | {k: v for k, v in a.items() if k != "sites"}
              for m, a in data.models.items()}
    analyses: dict[str, Any] = {}
    for s in sections:
        if s.summary is not None and s.analysis in data.analyses:
            analyses |= s.summary(data.analyses[s.analysis])
    if data.analyses:
        analyses["views"] = {name: {k: ds.attrs[k] for k in VIEW_KEYS if k in ds.attrs}
                             for name, ds in data.analyses.items()}
    findings = {s.facts_key: [entry(f) for f in s.facts(data)] for s in sections if s.facts is not None}
    return plain({"run": run, "models": models, "similarity": _similarity(data, facts["n_samples"]),
                  "analyses": analyses} | findings | {"other_results": data.others})
