"""Linear probes: multinomial logistic regression on one site's features, test accuracy per site.

Protocol: a seeded train/test split *by image* (`split_by_image`: all views of one image stay on one
side, stratified by class), features standardised with the training rows' mean and standard deviation
(constant features are left at 0), L2-regularised multinomial logistic regression with C = 1
(objective: sum of cross-entropies + |W|^2 / (2C), as in scikit-learn).

Three solvers of that one objective (`probe_site` picks by size, or `backend=`):
- `sklearn`: scikit-learn's lbfgs on CPU, features in memory (default for narrow sites);
- `torch`: full-batch L-BFGS in torch, on the GPU when one is available (wide sites);
- `sgd`: out of core: Adam over minibatches read row block by row block from the store (float64
  statistics in a first pass), for sites whose features do not fit in `memory_budget`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from tasks.extract import resolve_device

Backend = Literal["auto", "sklearn", "torch", "sgd"]
WIDE_FEATURES = 4096  # sites wider than this use the torch solver
C = 1.0


@dataclass(frozen=True)
class ProbeResult:
    """Accuracies of one probe and its predictions on the test rows (in row order)."""

    train_accuracy: float
    test_accuracy: float
    predictions: np.ndarray
    backend: str
    converged: bool


def split_by_image(image_index: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over samples: a seeded, class-stratified choice of whole images.

    Every class with at least 2 images puts round(test_fraction * n) of them (at least 1, at most n-1)
    in the test set; all views of an image share its side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    image_index, labels = np.asarray(image_index), np.asarray(labels)
    images, first = np.unique(image_index, return_index=True)
    image_label = labels[first]
    if np.unique(np.stack([image_index, labels]), axis=1).shape[1] != images.size:
        raise ValueError("samples of one image carry different labels")
    rng = np.random.default_rng(seed)
    test_images = []
    for label in np.unique(image_label):
        members = rng.permutation(images[image_label == label])
        if members.size >= 2:
            k = min(max(int(round(test_fraction * members.size)), 1), members.size - 1)
            test_images.append(members[:k])
    mask = np.isin(image_index, np.concatenate(test_images) if test_images else [])
    if not mask.any() or mask.all():
        raise ValueError(f"cannot split {images.size} images into train and test by class; sample more images")
    return mask


def _row_blocks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _standardiser(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) for z = (x - mean) / std; constant features (std at rounding level) get std = inf, so z = 0."""
    std = np.sqrt(np.maximum(var, 0.0))
    return mean, np.where((std > 0) & (std > 1e-6 * np.abs(mean)), std, np.inf)


def _fit_sklearn(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[Any, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=1000, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model.predict, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _torch_model(d: int, k: int, device: str, seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Linear(d, k, dtype=torch.float64, device=device)


def _penalised_loss(model, x, y, n_train: int):
    import torch

    ce = torch.nn.functional.cross_entropy(model(x), y, reduction="mean")
    return ce + (model.weight ** 2).sum() / (2 * C * n_train)


def _fit_torch(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, device: str) -> tuple[Any, bool]:
    import torch

    dev = resolve_device(device)
    xt, yt = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
    model = _torch_model(x.shape[1], n_classes, dev, seed)
    optimiser = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=1000, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = _penalised_loss(model, xt, yt, len(y))
        loss.backward()
        return loss

    optimiser.step(closure)
    grad = max(float(p.grad.abs().max()) for p in model.parameters())

    def predict(features: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(features, device=dev)).argmax(1).cpu().numpy()

    return predict, grad <= 1e-4


def probe_in_memory(x: np.ndarray, labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                    backend: Literal["sklearn", "torch"] = "sklearn", device: str = "auto") -> ProbeResult:
    """Fit a standardised probe on the rows outside `test_mask` of features `x` (n, d); evaluate on the rest."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or not x.shape[0] == labels.shape[0] == test_mask.shape[0]:
        raise ValueError(f"probe: features {x.shape} do not match {labels.shape[0]} labels")
    train = ~test_mask
    mean, std = _standardiser(x[train].mean(0), x[train].var(0))
    z = (x - mean) / std
    classes, y = np.unique(labels, return_inverse=True)
    if backend == "sklearn":
        predict, converged = _fit_sklearn(z[train], y[train], seed)
    elif backend == "torch":
        predict, converged = _fit_torch(z[train], y[train], classes.size, seed, device)
    else:
        raise ValueError(f"probe backend {backend!r} is not an in-memory solver (sklearn, torch)")
    pred_train, pred_test = predict(z[train]), predict(z[test_mask])
    return ProbeResult(float(np.mean(pred_train == y[train])), float(np.mean(pred_test == y[test_mask])),
                       classes[pred_test], backend, converged)


def probe_streaming(array: Any, labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                    block_rows: int | None = None, epochs: int = 30, batch_size: int = 256, lr: float = 1e-2,
                    device: str = "auto") -> ProbeResult:
    """Out-of-core probe: `array` (n, d) is read block by block (zarr array, or anything sliceable);
    never more than one block of rows is in memory. Adam on minibatches, seeded."""
    import torch

    labels, test_mask = np.asarray(labels), np.asarray(test_mask, dtype=bool)
    n, d = array.shape
    if n != labels.shape[0]:
        raise ValueError(f"probe: {n} feature rows but {labels.shape[0]} labels")
    step = block_rows or int(getattr(array, "chunks", (4096,))[0])
    classes, y = np.unique(labels, return_inverse=True)
    train = ~test_mask
    total, total_sq = np.zeros(d), np.zeros(d)
    for a, b in _row_blocks(n, step):
        rows = np.asarray(array[a:b], dtype=np.float64)[train[a:b]]
        total += rows.sum(0)
        total_sq += (rows ** 2).sum(0)
    n_train = int(train.sum())
    mean = total / n_train
    mean, std = _standardiser(mean, total_sq / n_train - mean ** 2)
    dev = resolve_device(device)
    model = _torch_model(d, classes.size, dev, seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    blocks = list(_row_blocks(n, step))
    for _ in range(epochs):
        for i in rng.permutation(len(blocks)):
            a, b = blocks[i]
            rows = np.flatnonzero(train[a:b])
            z = torch.as_tensor((np.asarray(array[a:b], dtype=np.float64)[rows] - mean) / std, device=dev)
            target = torch.as_tensor(y[a:b][rows], device=dev)
            for batch in np.array_split(rng.permutation(rows.size), max(1, rows.size // batch_size)):
                optimiser.zero_grad()
                _penalised_loss(model, z[batch], target[batch], n_train).backward()
                optimiser.step()
    right, pred_test = 0, []
    with torch.no_grad():
        for a, b in blocks:
            z = torch.as_tensor((np.asarray(array[a:b], dtype=np.float64) - mean) / std, device=dev)
            pred = model(z).argmax(1).cpu().numpy()
            right += int(np.sum((pred == y[a:b])[train[a:b]]))
            pred_test.append(pred[test_mask[a:b]])
    pred_test = np.concatenate(pred_test)
    return ProbeResult(right / n_train, float(np.mean(pred_test == y[test_mask])), classes[pred_test], "sgd", True)


def choose_backend(n_rows: int, n_features: int, memory_budget: int) -> Literal["sklearn", "torch", "sgd"]:
    """`sgd` when a float64 copy of the features (x3 for standardising) exceeds the budget, `torch` for
    wide sites, else `sklearn`."""
    if 3 * 8 * n_rows * n_features > memory_budget:
        return "sgd"
    return "torch" if n_features > WIDE_FEATURES else "sklearn"


def probe_site(array: Any, labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0, backend: Backend = "auto",
               memory_budget: int = 2**30, device: str = "auto") -> ProbeResult:
    """Probe one site's features (a numpy or zarr array (n, d)) with the solver `backend` or the one
    `choose_backend` picks."""
    if backend == "auto":
        backend = choose_backend(array.shape[0], array.shape[1], memory_budget)
    if backend == "sgd":
        return probe_streaming(array, labels, test_mask, seed=seed, device=device)
    return probe_in_memory(np.asarray(array[:]), labels, test_mask, seed=seed, backend=backend, device=device)


def probe_sites(arrays: Mapping[str, Any], labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                backend: Backend = "auto", memory_budget: int = 2**30, device: str = "auto",
                sample: np.ndarray | None = None, progress: Callable[[int], Any] | None = None) -> xr.Dataset:
    """Probe every site (site id -> (n, d) array): `train_accuracy`, `test_accuracy`, `backend`,
    `converged` (site) and `prediction` (site, test_sample), test_sample = the test rows' `sample`
    coordinate (default: row numbers), with their true `test_label`. progress: called with 1 per site probed."""
    test_mask = np.asarray(test_mask, dtype=bool)
    results = {}
    for sid, array in arrays.items():
        results[sid] = probe_site(array, labels, test_mask, seed=seed, backend=backend,
                                  memory_budget=memory_budget, device=device)
        if progress is not None:
            progress(1)
    rows = np.flatnonzero(test_mask) if sample is None else np.asarray(sample)[test_mask]
    sites = list(results)
    return xr.Dataset(
        {"train_accuracy": ("site", [results[s].train_accuracy for s in sites]),
         "test_accuracy": ("site", [results[s].test_accuracy for s in sites]),
         "backend": ("site", [results[s].backend for s in sites]),
         "converged": ("site", [results[s].converged for s in sites]),
         "prediction": (("site", "test_sample"), np.stack([results[s].predictions for s in sites]))},
        coords={"site": sites, "test_sample": rows, "test_label": ("test_sample", np.asarray(labels)[test_mask])},
        attrs={"seed": seed, "n_train": int((~test_mask).sum()), "n_test": int(test_mask.sum()), "C": C,
               "standardised": "train mean/std"})
