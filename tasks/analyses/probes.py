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
  there is one; with a Dask client, groups run in parallel as tasks on its workers. Each site keeps its own
  L-BFGS inside the batch (history, step, stop), so a site's fit does not depend on the sites beside it
  (finished sites leave the batch). With fewer training rows than features, a site is fit in an
  orthonormal basis of its training rows' span (`row_space`: exact, and cheaper). Stopping rule (recorded):
  the gradient's root mean square over the site's (d + 1) K parameters <= `GRAD_TOL` (invariant to that
  basis), or `MAX_ITER` iterations; `converged` says which.
- `sgd`: out of core, for sites whose features do not fit `memory_budget`: Adam over minibatches read row
  block by row block from the store, at C = 1.
- `ridge`: exact closed form from the sufficient statistics XᵀX, Xᵀ1, XᵀY (one-hot) accumulated in one
  streaming pass (any N), the ridge penalty chosen from `RIDGE_GRID` on the same validation split; classes
  by argmax of the least-squares scores.
"""

from __future__ import annotations

import functools
import itertools
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
GRAD_TOL = 3e-5  # gradient RMS: about a max-norm of 1e-4 on a dense gradient of ~4000 entries
PATH_TOL = 3e-4  # the C path only ranks C on validation rows: a looser stopping rule there
PATH_MAX_ITER = 100
MAX_ITER = 500
HISTORY = 10  # L-BFGS pairs kept per site
LINE_SEARCH_HALVINGS = 30
LOG_FLOOR = 80.0
GROUP_SITES = 64  # sites per batched fit (each site keeps its own L-BFGS: grouping changes no result)
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


def row_space(z: np.ndarray, train: np.ndarray) -> np.ndarray:
    """`z` (n, d) in an orthonormal basis of its training rows' span when there are fewer training rows than
    features (else `z` itself): (n, r), r = the numerical rank (singular values above max(n, d) * eps * the
    largest). Exact for the probe: an L2-penalised linear model's optimal weights lie in that span (for the
    validation path's subset of the rows too), an orthonormal basis keeps the penalty and the gradient's
    norm, and every row's logits are z V (V^T W) = z W."""
    rows = z[train]
    if rows.shape[0] >= rows.shape[1]:
        return z
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    rank = int(np.sum(s > (s[0] if s.size else 0.0) * max(rows.shape) * np.finfo(np.float64).eps))
    return z @ vt[:max(rank, 1)].T


@dataclass
class _Fit:
    weight: Any  # (G, d, K) torch tensor
    bias: Any  # (G, K)
    gradient: np.ndarray  # (G,) root-mean-square gradient per site at the end
    iterations: np.ndarray  # (G,) iterations per site


def _objective(features: Any, onehot: Any, penalty: Any, theta: Any, d: int) -> tuple[Any, Any]:
    """Per-site objective (G,) float64 (mean CE + penalty |W|^2) and its gradient (G, p) at the flat
    parameters `theta` (G, d*K + K: W then bias), for G independent sites."""
    import torch

    g, n, _ = features.shape
    k = onehot.shape[1]
    weight, bias = theta[:, :d * k].view(g, d, k), theta[:, d * k:]
    logits = torch.baddbmm(bias.unsqueeze(1), features, weight)
    shifted = logits - logits.amax(2, keepdim=True)
    # exp of -LOG_FLOOR and below taken as exp(-LOG_FLOOR) (1e-35 of the largest term, below float32's
    # resolution of the sum): no denormal float32 numbers, which CPUs compute with tens of times slower
    logp = shifted - shifted.clamp(min=-LOG_FLOOR).exp().sum(2, keepdim=True).log()
    loss = -(logp * onehot).sum(2).double().sum(1) / n + penalty * (weight.double() ** 2).sum((1, 2))
    residual = (logp.clamp(min=-LOG_FLOOR).exp() - onehot) / n
    grad_w = torch.bmm(features.transpose(1, 2), residual) + (2 * penalty).to(theta.dtype)[:, None, None] * weight
    return loss, torch.cat([grad_w.reshape(g, -1), residual.sum(1)], 1)


def _lbfgs_direction(grad: Any, steps: Any, changes: Any, rho: Any, order: Sequence[int], gamma: Any) -> Any:
    """The L-BFGS two-loop recursion, per site: -H grad from the (newest first) `order` of the history."""
    q = grad.clone()
    alphas = []
    for j in order:
        alphas.append(rho[j] * (steps[j] * q).sum(1))
        q -= alphas[-1][:, None] * changes[j]
    q *= gamma[:, None]
    for j, alpha in zip(reversed(order), reversed(alphas)):
        q += steps[j] * (alpha - rho[j] * (changes[j] * q).sum(1))[:, None]
    return -q


def fit_logistic(features: Any, y: Any, c: np.ndarray, n_classes: int, *, init: _Fit | None = None,
                 tol: float = GRAD_TOL, max_iter: int = MAX_ITER, history: int = HISTORY,
                 n_params: np.ndarray | None = None) -> _Fit:
    """Batched L2 multinomial logistic regression: `features` (G, n, d) float32 torch tensor (G sites on
    the same rows), `y` (n,) int64 classes 0..n_classes-1, `c` (G,) inverse penalties; from `init` or
    zeros. Minimises mean CE + |W_g|^2 / (2 c_g n) for every site with its own L-BFGS (history, step and
    stopping per site, computed in one batch: a site's fit never depends on the others): Armijo
    backtracking (with the float32 rounding of the loss as slack), until the site's root-mean-square
    gradient (over `n_params[g]` parameters: default all, padding included) <= `tol`, its line search
    stalls, or `max_iter` iterations."""
    import torch

    g, n, d = features.shape
    dev, dtype = features.device, features.dtype
    onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype)
    penalty = torch.as_tensor(1.0 / (2.0 * np.asarray(c, dtype=np.float64) * n), device=dev)
    n_params = np.full(g, (d + 1) * n_classes) if n_params is None else np.asarray(n_params)
    theta = (torch.cat([init.weight.reshape(g, -1), init.bias], 1).clone() if init
             else torch.zeros(g, (d + 1) * n_classes, dtype=dtype, device=dev))
    loss, grad = _objective(features, onehot, penalty, theta, d)
    final_theta, final_grad = theta.clone(), grad.clone()
    members = torch.arange(g, device=dev)  # the sites still iterating, as positions in the batch
    steps = torch.zeros(history, *theta.shape, dtype=dtype, device=dev)
    changes, rho = torch.zeros_like(steps), torch.zeros(history, g, dtype=dtype, device=dev)
    gamma = torch.clamp(1.0 / grad.abs().sum(1), max=1.0)  # the first step: scaled steepest descent
    norm_tol = tol * torch.as_tensor(np.sqrt(n_params), dtype=dtype, device=dev)
    active = grad.norm(dim=1) > norm_tol
    iterations = torch.zeros(g, dtype=torch.int64, device=dev)
    slack = 8 * float(torch.finfo(dtype).eps)
    for it in range(max_iter):
        if not bool(active.any()):
            break
        if 2 * int(active.sum()) <= members.numel():  # drop the finished sites from the batch
            final_theta[members], final_grad[members] = theta, grad
            keep = active.nonzero().squeeze(1)
            members, features, penalty, norm_tol = members[keep], features[keep], penalty[keep], norm_tol[keep]
            theta, loss, grad, gamma, active = theta[keep], loss[keep], grad[keep], gamma[keep], active[keep]
            steps, changes, rho = steps[:, keep], changes[:, keep], rho[:, keep]
        order = [(it - 1 - j) % history for j in range(min(it, history))]
        direction = _lbfgs_direction(grad, steps, changes, rho, order, gamma)
        slope = (grad * direction).sum(1)
        uphill = slope >= 0  # a stale history: restart that site from steepest descent
        direction[uphill] = -grad[uphill] * gamma[uphill, None]
        slope = torch.where(uphill, -(grad ** 2).sum(1) * gamma, slope)
        direction[~active] = 0
        step, pending = torch.ones_like(gamma), active.clone()
        new_theta, new_loss, new_grad = theta.clone(), loss.clone(), grad.clone()
        for _ in range(LINE_SEARCH_HALVINGS):
            trial = theta + step[:, None] * direction
            trial_loss, trial_grad = _objective(features, onehot, penalty, trial, d)
            accept = pending & (trial_loss <= loss + 1e-4 * step.double() * slope.double() + slack * loss.abs())
            new_theta[accept], new_loss[accept] = trial[accept], trial_loss[accept]
            new_grad[accept] = trial_grad[accept]
            pending &= ~accept
            if not bool(pending.any()):
                break
            step = torch.where(pending, step / 2, step)
        moved = active & ~pending
        s_k, y_k = new_theta - theta, new_grad - grad
        sy = (s_k * y_k).sum(1)
        curvature = moved & (sy > 1e-10 * s_k.norm(dim=1) * y_k.norm(dim=1))
        slot = it % history
        steps[slot], changes[slot] = s_k * curvature[:, None], y_k * curvature[:, None]
        rho[slot] = torch.where(curvature, 1.0 / torch.where(curvature, sy, 1.0), 0.0)
        gamma = torch.where(curvature, sy / torch.clamp((y_k ** 2).sum(1), min=1e-30), gamma)
        theta, loss, grad = new_theta, new_loss, new_grad
        iterations[members] += active.long()
        active = moved & (grad.norm(dim=1) > norm_tol)
    final_theta[members], final_grad[members] = theta, grad
    weight, bias = final_theta[:, :d * n_classes].reshape(g, d, n_classes), final_theta[:, d * n_classes:]
    return _Fit(weight, bias, final_grad.norm(dim=1).cpu().numpy().astype(np.float64) / np.sqrt(n_params),
                iterations.cpu().numpy())


def _predict(fit: _Fit, features: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.baddbmm(fit.bias.unsqueeze(1), features, fit.weight).argmax(2).cpu().numpy()


def probe_group(xs: Sequence[np.ndarray], labels: np.ndarray, test_mask: np.ndarray, val_mask: np.ndarray, *,
                device: str = "auto", grid: Sequence[float] = C_GRID, tol: float = GRAD_TOL,
                max_iter: int = MAX_ITER) -> list[ProbeResult]:
    """Probe several sites (features (n, d_s) on the same rows) at once with the batched L-BFGS: the C
    path on the training rows outside `val_mask`, then the refit at each site's chosen C; each site
    standardised, then in its training rows' span (`row_space`)."""
    import torch

    dev = resolve_device(device)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    train = ~test_mask
    fit_rows, val_rows = np.flatnonzero(train & ~val_mask), np.flatnonzero(val_mask)
    n_params = np.asarray([(x.shape[1] + 1) * classes.size for x in xs])
    reduced = [row_space(_standardise(np.asarray(x, dtype=np.float64), train), train) for x in xs]
    z = torch.zeros(len(xs), len(y), max(x.shape[1] for x in reduced), dtype=torch.float32, device=dev)
    for i, x in enumerate(reduced):
        z[i, :, :x.shape[1]] = torch.as_tensor(x, device=dev)
    del reduced
    yt = torch.as_tensor(y, device=dev)
    sites = np.arange(len(xs))
    path, fit, z_fit = [], None, z[:, fit_rows]
    for c in grid:
        fit = fit_logistic(z_fit, yt[fit_rows], np.full(len(xs), c), classes.size, init=fit,
                           tol=max(tol, PATH_TOL), max_iter=min(max_iter, PATH_MAX_ITER), n_params=n_params)
        path.append(fit)
    del z_fit
    val_acc = np.stack([(_predict(f, z[:, val_rows]) == y[val_rows]).mean(1) for f in path])  # (grid, G)
    best = val_acc.argmax(0)  # first maximum: the strongest penalty among the ties
    init = _Fit(torch.stack([path[b].weight[s] for s, b in zip(sites, best)]),
                torch.stack([path[b].bias[s] for s, b in zip(sites, best)]), np.zeros(len(xs)), np.zeros(len(xs), int))
    chosen = np.asarray(grid, dtype=np.float64)[best]
    rows = np.flatnonzero(train)
    final = fit_logistic(z[:, rows], yt[rows], chosen, classes.size, init=init, tol=tol, max_iter=max_iter,
                         n_params=n_params)
    pred = _predict(final, z)
    iterations = sum(f.iterations for f in path) + final.iterations  # per site, path and refit
    return [ProbeResult(float(np.mean(pred[s][train] == y[train])), float(np.mean(pred[s][test_mask] == y[test_mask])),
                        classes[pred[s][test_mask]], "lbfgs", bool(final.gradient[s] <= tol), float(chosen[s]),
                        {float(c): float(val_acc[j, s]) for j, c in enumerate(grid)}, int(iterations[s]),
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


def _groups(widths: Mapping[str, int], n_rows: int, memory_budget: int, max_sites: int = GROUP_SITES
            ) -> list[list[str]]:
    """Sites (by width, so a group pads little) in groups of at most `max_sites` whose float32 features
    and gradients (x4) fit the budget."""
    groups: list[list[str]] = []
    used = 0
    for sid in sorted(widths, key=lambda s: widths[s]):
        cost = 4 * 4 * n_rows * widths[sid]
        if groups and used + cost <= memory_budget and len(groups[-1]) < max_sites:
            groups[-1].append(sid)
            used += cost
        else:
            groups.append([sid])
            used = cost
    return groups


def _read(array: Any) -> np.ndarray:
    return np.asarray(array[:])


def _fit_groups(groups: Sequence[Sequence[str]], arrays: Mapping[str, Any], fit: Callable[..., list[ProbeResult]],
                client: Any, slots: int) -> Iterator[tuple[Sequence[str], list[ProbeResult]]]:
    """(group, results) as the groups finish: `fit(features)` in this process, or as tasks on `client`
    with at most `slots` + 1 groups read and in flight at a time (memory: that many groups)."""
    if client is None:
        for group in groups:
            yield group, fit([_read(arrays[s]) for s in group])
        return
    from distributed import as_completed

    pending = iter(groups)
    of: dict[str, Sequence[str]] = {}  # future key -> its group

    def submit(group: Sequence[str]) -> Any:
        future = client.submit(fit, client.scatter([_read(arrays[s]) for s in group]), pure=False)
        of[future.key] = group
        return future

    running = as_completed([submit(g) for g in itertools.islice(pending, slots + 1)])
    for future in running:
        yield of.pop(future.key), future.result()
        if (group := next(pending, None)) is not None:
            running.add(submit(group))


def probe_sites(arrays: Mapping[str, Any], labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                solver: Solver = "auto", memory_budget: int = 2**30, device: str = "auto", client: Any = None,
                sample: np.ndarray | None = None, image_index: np.ndarray | None = None,
                progress: Callable[[int, int, str], None] | None = None) -> xr.Dataset:
    """Probe every site (site id -> (n, d) array): `train_accuracy`, `test_accuracy`, `backend`, `converged`,
    `C`, `iterations`, `gradient` (site), `validation_accuracy` (site, C) and `prediction` (site,
    test_sample), test_sample = the test rows' `sample` coordinate (default: row numbers), with their true
    `test_label`. `solver` auto: batched L-BFGS for the sites that fit `memory_budget` (in groups that fit
    it), out-of-core SGD for the others. With a Dask `client` (and a CPU device), the L-BFGS groups run in
    parallel as tasks on its workers (at least four groups per worker thread; the groups in flight together
    fit the budget); the results are the same as in this process. `progress(done, total, last_site)` once
    before the first fit (done 0, last_site ""), then after every group/site."""
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

    done("")

    batched = {s: arrays[s].shape[1] for s in arrays if solvers[s] == "lbfgs"}
    if client is not None and resolve_device(device).type == "cpu":
        slots = sum(client.nthreads().values())  # worker threads: the groups run as tasks there
        groups = _groups(batched, n, memory_budget // (slots + 1), max(1, len(batched) // (4 * slots)))
    else:
        client, slots, groups = None, 1, _groups(batched, n, memory_budget)
    fit = functools.partial(probe_group, labels=labels, test_mask=test_mask, val_mask=val_mask, device=device)
    for group, fitted in _fit_groups(groups, arrays, fit, client, slots):
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
               "stopping_rule": f"L-BFGS per site until its gradient RMS <= {GRAD_TOL} or {MAX_ITER} iterations "
                                f"(C path: {PATH_TOL} or {PATH_MAX_ITER} iterations)",
               "selection": f"C per site by validation accuracy on {VALIDATION_FRACTION:.0%} of the training images",
               "standardised": "train mean/std"})
