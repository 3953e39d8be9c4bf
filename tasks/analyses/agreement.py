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


def _kappa(observed: float, expected: float) -> float:
    return float("nan") if np.isclose(expected, 1.0) else (observed - expected) / (1.0 - expected)


def pair_agreement(pred_a: np.ndarray, pred_b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Agreement statistics of two prediction vectors on the same images with true `labels`."""
    pred_a, pred_b, labels = (np.asarray(v).ravel() for v in (pred_a, pred_b, labels))
    if not (pred_a.shape == pred_b.shape == labels.shape) or pred_a.size == 0:
        raise ValueError(f"predictions and labels must be non-empty and of one length; got "
                         f"{pred_a.shape}, {pred_b.shape}, {labels.shape}")
    same = float(np.mean(pred_a == pred_b))
    classes = np.union1d(pred_a, pred_b)
    p_a = np.array([np.mean(pred_a == c) for c in classes])
    p_b = np.array([np.mean(pred_b == c) for c in classes])
    right_a, right_b = pred_a == labels, pred_b == labels
    acc_a, acc_b = float(right_a.mean()), float(right_b.mean())
    c_obs = float(np.mean(right_a == right_b))
    c_exp = acc_a * acc_b + (1 - acc_a) * (1 - acc_b)
    return {"agreement": same, "kappa": _kappa(same, float(p_a @ p_b)),
            "error_consistency": _kappa(c_obs, c_exp), "accuracy_a": acc_a, "accuracy_b": acc_b}


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
