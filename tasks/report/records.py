"""Findings as typed records: measured numbers only (None where the inputs are missing). `findings`
computes them, `sentences` states them in words, summary.json holds both."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SitePoint:
    """A matched site, its position (0 = first site of model a) and the CKA there."""

    site: str
    depth: int
    cka: float


@dataclass(frozen=True)
class UndefinedSpan:
    """A run of matched sites with undefined CKA and the defined CKA just before and after it."""

    sites: tuple[str, ...]
    from_site: str | None
    from_cka: float | None
    to_site: str | None
    to_cka: float | None


@dataclass(frozen=True)
class SublayerLoss:
    """The sublayer type whose transitions lose the most CKA summed over depth (see `attribution_by_type`)."""

    sublayer_type: str
    total: float
    mean: float
    count: int
    undefined: int


@dataclass(frozen=True)
class ProbeGap:
    """Probe test accuracy at each model's last site, and a minus b."""

    site_a: str
    site_b: str
    accuracy_a: float
    accuracy_b: float
    gap: float


@dataclass(frozen=True)
class PredictionAgreement:
    """Agreement of the two models' last-site probes."""

    agreement: float
    kappa: float
    error_consistency: float


@dataclass(frozen=True)
class Baseline:
    """The same numbers for the random-weights twins that stand for the pair's architectures."""

    model_a: str
    model_b: str
    mean_matched_cka: float | None
    last_site_cka: float | None
    pair_mean_matched_cka: float | None


@dataclass(frozen=True)
class PairFinding:
    """One model pair on one CKA matrix: its matched-depth curve, sublayer attribution, last sites."""

    model_a: str
    model_b: str
    similarity: str
    threshold: float
    n_matched: int
    n_sites_a: int
    first_below: SitePoint | None
    minimum: SitePoint | None
    undefined_sites: tuple[str, ...]
    undefined_spans: tuple[UndefinedSpan, ...]
    types_without_transitions: tuple[str, ...]
    most_loss: SublayerLoss | None
    last_site_cka: float | None
    probes: ProbeGap | None
    agreement: PredictionAgreement | None
    baseline: Baseline | None = None


@dataclass(frozen=True)
class FinetuningFinding:
    """A fine-tuned model and its pretrained model against another model, at matched sites."""

    finetuned: str
    pretrained: str
    other: str
    similarity: str
    n_sites: int
    mean_cka_finetuned: float
    mean_cka_pretrained: float
    sites_closer: int


@dataclass(frozen=True)
class WeakestMatch:
    """The site of model a whose best match in model b has the lowest CKA."""

    site: str
    cka: float
    best_site: str


@dataclass(frozen=True)
class CrossarchFinding:
    """A pair of models with different site names: best-match and depth-aligned CKA over model a's sites."""

    model_a: str
    model_b: str
    similarity: str
    threshold: float
    n_sites: int
    mean_best_cka: float | None
    mean_aligned_cka: float | None
    weakest: WeakestMatch | None
    depth_spearman: float | None
    n_below: int


Finding = PairFinding | FinetuningFinding | CrossarchFinding
