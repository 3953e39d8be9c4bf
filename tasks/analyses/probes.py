"""Linear probes: multinomial logistic regression on each site's features, test accuracy per site.

Protocol: a seeded train/test split *by image* (`split_by_image`: all views of one image stay on one
side, stratified by class); features standardised with the training rows' mean and standard deviation
(a feature is constant, and left at 0, only when its centred training values are all zero at float64
resolution); L2-regularised multinomial logistic regression, objective
mean cross-entropy + |W|^2 / (2 C n_train) (scikit-learn's, divided by n_train).

The L2 strength C is chosen per site from `C_GRID` on a validation split of the training images
(`VALIDATION_FRACTION` of them, by image): fits along the grid from the strongest penalty to the weakest,
each warm-started from the previous solution and stopped at the looser `PATH_TOL` / `PATH_MAX_ITER`;
the C with the best validation accuracy wins (ties: the stronger penalty), then the probe is refit on all
training rows from that solution to `GRAD_TOL`. Both are recorded.

Solvers (`probe_sites` picks per site, or `solver=`):
- `lbfgs` (default): one batched L-BFGS in torch, float32, over a group of sites at once (features padded
  with zero columns to the group's widest site: exact, a zero column keeps a zero weight), on the GPU when
  there is one. Stopping rule (recorded): every site's gradient max-norm <= `GRAD_TOL` or `MAX_ITER`
  iterations; `converged` says which.
- `sgd`: out of core, for sites whose features do not fit `memory_budget`: Adam over minibatches read row
  block by row block from the store, at C = 1.
- `ridge`: exact closed form from the sufficient statistics XᵀX, Xᵀ1, XᵀY (one-hot) accumulated in one
  streaming pass (any N), the ridge penalty chosen from `RIDGE_GRID` on the same validation split; classes
  by argmax of the least-squares scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import xarray as xr

from tasks.extract import resolve_device

Solver = Literal["auto", "lbfgs", "sgd", "ridge"]
C_GRID = (0.01, 0.1, 1.0, 10.0)
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # penalty per training row on standardised features
VALIDATION_FRACTION = 0.2
GRAD_TOL = 1e-4
PATH_TOL = 1e-3  # the C path only ranks C on validation rows: a looser stopping rule there
PATH_MAX_ITER = 100
MAX_ITER = 500
GROUP_SITES = 8  # sites per batched fit: a group iterates until its slowest site converges
SGD_C = 1.0


@dataclass(frozen=True)
class ProbeResult:
    """Accuracies of one probe, its predictions on the test rows (in row order) and how it was fit."""

    train_accuracy: float
    test_accuracy: float
    predictions: np.ndarray
    backend: str
    converged: bool
    C: float = float("nan")
    validation_accuracy: dict[float, float] = field(default_factory=dict)
    iterations: int = 0
    gradient: float = float("nan")


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


def validation_mask(image_index: np.ndarray, labels: np.ndarray, test_mask: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask over samples: the validation images, a class-stratified `VALIDATION_FRACTION` of the
    training images (never a test row)."""
    train = np.flatnonzero(~test_mask)
    out = np.zeros(test_mask.shape, dtype=bool)
    out[train] = split_by_image(np.asarray(image_index)[train], np.asarray(labels)[train], VALIDATION_FRACTION,
                                seed + 1)
    return out


def _row_blocks(n: int, step: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _standardiser(mean: np.ndarray, var: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) for z = (x - mean) / std. `var`: the training variance computed from centred
    (or shifted) values; `scale`: the features' magnitude (max |x|). A feature is constant (std = inf,
    so z = 0) only when its std is at the rounding level of float64 at that magnitude."""
    std = np.sqrt(np.maximum(var, 0.0))
    return mean, np.where(std > 16 * np.finfo(np.float64).eps * scale, std, np.inf)


def _standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    rows = x[train]
    mean = rows.mean(0)
    mean, std = _standardiser(mean, ((rows - mean) ** 2).mean(0), np.abs(rows).max(0))
    return (x - mean) / std


@dataclass
class _Fit:
    weight: Any  # (G, d, K) torch tensor
    bias: Any  # (G, K)
    gradient: np.ndarray  # (G,) max |gradient| per site at the end
    iterations: int


def fit_logistic(features: Any, y: Any, c: np.ndarray, n_classes: int, *, init: _Fit | None = None,
                 tol: float = GRAD_TOL, max_iter: int = MAX_ITER) -> _Fit:
    """Batched L2 multinomial logistic regression: `features` (G, n, d) float32 torch tensor (G sites on
    the same rows), `y` (n,) int64 classes 0..n_classes-1, `c` (G,) inverse penalties. Minimises
    the sum over sites of mean CE + |W_g|^2 / (2 c_g n) with one L-BFGS (the sites are independent, so the
    minimiser is every site's own); from `init` or zeros."""
    import torch

    g, n, d = features.shape
    k = n_classes
    dev, dtype = features.device, features.dtype
    weight = (init.weight.clone() if init else torch.zeros(g, d, k, dtype=dtype, device=dev)).requires_grad_(True)
    bias = (init.bias.clone() if init else torch.zeros(g, k, dtype=dtype, device=dev)).requires_grad_(True)
    penalty = torch.as_tensor(1.0 / (2.0 * np.asarray(c, dtype=np.float64) * n), dtype=dtype, device=dev)
    target = y.unsqueeze(0).expand(g, n).reshape(-1)
    optimiser = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=0.0,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = torch.baddbmm(bias.unsqueeze(1), features, weight)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, k), target, reduction="sum") / n
        loss = ce + (penalty * (weight ** 2).sum((1, 2))).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    closure()
    grad = torch.maximum(weight.grad.abs().amax((1, 2)), bias.grad.abs().amax(1))
    iterations = int(optimiser.state[weight].get("n_iter", 0))
    return _Fit(weight.detach(), bias.detach(), grad.cpu().numpy().astype(np.float64), iterations)


def _predict(fit: _Fit, features: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.baddbmm(fit.bias.unsqueeze(1), features, fit.weight).argmax(2).cpu().numpy()


def probe_group(xs: Sequence[np.ndarray], labels: np.ndarray, test_mask: np.ndarray, val_mask: np.ndarray, *,
                device: str = "auto", grid: Sequence[float] = C_GRID, tol: float = GRAD_TOL,
                max_iter: int = MAX_ITER) -> list[ProbeResult]:
    """Probe several sites (features (n, d_s) on the same rows) at once with the batched L-BFGS: the C
    path on the training rows outside `val_mask`, then the refit at each site's chosen C."""
    import torch

    dev = resolve_device(device)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    train = ~test_mask
    fit_rows, val_rows = np.flatnonzero(train & ~val_mask), np.flatnonzero(val_mask)
    width = max(x.shape[1] for x in xs)
    z = torch.zeros(len(xs), len(y), width, dtype=torch.float32, device=dev)
    for i, x in enumerate(xs):
        z[i, :, :x.shape[1]] = torch.as_tensor(_standardise(np.asarray(x, dtype=np.float64), train), device=dev)
    yt = torch.as_tensor(y, device=dev)
    sites = np.arange(len(xs))
    path, fit, z_fit = [], None, z[:, fit_rows]
    for c in grid:
        fit = fit_logistic(z_fit, yt[fit_rows], np.full(len(xs), c), classes.size, init=fit,
                           tol=max(tol, PATH_TOL), max_iter=min(max_iter, PATH_MAX_ITER))
        path.append(fit)
    del z_fit
    val_acc = np.stack([(_predict(f, z[:, val_rows]) == y[val_rows]).mean(1) for f in path])  # (grid, G)
    best = val_acc.argmax(0)  # first maximum: the strongest penalty among the ties
    init = _Fit(torch.stack([path[b].weight[s] for s, b in zip(sites, best)]),
                torch.stack([path[b].bias[s] for s, b in zip(sites, best)]), np.zeros(len(xs)), 0)
    chosen = np.asarray(grid, dtype=np.float64)[best]
    rows = np.flatnonzero(train)
    final = fit_logistic(z[:, rows], yt[rows], chosen, classes.size, init=init, tol=tol, max_iter=max_iter)
    pred = _predict(final, z)
    return [ProbeResult(float(np.mean(pred[s][train] == y[train])), float(np.mean(pred[s][test_mask] == y[test_mask])),
                        classes[pred[s][test_mask]], "lbfgs", bool(final.gradient[s] <= tol), float(chosen[s]),
                        {float(c): float(val_acc[j, s]) for j, c in enumerate(grid)}, final.iterations,
                        float(final.gradient[s])) for s in sites]


def probe_in_memory(x: np.ndarray, labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                    image_index: np.ndarray | None = None, device: str = "auto") -> ProbeResult:
    """Fit the standardised probe of one site's features `x` (n, d) on the rows outside `test_mask`
    (C chosen on a validation split of the training images, `image_index`: default one image per row);
    evaluate on the rest."""
    x, labels, test_mask = np.asarray(x), np.asarray(labels), np.asarray(test_mask, dtype=bool)
    if x.ndim != 2 or not x.shape[0] == labels.shape[0] == test_mask.shape[0]:
        raise ValueError(f"probe: features {x.shape} do not match {labels.shape[0]} labels")
    image_index = np.arange(x.shape[0]) if image_index is None else np.asarray(image_index)
    return probe_group([x], labels, test_mask, validation_mask(image_index, labels, test_mask, seed), device=device)[0]


def _shifted_stats(array: Any, rows: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance (from values shifted by the first block's mean: no cancellation) and max |x| of the
    features over the masked rows, one pass of row blocks."""
    n, d = array.shape
    shift, total, total_sq, scale, count = None, np.zeros(d), np.zeros(d), np.zeros(d), 0
    for a, b in _row_blocks(n, step):
        block = np.asarray(array[a:b], dtype=np.float64)[rows[a:b]]
        if block.size == 0:
            continue
        shift = block.mean(0) if shift is None else shift
        total += (block - shift).sum(0)
        total_sq += ((block - shift) ** 2).sum(0)
        scale = np.maximum(scale, np.abs(block).max(0))
        count += block.shape[0]
    offset = total / count
    return shift + offset, total_sq / count - offset ** 2, scale


def probe_streaming(array: Any, labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                    block_rows: int | None = None, epochs: int = 30, batch_size: int = 256, lr: float = 1e-2,
                    device: str = "auto") -> ProbeResult:
    """Out-of-core probe at C = `SGD_C`: `array` (n, d) is read block by block (zarr array, or anything
    sliceable); never more than one block of rows is in memory. Adam on minibatches, seeded."""
    import torch

    labels, test_mask = np.asarray(labels), np.asarray(test_mask, dtype=bool)
    n, d = array.shape
    if n != labels.shape[0]:
        raise ValueError(f"probe: {n} feature rows but {labels.shape[0]} labels")
    step = block_rows or int(getattr(array, "chunks", (4096,))[0])
    classes, y = np.unique(labels, return_inverse=True)
    train = ~test_mask
    mean, std = _standardiser(*_shifted_stats(array, train, step))
    n_train = int(train.sum())
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, classes.size, dtype=torch.float64, device=dev)
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
                ce = torch.nn.functional.cross_entropy(model(z[batch]), target[batch])
                (ce + (model.weight ** 2).sum() / (2 * SGD_C * n_train)).backward()
                optimiser.step()
    right, pred_test = 0, []
    with torch.no_grad():
        for a, b in blocks:
            z = torch.as_tensor((np.asarray(array[a:b], dtype=np.float64) - mean) / std, device=dev)
            pred = model(z).argmax(1).cpu().numpy()
            right += int(np.sum((pred == y[a:b])[train[a:b]]))
            pred_test.append(pred[test_mask[a:b]])
    pred_test = np.concatenate(pred_test)
    return ProbeResult(right / n_train, float(np.mean(pred_test == y[test_mask])), classes[pred_test], "sgd", True,
                       SGD_C)


def probe_ridge(array: Any, labels: np.ndarray, test_mask: np.ndarray, val_mask: np.ndarray, *,
                block_rows: int | None = None, grid: Sequence[float] = RIDGE_GRID) -> ProbeResult:
    """Exact ridge probe from streamed sufficient statistics (float64): standardised features, one-hot
    targets centred, penalty lam * n_fit chosen on the validation rows, refit on all training rows."""
    labels, test_mask = np.asarray(labels), np.asarray(test_mask, dtype=bool)
    n, d = array.shape
    step = block_rows or int(getattr(array, "chunks", (4096,))[0])
    classes, y = np.unique(labels, return_inverse=True)
    onehot = np.eye(classes.size)[y]
    train = ~test_mask
    mean, std = _standardiser(*_shifted_stats(array, train, step))
    parts = {"fit": train & ~val_mask, "val": val_mask}
    gram = {p: np.zeros((d, d)) for p in parts}
    cross = {p: np.zeros((d, classes.size)) for p in parts}
    zsum = {p: np.zeros(d) for p in parts}
    for a, b in _row_blocks(n, step):
        z = (np.asarray(array[a:b], dtype=np.float64) - mean) / std
        for p, mask in parts.items():
            rows = mask[a:b]
            gram[p] += z[rows].T @ z[rows]
            cross[p] += z[rows].T @ onehot[a:b][rows]
            zsum[p] += z[rows].sum(0)

    counts = {p: int(m.sum()) for p, m in parts.items()}
    ysum = {p: onehot[m].sum(0) for p, m in parts.items()}

    def solutions(keys: Sequence[str], lams: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
        count = sum(counts[k] for k in keys)
        mu = sum(zsum[k] for k in keys) / count
        ybar = sum(ysum[k] for k in keys) / count
        cov = sum(gram[k] for k in keys) - count * np.outer(mu, mu)
        xy = sum(cross[k] for k in keys) - count * np.outer(mu, ybar)
        evals, evecs = np.linalg.eigh(cov)
        proj = evecs.T @ xy
        out = []
        for lam in lams:
            w = evecs @ (proj / (np.maximum(evals, 0.0) + lam * count)[:, None])
            out.append((w, ybar - mu @ w))
        return out

    path = solutions(["fit"], grid)
    val_right = np.zeros(len(grid))
    for a, b in _row_blocks(n, step):
        rows = val_mask[a:b]
        if rows.any():
            z = (np.asarray(array[a:b], dtype=np.float64)[rows] - mean) / std
            val_right += [np.sum((z @ w + c).argmax(1) == y[a:b][rows]) for w, c in path]
    val_acc = val_right / max(counts["val"], 1)
    best = int(val_acc.argmax())
    w, c = solutions(["fit", "val"], [grid[best]])[0]
    pred = np.concatenate([((np.asarray(array[a:b], dtype=np.float64) - mean) / std @ w + c).argmax(1)
                           for a, b in _row_blocks(n, step)])
    return ProbeResult(float(np.mean(pred[train] == y[train])), float(np.mean(pred[test_mask] == y[test_mask])),
                       classes[pred[test_mask]], "ridge", True, float(grid[best]),
                       {float(g): float(v) for g, v in zip(grid, val_acc)})


def choose_solver(n_rows: int, n_features: int, memory_budget: int) -> Literal["lbfgs", "sgd"]:
    """`sgd` when a float64 copy of the features (x3 for standardising) exceeds the budget, else `lbfgs`."""
    return "sgd" if 3 * 8 * n_rows * n_features > memory_budget else "lbfgs"


def _groups(widths: Mapping[str, int], n_rows: int, memory_budget: int) -> list[list[str]]:
    """Sites (by width, so a group pads little) in groups of at most `GROUP_SITES` whose float32 features
    and gradients (x4) fit the budget."""
    groups: list[list[str]] = []
    used = 0
    for sid in sorted(widths, key=lambda s: widths[s]):
        cost = 4 * 4 * n_rows * widths[sid]
        if groups and used + cost <= memory_budget and len(groups[-1]) < GROUP_SITES:
            groups[-1].append(sid)
            used += cost
        else:
            groups.append([sid])
            used = cost
    return groups


def probe_sites(arrays: Mapping[str, Any], labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                solver: Solver = "auto", memory_budget: int = 2**30, device: str = "auto",
                sample: np.ndarray | None = None, image_index: np.ndarray | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> xr.Dataset:
    """Probe every site (site id -> (n, d) array): `train_accuracy`, `test_accuracy`, `backend`, `converged`,
    `C`, `iterations`, `gradient` (site), `validation_accuracy` (site, C) and `prediction` (site,
    test_sample), test_sample = the test rows' `sample` coordinate (default: row numbers), with their true
    `test_label`. `solver` auto: batched L-BFGS for the sites that fit `memory_budget` (in groups that fit
    it), out-of-core SGD for the others. `progress(done, total, last_site)` after every group/site."""
    labels, test_mask = np.asarray(labels), np.asarray(test_mask, dtype=bool)
    image_index = np.arange(labels.size) if image_index is None else np.asarray(image_index)
    val_mask = validation_mask(image_index, labels, test_mask, seed)
    n = labels.size
    for sid, array in arrays.items():
        if array.shape[0] != n:
            raise ValueError(f"probe: site {sid!r} has {array.shape[0]} rows but there are {n} labels")
    solvers = {sid: choose_solver(n, a.shape[1], memory_budget) if solver == "auto" else solver
               for sid, a in arrays.items()}
    results: dict[str, ProbeResult] = {}

    def done(last: str) -> None:
        if progress:
            progress(len(results), len(arrays), last)

    for group in _groups({s: arrays[s].shape[1] for s in arrays if solvers[s] == "lbfgs"}, n, memory_budget):
        fitted = probe_group([np.asarray(arrays[s][:]) for s in group], labels, test_mask, val_mask, device=device)
        results.update(zip(group, fitted))
        done(group[-1])
    for sid in (s for s in arrays if solvers[s] != "lbfgs"):
        results[sid] = (probe_ridge(arrays[sid], labels, test_mask, val_mask) if solvers[sid] == "ridge"
                        else probe_streaming(arrays[sid], labels, test_mask, seed=seed, device=device))
        done(sid)
    sites = list(arrays)
    rows = np.flatnonzero(test_mask) if sample is None else np.asarray(sample)[test_mask]
    grid = sorted({c for r in results.values() for c in r.validation_accuracy})
    val = [[results[s].validation_accuracy.get(c, np.nan) for c in grid] for s in sites]
    return xr.Dataset(
        {"train_accuracy": ("site", [results[s].train_accuracy for s in sites]),
         "test_accuracy": ("site", [results[s].test_accuracy for s in sites]),
         "backend": ("site", [results[s].backend for s in sites]),
         "converged": ("site", [results[s].converged for s in sites]),
         "C": ("site", [results[s].C for s in sites]),
         "iterations": ("site", [results[s].iterations for s in sites]),
         "gradient": ("site", [results[s].gradient for s in sites]),
         "validation_accuracy": (("site", "penalty"), np.asarray(val, dtype=np.float64).reshape(len(sites), len(grid))),
         "prediction": (("site", "test_sample"), np.stack([results[s].predictions for s in sites]))},
        coords={"site": sites, "penalty": grid, "test_sample": rows,
                "test_label": ("test_sample", labels[test_mask])},
        attrs={"seed": seed, "n_train": int((~test_mask).sum()), "n_test": int(test_mask.sum()),
               "n_validation": int(val_mask.sum()), "C_grid": list(C_GRID), "ridge_grid": list(RIDGE_GRID),
               "stopping_rule": f"L-BFGS until every site's gradient max-norm <= {GRAD_TOL} or {MAX_ITER} iterations "
                                f"(C path: {PATH_TOL} or {PATH_MAX_ITER} iterations)",
               "selection": f"C per site by validation accuracy on {VALIDATION_FRACTION:.0%} of the training images",
               "standardised": "train mean/std"})
