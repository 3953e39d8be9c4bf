"""Prediction agreement between two classifiers evaluated on the same images.

- `agreement`: fraction of images where both predict the same class.
- `kappa`: Cohen's kappa of the two predictions, (p_o - p_e) / (1 - p_e) with p_e = sum_k p_a(k) p_b(k)
  from each classifier's marginal distribution of predicted classes.
- `error_consistency` (Geirhos et al. 2020, "Beyond accuracy"): kappa on the correct/wrong
  indicators, c_obs = fraction of images both get right or both get wrong,
  c_exp = acc_a acc_b + (1 - acc_a)(1 - acc_b), (c_obs - c_exp) / (1 - c_exp).

Undefined values (a denominator of 0: e.g. two perfect classifiers have no errors to be consistent
about) are NaN, never clamped or replaced.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

AGREEMENT_VARS = ("agreement", "kappa", "error_consistency")


def _kappa(observed: int, expected: int, n: int) -> float:
    """(p_o - p_e) / (1 - p_e) from integer counts: p_o = observed / n, p_e = expected / n^2. The
    denominator n^2 - expected is an exact integer, so "undefined" is decided without rounding."""
    denominator = n * n - expected
    return float("nan") if denominator == 0 else (n * observed - expected) / denominator


def pair_agreement(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Agreement statistics of two prediction vectors on the same images with true `labels`."""
    pred_a, pred_b, labels = (np.asarray(v).ravel() for v in (pred_a, pred_b, labels))
    if not (pred_a.shape == pred_b.shape == labels.shape) or pred_a.size == 0:
        raise ValueError(f"predictions and labels must be non-empty and of one length; got "
                         f"{pred_a.shape}, {pred_b.shape}, {labels.shape}")
    n = int(pred_a.size)
    same = int(np.sum(pred_a == pred_b))
    classes = np.union1d(pred_a, pred_b)
    n_a = [int(np.sum(pred_a == c)) for c in classes]
    n_b = [int(np.sum(pred_b == c)) for c in classes]
    right_a, right_b = pred_a == labels, pred_b == labels
    r_a, r_b = int(right_a.sum()), int(right_b.sum())
    both = int(np.sum(right_a == right_b))
    return {"agreement": same / n, "kappa": _kappa(same, sum(a * b for a, b in zip(n_a, n_b)), n),
            "error_consistency": _kappa(both, r_a * r_b + (n - r_a) * (n - r_b), n),
            "accuracy_a": r_a / n, "accuracy_b": r_b / n}


def agreement_matrix(predictions: Mapping[str, np.ndarray], labels: np.ndarray) -> xr.Dataset:
    """Every statistic of `pair_agreement` for every ordered pair of models: dims (model_a, model_b),
    plus `accuracy` (model). `predictions`: model -> predicted classes on the same held-out images."""
    models = list(predictions)
    if not models:
        raise ValueError("agreement_matrix: no predictions given")
    values = {name: np.full((len(models), len(models)), np.nan) for name in AGREEMENT_VARS}
    for i, a in enumerate(models):
        for j, b in enumerate(models):
            stats = pair_agreement(predictions[a], predictions[b], labels)
            for name in AGREEMENT_VARS:
                values[name][i, j] = stats[name]
    accuracy = [float(np.mean(np.asarray(predictions[m]) == np.asarray(labels))) for m in models]
    return xr.Dataset({name: (("model_a", "model_b"), v) for name, v in values.items()}
                      | {"accuracy": ("model", accuracy)},
                      coords={"model_a": models, "model_b": models, "model": models})
