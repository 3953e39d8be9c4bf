"""Findings in words: the one place where records (`records`) become sentences, and summary.json's form
of a record (its fields plus its paragraph under "text")."""

from __future__ import annotations

from dataclasses import asdict
from functools import singledispatch
from typing import Any

import numpy as np

from tasks.report.records import Baseline, CrossarchFinding, Finding, FinetuningFinding, PairFinding


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"


def entry(finding: Finding) -> dict[str, Any]:
    """summary.json's form of a finding: its fields, nested records as mappings, and its sentence."""
    return asdict(finding) | {"text": sentence(finding)}


@singledispatch
def sentence(finding: Finding) -> str:
    """One plain paragraph stating a finding's numbers."""
    raise TypeError(f"no sentence for {type(finding).__name__}")


@sentence.register
def _pair(f: PairFinding) -> str:
    a, b, threshold = f.model_a, f.model_b, f.threshold
    parts = [f"{a} vs {b} ({f.similarity}):"]
    n = f.n_matched
    if n == 0:
        parts.append("no sites with the same name, so no matched-depth curve (see the heatmap and the "
                     "cross-architecture curves).")
    else:
        undefined = f.undefined_sites
        if undefined:
            parts.append(f"CKA undefined at {', '.join(undefined)}: constant activations "
                         f"({len(undefined)} of {n} matched sites, excluded below);")
            for span in f.undefined_spans:
                if span.from_site and span.to_site:
                    parts.append(f"across the undefined site(s) CKA goes from {_fmt(span.from_cka)} at "
                                 f"{span.from_site} to {_fmt(span.to_cka)} at {span.to_site};")
        defined = n - len(undefined)
        if f.first_below:
            fb = f.first_below
            parts.append(f"matched-site CKA first drops below {threshold} at {fb.site} "
                         f"(site {fb.depth + 1} of {a}'s {f.n_sites_a}, CKA {_fmt(fb.cka)});")
        elif defined:
            parts.append(f"matched-site CKA stays at or above {threshold} at all {defined} matched sites "
                         f"where it is defined;")
    if f.minimum:
        parts.append(f"it is lowest at {f.minimum.site} ({_fmt(f.minimum.cka)}).")
    if f.types_without_transitions:
        parts.append(f"Sublayer type(s) {', '.join(repr(t) for t in f.types_without_transitions)}: no transition "
                     f"with defined CKA on both sides.")
    if f.most_loss:
        ml = f.most_loss
        verb = "loses the most" if ml.total < 0 else "loses none (every type gains or holds); the smallest gain:"
        parts.append(f"Summed over depth, the sublayer type {ml.sublayer_type!r} {verb} CKA "
                     f"({_fmt(ml.total)} over {ml.count} transitions).")
    if f.last_site_cka is not None:
        parts.append(f"CKA between their last sites: {_fmt(f.last_site_cka)}.")
    if f.probes:
        p = f.probes
        parts.append(f"Linear-probe test accuracy at the last site: {a} {_fmt(p.accuracy_a)}, "
                     f"{b} {_fmt(p.accuracy_b)} (gap {_fmt(p.gap)}).")
    if f.agreement:
        g = f.agreement
        parts.append(f"Their last-site probes predict the same class on {100 * g.agreement:.0f}% of test "
                     f"samples (Cohen's kappa {_fmt(g.kappa)}, error consistency {_fmt(g.error_consistency)}).")
    if f.baseline:
        parts.append(_baseline(f.baseline, f))
    return " ".join(parts)


def _baseline(base: Baseline, f: PairFinding) -> str:
    said = [f"Baseline (architecture alone, random weights): {base.model_a} vs {base.model_b}"]
    if base.mean_matched_cka is not None and base.pair_mean_matched_cka is not None:
        said.append(f"mean matched-site CKA {_fmt(base.mean_matched_cka)} against {_fmt(base.pair_mean_matched_cka)} "
                    f"for {f.model_a} vs {f.model_b}")
    if base.last_site_cka is not None and f.last_site_cka is not None:
        said.append(f"last-site CKA {_fmt(base.last_site_cka)} against {_fmt(f.last_site_cka)}")
    return said[0] + ": " + "; ".join(said[1:]) + "." if len(said) > 1 else said[0] + ": no common numbers."


@sentence.register
def _finetuning(f: FinetuningFinding) -> str:
    gain = f.mean_cka_finetuned - f.mean_cka_pretrained
    return (f"{f.finetuned} vs {f.other} ({f.similarity}): mean matched-site CKA {_fmt(f.mean_cka_finetuned)}, "
            f"against {_fmt(f.mean_cka_pretrained)} for its pretrained model {f.pretrained} "
            f"({'+' if gain >= 0 else ''}{_fmt(gain)}); the fine-tuned model is closer to {f.other} at "
            f"{f.sites_closer} of {f.n_sites} sites.")


@sentence.register
def _crossarch(f: CrossarchFinding) -> str:
    a, b = f.model_a, f.model_b
    parts = [f"{a} vs {b} ({f.similarity}, different site names):"]
    if f.mean_best_cka is None:
        parts.append("no finite CKA.")
        return " ".join(parts)
    parts.append(f"over {a}'s {f.n_sites} sites, the best-matching site of {b} has mean CKA "
                 f"{_fmt(f.mean_best_cka)}; at the same relative depth the mean is {_fmt(f.mean_aligned_cka)}.")
    w = f.weakest
    parts.append(f"The weakest best match is at {w.site} ({w.best_site} of {b}, CKA {_fmt(w.cka)}); "
                 f"{f.n_below} site(s) have no match at or above {f.threshold}.")
    if f.depth_spearman is not None:
        parts.append(f"Spearman correlation between a site's relative depth and that of its best match: "
                     f"{_fmt(f.depth_spearman)} (1: the best matches keep depth order).")
    return " ".join(parts)
