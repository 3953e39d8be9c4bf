"""Findings: measured facts as typed records (`records`), per model pair and for fine-tuned models and
pairs of different architectures; `sentences` states them in words.

Pair facts (each None when its inputs are missing): where matched-site CKA first drops below the threshold
(0.5), where it is lowest, which sublayer type loses the most CKA summed over depth, the CKA between
the two models' last sites, probe test accuracy at each model's last site and the gap, and the
agreement of those last-site probes. Statements only, no interpretation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from tasks.analyses import AGREEMENT_VARS, flat_matrix, model_pairs
from tasks.report.points import points
from tasks.report.records import (
    Baseline,
    CrossarchFinding,
    FinetuningFinding,
    PairFinding,
    PredictionAgreement,
    ProbeGap,
    SitePoint,
    SublayerLoss,
    UndefinedSpan,
    WeakestMatch,
)

THRESHOLD = 0.5


def _site_point(curve: xr.Dataset, i: int) -> SitePoint:
    return SitePoint(str(curve.site.values[i]), int(curve.depth.values[i]), float(curve["cka"].values[i]))


def _first_below(curve: xr.Dataset, threshold: float) -> SitePoint | None:
    below = np.flatnonzero(curve["cka"].values < threshold)
    return _site_point(curve, int(below[0])) if below.size else None


def _minimum(curve: xr.Dataset) -> SitePoint | None:
    values = curve["cka"].values
    return _site_point(curve, int(np.nanargmin(values))) if np.isfinite(values).any() else None


def _probe_gap(probes: xr.Dataset | None, order: Mapping[str, Sequence[str]], a: str, b: str) -> ProbeGap | None:
    if probes is None:
        return None
    ids = {m: f"{m}/{order[m][-1]}" for m in (a, b)}
    if not all(sid in probes.site.values for sid in ids.values()):
        return None
    acc = {m: float(probes["test_accuracy"].sel(site=sid)) for m, sid in ids.items()}
    return ProbeGap(ids[a], ids[b], acc[a], acc[b], acc[a] - acc[b])


def _agreement(agreement: xr.Dataset | None, a: str, b: str) -> PredictionAgreement | None:
    if agreement is None or a not in agreement.model_a.values or b not in agreement.model_b.values:
        return None
    return PredictionAgreement(*(float(agreement[v].sel(model_a=a, model_b=b)) for v in AGREEMENT_VARS))


def _undefined_spans(curve: xr.Dataset) -> tuple[UndefinedSpan, ...]:
    """Each run of matched sites with undefined CKA and the defined CKA just before and after it."""
    values, sites = curve["cka"].values, [str(s) for s in curve.site.values]
    spans, start = [], None
    for i, v in enumerate(list(values) + [0.0]):
        if not np.isfinite(v) and start is None:
            start = i
        elif np.isfinite(v) and start is not None:
            before, after = (start - 1 if start > 0 else None), (i if i < len(sites) else None)
            spans.append(UndefinedSpan(tuple(sites[start:i]),
                                       sites[before] if before is not None else None,
                                       float(values[before]) if before is not None else None,
                                       sites[after] if after is not None else None,
                                       float(values[after]) if after is not None else None))
            start = None
    return tuple(spans)


def pair_findings(cka: xr.DataArray, matched: xr.Dataset, order: Mapping[str, Sequence[str]], *, similarity: str,
                  attribution: Mapping[tuple[str, str, str], Mapping[str, Mapping[str, float]]] | None = None,
                  probes: xr.Dataset | None = None, agreement: xr.Dataset | None = None,
                  threshold: float = THRESHOLD) -> list[PairFinding]:
    """One record per model pair of `order`, for CKA matrix `similarity` (`cka`: flat site-id matrix)
    and its `matched_cka` points."""
    cka = flat_matrix(cka)
    out = []
    for a, b in model_pairs(list(order)):
        n = int(matched.sizes.get("point", 0))
        curve = points(matched, similarity=similarity, model_a=a, model_b=b).sortby("depth") if n else matched
        n = int(curve.sizes.get("point", 0))
        types = (attribution or {}).get((similarity, a, b), {})
        valid = {t: v for t, v in types.items() if v["count"] > 0}
        worst = min(valid.items(), key=lambda kv: kv[1]["total"], default=None)
        undefined = tuple(str(s) for s, v in zip(curve.site.values, curve["cka"].values)
                          if not np.isfinite(v)) if n else ()
        last = (f"{a}/{order[a][-1]}", f"{b}/{order[b][-1]}")
        has_last = last[0] in cka.site_a.values and last[1] in cka.site_b.values
        out.append(PairFinding(
            model_a=a, model_b=b, similarity=similarity, threshold=threshold, n_matched=n, n_sites_a=len(order[a]),
            first_below=_first_below(curve, threshold) if n else None, minimum=_minimum(curve) if n else None,
            undefined_sites=undefined, undefined_spans=_undefined_spans(curve) if undefined else (),
            types_without_transitions=tuple(sorted(t for t in types if t not in valid)),
            most_loss=SublayerLoss(worst[0], **worst[1]) if worst else None,
            last_site_cka=float(cka.sel(site_a=last[0], site_b=last[1])) if has_last else None,
            probes=_probe_gap(probes, order, a, b), agreement=_agreement(agreement, a, b)))
    return out


def finetuning_findings(ft: xr.Dataset, *, similarity: str) -> list[FinetuningFinding]:
    """Per fine-tuned model F (pretrained P) and other model X: mean matched-site CKA(F, X) vs CKA(P, X),
    and at how many sites F is the closer one."""
    if not ft.sizes.get("point", 0):
        return []
    frame = ft.reset_coords().to_dataframe()
    frame = frame[(frame["similarity"] == similarity) & (frame["other"] != frame["pretrained"])]
    out = []
    for (f, p, x), group in frame.groupby(["finetuned", "pretrained", "other"], sort=False):
        out.append(FinetuningFinding(f, p, x, similarity, len(group), float(group["cka_finetuned"].mean()),
                                     float(group["cka_pretrained"].mean()),
                                     int((group["cka_finetuned"] > group["cka_pretrained"]).sum())))
    return out


def crossarch_findings(cross: xr.Dataset, *, similarity: str, threshold: float = THRESHOLD) -> list[CrossarchFinding]:
    """Per pair of models with different site names (`crossarch_cka` points of CKA matrix `similarity`):
    mean best-match and depth-aligned CKA, the site with the weakest best match, how monotone the
    best-match depths are (Spearman correlation with depth), and at how many sites the best match
    stays below `threshold`."""
    if not cross.sizes.get("point", 0):
        return []
    out = []
    cross = points(cross, similarity=similarity)
    for a, b in dict.fromkeys(zip(cross.model_a.values.tolist(), cross.model_b.values.tolist())):
        c = points(cross, model_a=a, model_b=b).sortby("depth")
        best, aligned = c["best_cka"].values, c["aligned_cka"].values
        ok = np.isfinite(best)
        weakest = int(np.nanargmin(best)) if ok.any() else None
        out.append(CrossarchFinding(
            model_a=a, model_b=b, similarity=similarity, threshold=threshold, n_sites=int(c.sizes["point"]),
            mean_best_cka=float(np.nanmean(best)) if ok.any() else None,
            mean_aligned_cka=float(np.nanmean(aligned)) if np.isfinite(aligned).any() else None,
            weakest=None if weakest is None else WeakestMatch(str(c.site.values[weakest]), float(best[weakest]),
                                                              str(c.best_site.values[weakest])),
            depth_spearman=_spearman(c.relative_depth.values[ok], c.best_relative_depth.values[ok]),
            n_below=int((best[ok] < threshold).sum())))
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation (the correlation of average ranks, computed as `scipy.stats.spearmanr` does,
    without importing scipy); None with fewer than 3 points or a constant side."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    ranked = np.column_stack([pd.Series(v).rank().to_numpy() for v in (x, y)])
    return float(np.corrcoef(ranked, rowvar=False)[1, 0])


def _mean_matched(matched: xr.Dataset, similarity: str, a: str, b: str) -> float | None:
    if not matched.sizes.get("point", 0):
        return None
    values = np.concatenate([points(matched, similarity=similarity, model_a=x, model_b=y)["cka"].values
                             for x, y in ((a, b), (b, a))])
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def baseline_findings(findings: Sequence[PairFinding], models: Mapping[str, Mapping[str, Any]],
                      matched: xr.Dataset) -> list[PairFinding]:
    """`findings` (from `pair_findings`), each pair of configured models given a `baseline`: the same
    numbers for random-weights twins (`baseline_of` in the model attrs): model_a vs its architecture's
    twin when both models share the architecture, else the two architectures' twins."""
    twins = {attrs["baseline_of"]: m for m, attrs in models.items() if attrs.get("baseline_of")}
    by_pair = {frozenset((f.model_a, f.model_b)): f for f in reversed(findings)}
    out = []
    for f in findings:
        a, b = f.model_a, f.model_b
        arch_a, arch_b = (models.get(m, {}).get("arch") for m in (a, b))
        if any(models.get(m, {}).get("baseline_of") for m in (a, b)) or arch_a not in twins or arch_b not in twins:
            out.append(f)
            continue
        ref = (a, twins[arch_a]) if arch_a == arch_b else (twins[arch_a], twins[arch_b])
        facts = by_pair.get(frozenset(ref))
        out.append(replace(f, baseline=Baseline(ref[0], ref[1], _mean_matched(matched, f.similarity, *ref),
                                                facts.last_site_cka if facts else None,
                                                _mean_matched(matched, f.similarity, a, b))))
    return out
