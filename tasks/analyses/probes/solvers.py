"""The probe's three solvers of one objective: L2-regularised multinomial logistic regression on standardised
features, mean cross-entropy + |W|^2 / (2 C n_train) (scikit-learn's, divided by n_train).

- `probe_group` (`lbfgs`): a group of sites at once in torch, float32, features padded with zero columns to
  the group's widest site (exact: a zero column keeps a zero weight), each site in the principal basis of its
  training rows (`principal_basis`), fit by the batched L-BFGS of `_lbfgs` (each site its own: a site's fit
  does not depend on the sites beside it) preconditioned by the Hessian's diagonal at the fit's start. C is
  chosen from `C_GRID` on the validation split: fits along the grid from the strongest penalty to the
  weakest, each warm-started from the previous one; the C with the best validation accuracy wins (ties: the
  stronger penalty), then the probe is refit on all training rows from that solution. Stopping rule
  (recorded): the gradient's root mean square over the site's (d + 1) K parameters <= `GRAD_TOL` (invariant
  to the basis), or `MAX_ITER` iterations per fit; `converged` says which.
- `probe_streaming` (`sgd`): out of core, for sites whose features do not fit the memory budget: Adam over
  minibatches read row block by row block, at C = `SGD_C`.
- `probe_ridge` (`ridge`): exact closed form from the sufficient statistics XᵀX, Xᵀ1, XᵀY (one-hot) of one
  streaming pass (any N), the penalty chosen from `RIDGE_GRID` on the validation split; classes by argmax of
  the least-squares scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from tasks.analyses.probes._lbfgs import minimise
from tasks.analyses.probes.protocol import (
    principal_basis,
    row_blocks,
    standardise,
    standardiser,
    streamed_stats,
    validation_mask,
)
from tasks.extract import resolve_device

C_GRID = (0.01, 0.1, 1.0, 10.0)
RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # penalty per training row on standardised features
GRAD_TOL = 3e-5  # gradient RMS: about a max-norm of 1e-4 on a dense gradient of ~4000 entries
MAX_ITER = 500
LOG_FLOOR = 80.0
SGD_C = 1.0
STOPPING_RULE = (f"L-BFGS per site, the C path and the refit each until the site's gradient RMS <= {GRAD_TOL} "
                 f"or {MAX_ITER} iterations")


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


@dataclass(frozen=True)
class LogisticFit:
    """Fitted probes of G sites: weight (G, K, d: a row per class) and bias (G, K) torch tensors, the
    root-mean-square gradient (G,) at the end and the iterations (G,) per site."""

    weight: Any
    bias: Any
    gradient: np.ndarray
    iterations: np.ndarray


def _logits(features: Any, weight: Any, bias: Any) -> Any:
    """(G, K, n) logits of `features` (G, n, d) under weight (G, K, d) and bias (G, K)."""
    import torch

    return torch.baddbmm(bias.unsqueeze(2), weight, features.transpose(1, 2))


@dataclass(frozen=True)
class _Logistic:
    """G sites' objectives (mean CE + penalty |W|^2) of flat parameters theta (G, K*d + K: W then bias):
    `features` (G, n, d), `labels` (1, 1, n) int64 and their `onehot` (K, n), `penalty` (G,) float64.
    Class-major products (K x d times d x n, K x n times n x d): two to three times faster on CPU than the
    n x d times d x K forms; large temporaries reused in place (see `_lbfgs._two_loop`)."""

    features: Any
    labels: Any
    onehot: Any
    penalty: Any

    def split(self, theta: Any) -> tuple[Any, Any]:
        """(weight (G, K, d), bias (G, K)) views of `theta`."""
        g, _, d = self.features.shape
        k = self.onehot.shape[0]
        return theta[:, :k * d].view(g, k, d), theta[:, k * d:]

    def log_probs(self, weight: Any, bias: Any) -> Any:
        """(G, K, n) log softmax of the logits."""
        shifted = _logits(self.features, weight, bias)
        shifted -= shifted.amax(1, keepdim=True)
        # exp of -LOG_FLOOR and below taken as exp(-LOG_FLOOR) (1e-35 of the largest term, below float32's
        # resolution of the sum): no denormal float32 numbers, which CPUs compute with tens of times slower
        return shifted.sub_(shifted.clamp(min=-LOG_FLOOR).exp_().sum(1, keepdim=True).log_())

    def __call__(self, theta: Any) -> tuple[Any, Any]:
        import torch

        weight, bias = self.split(theta)
        n = self.onehot.shape[1]
        logp = self.log_probs(weight, bias)
        picked = logp.gather(1, self.labels.expand(len(logp), 1, n)).squeeze(1)  # log p of the true classes
        loss = self.penalty * weight.flatten(1).square().sum(1, dtype=torch.float64) - picked.double().sum(1) / n
        residual = logp.clamp_(min=-LOG_FLOOR).exp_().sub_(self.onehot).div_(n)
        grad_w = torch.bmm(residual, self.features).addcmul_(self.decay(), weight)
        return loss, torch.cat([grad_w.flatten(1), residual.sum(2)], 1)

    def decay(self) -> Any:
        """(G, 1, 1): the penalty's gradient per unit weight, 2 * penalty."""
        return (2 * self.penalty).to(self.features.dtype)[:, None, None]

    def keep(self, index: Any) -> _Logistic:
        """The sites at positions `index` only."""
        return _Logistic(self.features[index], self.labels, self.onehot, self.penalty[index])

    def hessian_diagonal(self, theta: Any) -> Any:
        """(G, p): the diagonal of each site's Hessian at `theta`."""
        import torch

        weight, bias = self.split(theta)
        prob = self.log_probs(weight, bias).clamp_(min=-LOG_FLOOR).exp_()
        curvature = prob * (1 - prob) / self.onehot.shape[1]
        diag_w = torch.bmm(curvature, self.features.square()) + self.decay()
        return torch.cat([diag_w.flatten(1), curvature.sum(2)], 1)


def fit_logistic(features: Any, y: Any, c: np.ndarray, n_classes: int, *, init: tuple[Any, Any] | None = None,
                 tol: float = GRAD_TOL, max_iter: int = MAX_ITER, n_params: np.ndarray | None = None) -> LogisticFit:
    """Batched L2 multinomial logistic regression: `features` (G, n, d) float32 torch tensor (G sites on
    the same rows), `y` (n,) int64 classes 0..n_classes-1, `c` (G,) inverse penalties; from `init`
    (weight (G, K, d), bias (G, K)) or zeros. Minimises mean CE + |W_g|^2 / (2 c_g n) for every site with
    its own L-BFGS (`_lbfgs.minimise`), until the site's root-mean-square gradient (over `n_params[g]`
    parameters: default all, padding included) <= `tol`, its line search stalls, or `max_iter` iterations."""
    import torch

    g, n, d = features.shape
    dev, dtype = features.device, features.dtype
    onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype).T.contiguous()
    objective = _Logistic(features, y.view(1, 1, n), onehot,
                          torch.as_tensor(1.0 / (2.0 * np.asarray(c, dtype=np.float64) * n), device=dev))
    n_params = np.full(g, (d + 1) * n_classes) if n_params is None else np.asarray(n_params)
    theta = (torch.cat([init[0].reshape(g, -1), init[1]], 1).clone() if init is not None
             else torch.zeros(g, (d + 1) * n_classes, dtype=dtype, device=dev))
    rms = torch.as_tensor(np.sqrt(n_params), dtype=dtype, device=dev)
    found = minimise(objective, theta, 1.0 / objective.hessian_diagonal(theta), tol * rms, max_iter=max_iter)
    weight, bias = objective.split(found.theta)
    return LogisticFit(weight, bias, (found.gradient.norm(dim=1) / rms).cpu().numpy().astype(np.float64),
                       found.iterations.cpu().numpy())


def _predict(fit: LogisticFit, features: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return _logits(features, fit.weight, fit.bias).argmax(1).cpu().numpy()


def probe_group(xs: Sequence[np.ndarray], labels: np.ndarray, test_mask: np.ndarray, val_mask: np.ndarray, *,
                device: str = "auto", grid: Sequence[float] = C_GRID, tol: float = GRAD_TOL,
                max_iter: int = MAX_ITER) -> list[ProbeResult]:
    """Probe several sites (features (n, d_s) on the same rows) at once with the batched L-BFGS: the C
    path on the training rows outside `val_mask`, then the refit at each site's chosen C; each site
    standardised, then in its training rows' principal basis."""
    import torch

    dev = resolve_device(device)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    train = ~test_mask
    fit_rows, val_rows, train_rows = np.flatnonzero(train & ~val_mask), np.flatnonzero(val_mask), np.flatnonzero(train)
    n_params = np.asarray([(x.shape[1] + 1) * classes.size for x in xs])
    bases = [principal_basis(standardise(x, train), train) for x in xs]
    z = torch.zeros(len(xs), len(y), max(b.shape[1] for b in bases), dtype=torch.float32, device=dev)
    for i, basis in enumerate(bases):
        z[i, :, :basis.shape[1]] = torch.as_tensor(basis, device=dev)
    del bases
    yt = torch.as_tensor(y, device=dev)
    path: list[LogisticFit] = []
    z_fit = z[:, fit_rows]
    for c in grid:
        path.append(fit_logistic(z_fit, yt[fit_rows], np.full(len(xs), c), classes.size,
                                 init=(path[-1].weight, path[-1].bias) if path else None, tol=tol,
                                 max_iter=max_iter, n_params=n_params))
    del z_fit
    val_acc = np.stack([(_predict(f, z[:, val_rows]) == y[val_rows]).mean(1) for f in path])  # (grid, G)
    best = val_acc.argmax(0)  # first maximum: the strongest penalty among the ties
    sites, choice = np.arange(len(xs)), (torch.as_tensor(best), torch.arange(len(xs)))
    init = torch.stack([f.weight for f in path])[choice], torch.stack([f.bias for f in path])[choice]
    chosen = np.asarray(grid, dtype=np.float64)[best]
    final = fit_logistic(z[:, train_rows], yt[train_rows], chosen, classes.size, init=init, tol=tol,
                         max_iter=max_iter, n_params=n_params)
    pred = _predict(final, z)
    iterations = sum(f.iterations for f in path) + final.iterations  # per site, path and refit
    return [ProbeResult(train_accuracy=float(np.mean(pred[s][train] == y[train])),
                        test_accuracy=float(np.mean(pred[s][test_mask] == y[test_mask])),
                        predictions=classes[pred[s][test_mask]], backend="lbfgs",
                        converged=bool(final.gradient[s] <= tol), C=float(chosen[s]),
                        validation_accuracy={float(c): float(val_acc[j, s]) for j, c in enumerate(grid)},
                        iterations=int(iterations[s]), gradient=float(final.gradient[s])) for s in sites]


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
    mean, std = standardiser(*streamed_stats(array, train, step))
    n_train = int(train.sum())
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, classes.size, dtype=torch.float64, device=dev)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    blocks = list(row_blocks(n, step))
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
    predictions = np.concatenate(pred_test)
    return ProbeResult(train_accuracy=right / n_train, test_accuracy=float(np.mean(predictions == y[test_mask])),
                       predictions=classes[predictions], backend="sgd", converged=True, C=SGD_C)


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
    mean, std = standardiser(*streamed_stats(array, train, step))
    parts = {"fit": train & ~val_mask, "val": val_mask}
    gram = {p: np.zeros((d, d)) for p in parts}
    cross = {p: np.zeros((d, classes.size)) for p in parts}
    zsum = {p: np.zeros(d) for p in parts}
    for a, b in row_blocks(n, step):
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
    for a, b in row_blocks(n, step):
        rows = val_mask[a:b]
        if rows.any():
            z = (np.asarray(array[a:b], dtype=np.float64)[rows] - mean) / std
            val_right += [np.sum((z @ w + c).argmax(1) == y[a:b][rows]) for w, c in path]
    val_acc = val_right / max(counts["val"], 1)
    best = int(val_acc.argmax())
    w, c = solutions(["fit", "val"], [grid[best]])[0]
    pred = np.concatenate([((np.asarray(array[a:b], dtype=np.float64) - mean) / std @ w + c).argmax(1)
                           for a, b in row_blocks(n, step)])
    return ProbeResult(train_accuracy=float(np.mean(pred[train] == y[train])),
                       test_accuracy=float(np.mean(pred[test_mask] == y[test_mask])),
                       predictions=classes[pred[test_mask]], backend="ridge", converged=True, C=float(grid[best]),
                       validation_accuracy={float(g): float(v) for g, v in zip(grid, val_acc)})


def choose_solver(n_rows: int, n_features: int, memory_budget: int) -> Literal["lbfgs", "sgd"]:
    """`sgd` when a float64 copy of the features (x3 for standardising) exceeds the budget, else `lbfgs`."""
    return "sgd" if 3 * 8 * n_rows * n_features > memory_budget else "lbfgs"
