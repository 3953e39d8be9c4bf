"""Run summary: data, models (with their effective preprocessing), CKA matrices and timings, rows and views,
skipped images, NaN sites (with a hint where the cause is known), other results in the store, versions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import re
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


ZERO_INIT_HINT = ("timm zero-initialises the last BatchNorm of each residual block (zero_init_last); with random "
                  "weights its output is constant \u2014 use trained weights or arch_kwargs {zero_init_last: false}")
BATCHNORM = re.compile(r"^(bn\d*|.*batch_?norm.*)$", re.IGNORECASE)  # the sublayer part of a site name


def nan_hint(site: str, reasons: Sequence[str], model: Mapping[str, Any] | None) -> str:
    """What to do about a NaN site, where its cause is known ('' otherwise): a BatchNorm site (`bn2` of a
    ResNet basic block, `bn3` of a bottleneck, any `bn<k>`) with constant activations under random weights
    (or weights the store does not name) is timm's zero-initialised last BatchNorm of a residual block."""
    sublayer = site.rpartition("/")[2]
    weights = str((model or {}).get("weights") or "")
    random_weights = not weights or weights.startswith("random")
    if BATCHNORM.match(sublayer) and random_weights and any(r.startswith("constant activations") for r in reasons):
        return ZERO_INIT_HINT
    return ""


def nan_sites(data: ReportData) -> list[dict[str, Any]]:
    """One row per site with non-finite activations or NaN CKA: its reasons, where they were seen, and a
    hint (`nan_hint`) where the cause is known."""
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
    return [{"site": site, "what": "; ".join(e["what"]), "where": ", ".join(e["where"]),
             "hint": nan_hint(site, list(e["what"]), data.models.get(site.partition("/")[0]))}
            for site, e in rows.items()]


def _numbers(values: Any) -> str:
    return ", ".join(f"{v:.3g}" for v in values) if isinstance(values, (list, tuple)) else str(values)


def describe_preprocessing(config: Mapping[str, Any] | None) -> str:
    """A model's effective preprocessing (its `preprocessing` attrs: timm's data config after the
    overrides) in one line: input size, resize and crop, mean and std; '' when the store has none."""
    if not config:
        return ""
    size = config.get("input_size")
    parts = [f"{size[-2]}x{size[-1]} px" if isinstance(size, (list, tuple)) and len(size) >= 2 else f"input {size}"]
    if config.get("resize") is False:
        parts.append("as the images are (no resize or crop)")
    else:
        pct = config.get("crop_pct")
        parts.append(f"{config.get('interpolation') or 'default'} resize, {config.get('crop_mode') or 'center'} crop"
                     + (f" (crop_pct {pct:g})" if isinstance(pct, (int, float)) else ""))
    if "mean" in config:
        parts.append(f"mean ({_numbers(config['mean'])})")
    if "std" in config:
        parts.append(f"std ({_numbers(config['std'])})")
    return ", ".join(parts)


def run_view(data: ReportData) -> dict[str, Any]:
    """What the block shows beyond summary.json: the NaN table and each model's preprocessing in one line."""
    return {"nan_sites": nan_sites(data),
            "preprocessing": {m: describe_preprocessing(a.get("preprocessing")) for m, a in data.models.items()}}


RUN = Section("run", "Run summary", nav="Run", view=run_view)
