"""Findings: measured facts per model pair, as numbers (for summary.json) and one plain paragraph.

Facts (each None when its inputs are missing): where matched-site CKA first drops below the threshold
(0.5), where it is lowest, which sublayer type loses the most CKA summed over depth, the CKA between
the two models' last sites, probe test accuracy at each model's last site and the gap, and the
agreement of those last-site probes. Statements only, no interpretation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from scipy.stats import spearmanr

from tasks.analyses import flat_matrix, model_pairs

THRESHOLD = 0.5


def _first_below(curve: xr.Dataset, threshold: float) -> dict[str, Any] | None:
    below = np.flatnonzero(curve["cka"].values < threshold)
    if below.size == 0:
        return None
    i = int(below[0])
    return {"site": str(curve.site.values[i]), "depth": int(curve.depth.values[i]), "cka": float(curve["cka"].values[i])}


def _minimum(curve: xr.Dataset) -> dict[str, Any] | None:
    values = curve["cka"].values
    if not np.isfinite(values).any():
        return None
    i = int(np.nanargmin(values))
    return {"site": str(curve.site.values[i]), "depth": int(curve.depth.values[i]), "cka": float(values[i])}


def _probe_facts(probes: xr.Dataset | None, order: Mapping[str, Sequence[str]], a: str, b: str) -> dict[str, Any] | None:
    if probes is None:
        return None
    ids = {m: f"{m}/{order[m][-1]}" for m in (a, b)}
    if not all(sid in probes.site.values for sid in ids.values()):
        return None
    acc = {m: float(probes["test_accuracy"].sel(site=sid)) for m, sid in ids.items()}
    return {"site_a": ids[a], "site_b": ids[b], "accuracy_a": acc[a], "accuracy_b": acc[b], "gap": acc[a] - acc[b]}


def _agreement_facts(agreement: xr.Dataset | None, a: str, b: str) -> dict[str, float] | None:
    if agreement is None or a not in agreement.model_a.values or b not in agreement.model_b.values:
        return None
    return {v: float(agreement[v].sel(model_a=a, model_b=b)) for v in ("agreement", "kappa", "error_consistency")}


def _undefined_spans(curve: xr.Dataset) -> list[dict[str, Any]]:
    """Each run of matched sites with undefined CKA and the defined CKA just before and after it."""
    values, sites = curve["cka"].values, [str(s) for s in curve.site.values]
    spans, start = [], None
    for i, v in enumerate(list(values) + [0.0]):
        if not np.isfinite(v) and start is None:
            start = i
        elif np.isfinite(v) and start is not None:
            before, after = (start - 1 if start > 0 else None), (i if i < len(sites) else None)
            spans.append({"sites": sites[start:i], "from_site": sites[before] if before is not None else None,
                          "from_cka": float(values[before]) if before is not None else None,
                          "to_site": sites[after] if after is not None else None,
                          "to_cka": float(values[after]) if after is not None else None})
            start = None
    return spans


def _fmt(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def _text(f: dict[str, Any], threshold: float) -> str:
    a, b = f["model_a"], f["model_b"]
    parts = [f"{a} vs {b} ({f['similarity']}):"]
    n = f["n_matched"]
    if n == 0:
        parts.append("no sites with the same name, so no matched-depth curve (see the heatmap and the "
                     "cross-architecture curves).")
    else:
        undefined = f.get("undefined_sites") or []
        if undefined:
            parts.append(f"CKA undefined at {', '.join(undefined)}: constant activations "
                         f"({len(undefined)} of {n} matched sites, excluded below);")
            for span in f.get("undefined_spans") or []:
                if span["from_site"] and span["to_site"]:
                    parts.append(f"across the undefined site(s) CKA goes from {_fmt(span['from_cka'])} at "
                                 f"{span['from_site']} to {_fmt(span['to_cka'])} at {span['to_site']};")
        defined = n - len(undefined)
        if f["first_below"]:
            fb = f["first_below"]
            parts.append(f"matched-site CKA first drops below {threshold} at {fb['site']} "
                         f"(site {fb['depth'] + 1} of {a}'s {f['n_sites_a']}, CKA {_fmt(fb['cka'])});")
        elif defined:
            parts.append(f"matched-site CKA stays at or above {threshold} at all {defined} matched sites "
                         f"where it is defined;")
    if f["minimum"]:
        parts.append(f"it is lowest at {f['minimum']['site']} ({_fmt(f['minimum']['cka'])}).")
    if f.get("types_without_transitions"):
        parts.append(f"Sublayer type(s) {', '.join(repr(t) for t in f['types_without_transitions'])}: no transition "
                     f"with defined CKA on both sides.")
    if f["most_loss"]:
        ml = f["most_loss"]
        verb = "loses the most" if ml["total"] < 0 else "loses none (every type gains or holds); the smallest gain:"
        parts.append(f"Summed over depth, the sublayer type {ml['sublayer_type']!r} {verb} CKA "
                     f"({_fmt(ml['total'])} over {ml['count']} transitions).")
    if f["last_site_cka"] is not None:
        parts.append(f"CKA between their last sites: {_fmt(f['last_site_cka'])}.")
    if f["probes"]:
        p = f["probes"]
        parts.append(f"Linear-probe test accuracy at the last site: {a} {_fmt(p['accuracy_a'])}, "
                     f"{b} {_fmt(p['accuracy_b'])} (gap {_fmt(p['gap'])}).")
    if f["agreement"]:
        g = f["agreement"]
        parts.append(f"Their last-site probes predict the same class on {100 * g['agreement']:.0f}% of test "
                     f"samples (Cohen's kappa {_fmt(g['kappa'])}, error consistency {_fmt(g['error_consistency'])}).")
    return " ".join(parts)


def pair_findings(cka: xr.DataArray, matched: xr.Dataset, order: Mapping[str, Sequence[str]], *, similarity: str,
                  attribution: Mapping[tuple[str, str, str], Mapping[str, Mapping[str, float]]] | None = None,
                  probes: xr.Dataset | None = None, agreement: xr.Dataset | None = None,
                  threshold: float = THRESHOLD) -> list[dict[str, Any]]:
    """One fact record (with its paragraph under "text") per model pair of `order`, for CKA matrix
    `similarity` (`cka`: flat site-id matrix) and its `matched_cka` points."""
    cka = flat_matrix(cka)
    out = []
    for a, b in model_pairs(list(order)):
        if matched.sizes.get("point", 0):
            sel = ((matched.similarity == similarity) & (matched.model_a == a) & (matched.model_b == b)).values
            curve = matched.isel(point=np.flatnonzero(sel)).sortby("depth")
        else:
            curve = matched
        types = (attribution or {}).get((similarity, a, b), {})
        valid = {t: v for t, v in types.items() if v["count"] > 0}
        worst = min(valid.items(), key=lambda kv: kv[1]["total"], default=None)
        n_curve = int(curve.sizes.get("point", 0))
        undefined = [str(s) for s, v in zip(curve.site.values, curve["cka"].values) if not np.isfinite(v)] if n_curve else []
        last = (f"{a}/{order[a][-1]}", f"{b}/{order[b][-1]}")
        has_last = last[0] in cka.site_a.values and last[1] in cka.site_b.values
        facts = {
            "model_a": a, "model_b": b, "similarity": similarity, "threshold": threshold,
            "n_matched": int(curve.sizes.get("point", 0)), "n_sites_a": len(order[a]),
            "first_below": _first_below(curve, threshold) if curve.sizes.get("point", 0) else None,
            "minimum": _minimum(curve) if curve.sizes.get("point", 0) else None,
            "undefined_sites": undefined,
            "undefined_spans": _undefined_spans(curve) if undefined else [],
            "types_without_transitions": sorted(t for t in types if t not in valid),
            "most_loss": {"sublayer_type": worst[0], **worst[1]} if worst else None,
            "last_site_cka": float(cka.sel(site_a=last[0], site_b=last[1])) if has_last else None,
            "probes": _probe_facts(probes, order, a, b),
            "agreement": _agreement_facts(agreement, a, b),
        }
        facts["text"] = _text(facts, threshold)
        out.append(facts)
    return out


def finetuning_findings(ft: xr.Dataset, *, similarity: str) -> list[dict[str, Any]]:
    """Per fine-tuned model F (pretrained P) and other model X: mean matched-site CKA(F, X) vs CKA(P, X),
    and at how many sites F is the closer one."""
    if not ft.sizes.get("point", 0):
        return []
    frame = ft.reset_coords().to_dataframe()
    frame = frame[(frame["similarity"] == similarity) & (frame["other"] != frame["pretrained"])]
    out = []
    for (f, p, x), group in frame.groupby(["finetuned", "pretrained", "other"], sort=False):
        mean_f, mean_p = float(group["cka_finetuned"].mean()), float(group["cka_pretrained"].mean())
        closer = int((group["cka_finetuned"] > group["cka_pretrained"]).sum())
        facts = {"finetuned": f, "pretrained": p, "other": x, "similarity": similarity, "n_sites": len(group),
                 "mean_cka_finetuned": mean_f, "mean_cka_pretrained": mean_p, "sites_closer": closer}
        facts["text"] = (f"{f} vs {x} ({similarity}): mean matched-site CKA {_fmt(mean_f)}, against {_fmt(mean_p)} "
                         f"for its pretrained model {p} ({'+' if mean_f >= mean_p else ''}{_fmt(mean_f - mean_p)}); "
                         f"the fine-tuned model is closer to {x} at {closer} of {len(group)} sites.")
        out.append(facts)
    return out


def crossarch_findings(cross: xr.Dataset, *, similarity: str, threshold: float = THRESHOLD) -> list[dict[str, Any]]:
    """Per pair of models with different site names (`crossarch_cka` points of CKA matrix `similarity`):
    mean best-match and depth-aligned CKA, the site with the weakest best match, how monotone the
    best-match depths are (Spearman correlation with depth), and at how many sites the best match
    stays below `threshold`."""
    if not cross.sizes.get("point", 0):
        return []
    out = []
    cross = cross.isel(point=np.flatnonzero((cross.similarity == similarity).values))
    for a, b in dict.fromkeys(zip(cross.model_a.values.tolist(), cross.model_b.values.tolist())):
        c = cross.isel(point=np.flatnonzero(((cross.model_a == a) & (cross.model_b == b)).values)).sortby("depth")
        best, aligned = c["best_cka"].values, c["aligned_cka"].values
        ok = np.isfinite(best)
        weakest = int(np.nanargmin(best)) if ok.any() else None
        rank_r = _spearman(c.relative_depth.values[ok], c.best_relative_depth.values[ok])
        facts = {"model_a": a, "model_b": b, "similarity": similarity, "threshold": threshold, "n_sites": int(c.sizes["point"]),
                 "mean_best_cka": float(np.nanmean(best)) if ok.any() else None,
                 "mean_aligned_cka": float(np.nanmean(aligned)) if np.isfinite(aligned).any() else None,
                 "weakest": None if weakest is None else {"site": str(c.site.values[weakest]), "cka": float(best[weakest]),
                                                          "best_site": str(c.best_site.values[weakest])},
                 "depth_spearman": rank_r, "n_below": int((best[ok] < threshold).sum())}
        parts = [f"{a} vs {b} ({similarity}, different site names):"]
        if facts["mean_best_cka"] is None:
            parts.append("no finite CKA.")
        else:
            parts.append(f"over {a}'s {facts['n_sites']} sites, the best-matching site of {b} has mean CKA "
                         f"{_fmt(facts['mean_best_cka'])}; at the same relative depth the mean is {_fmt(facts['mean_aligned_cka'])}.")
            w = facts["weakest"]
            parts.append(f"The weakest best match is at {w['site']} ({w['best_site']} of {b}, CKA {_fmt(w['cka'])}); "
                         f"{facts['n_below']} site(s) have no match at or above {threshold}.")
            if rank_r is not None:
                parts.append(f"Spearman correlation between a site's relative depth and that of its best match: {_fmt(rank_r)}"
                             " (1: the best matches keep depth order).")
        facts["text"] = " ".join(parts)
        out.append(facts)
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation; None with fewer than 3 points or a constant side."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def _pair_fact(findings: Sequence[Mapping[str, Any]], a: str, b: str) -> Mapping[str, Any] | None:
    return next((f for f in findings if {f["model_a"], f["model_b"]} == {a, b}), None)


def _mean_matched(matched: xr.Dataset, similarity: str, a: str, b: str) -> float | None:
    if not matched.sizes.get("point", 0):
        return None
    sel = (matched.similarity == similarity) & (((matched.model_a == a) & (matched.model_b == b))
                                                | ((matched.model_a == b) & (matched.model_b == a)))
    values = matched["cka"].values[sel.values]
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def baseline_findings(findings: Sequence[Mapping[str, Any]], models: Mapping[str, Mapping[str, Any]],
                      matched: xr.Dataset) -> list[dict[str, Any]]:
    """`findings` (from `pair_findings`), each pair of configured models given a `baseline`: the same
    numbers for random-weights twins (`baseline_of` in the model attrs): model_a vs its architecture's
    twin when both models share the architecture, else the two architectures' twins; with a sentence."""
    twins = {attrs["baseline_of"]: m for m, attrs in models.items() if attrs.get("baseline_of")}
    out = []
    for f in findings:
        f = dict(f)
        a, b = f["model_a"], f["model_b"]
        arch_a, arch_b = (models.get(m, {}).get("arch") for m in (a, b))
        if not twins or any(models.get(m, {}).get("baseline_of") for m in (a, b)) or arch_a not in twins \
                or arch_b not in twins:
            out.append(f)
            continue
        ref = (a, twins[arch_a]) if arch_a == arch_b else (twins[arch_a], twins[arch_b])
        facts = _pair_fact(findings, *ref)
        base = {"model_a": ref[0], "model_b": ref[1],
                "mean_matched_cka": _mean_matched(matched, f["similarity"], *ref),
                "last_site_cka": facts["last_site_cka"] if facts else None,
                "pair_mean_matched_cka": _mean_matched(matched, f["similarity"], a, b)}
        f["baseline"] = base
        said = [f"Baseline (architecture alone, random weights): {ref[0]} vs {ref[1]}"]
        if base["mean_matched_cka"] is not None and base["pair_mean_matched_cka"] is not None:
            said.append(f"mean matched-site CKA {_fmt(base['mean_matched_cka'])} against {_fmt(base['pair_mean_matched_cka'])} "
                        f"for {a} vs {b}")
        if base["last_site_cka"] is not None and f["last_site_cka"] is not None:
            said.append(f"last-site CKA {_fmt(base['last_site_cka'])} against {_fmt(f['last_site_cka'])}")
        f["text"] = f["text"] + " " + (said[0] + ": " + "; ".join(said[1:]) + "." if len(said) > 1 else said[0] + ": no common numbers.")
        out.append(f)
    return out
