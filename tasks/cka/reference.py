"""Float64 reference CKA, written straight from the formulas in DESIGN.md ("Similarity: the math").

Slow on purpose (it builds N x N matrices and the centring matrix H): it is the oracle every fast
path in `tasks.cka.exact` is tested against, and the most robust path. numpy only.

- Linear kernel K = X X^T.  RBF kernel K_ij = exp(-|x_i - x_j|^2 / (2 t^2 m)), where m is the median
  of the squared pairwise distances over all N^2 pairs, diagonal included (the convention of
  Kornblith et al.'s public reference code, so values match it).
- Biased HSIC: tr(K H L H).  Unbiased HSIC_1 (Song et al. 2012), with K~ = K with a zero diagonal:
  [tr(K~ L~) + (1'K~1)(1'L~1)/((N-1)(N-2)) - 2/(N-2) 1'K~L~1] / (N(N-3)).
- CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); the unbiased value may be negative (never clamped).

`cka` first centres each input's features and divides them by their RMS (neither changes CKA), so
large offsets and extreme scales cost no accuracy; RBF distances are differences of rows. A site is
degenerate, and CKA NaN with a `DegenerateSiteWarning` naming the reason, when it has non-finite
values, is constant, has a zero RBF median distance, or when its self-HSIC is zero relative to its
scale: HSIC(K, K) <= `degenerate_floor` = N eps ||K||_F^2 (in the units of the estimator), with K the
Gram of the centred features (RBF: minus its mean entry) and eps the working precision's machine epsilon.
"""

from __future__ import annotations

import warnings

import numpy as np

KERNELS = ("linear", "rbf")


class DegenerateSiteWarning(RuntimeWarning):
    """Some CKA entries are NaN because a site's kernel is degenerate; reasons are in the attrs."""


def squared_distances(x: np.ndarray) -> np.ndarray:
    """All N x N squared Euclidean distances between the rows of x (float64, exact zeros on the diagonal)."""
    x = np.asarray(x, dtype=np.float64)
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def gram(x: np.ndarray, kernel: str = "linear", rbf_threshold: float = 0.5) -> np.ndarray:
    """The N x N kernel matrix of the rows of x."""
    x = np.asarray(x, dtype=np.float64)
    if kernel == "linear":
        return x @ x.T
    if kernel == "rbf":
        sq = squared_distances(x)
        return np.exp(-sq / (2.0 * rbf_threshold**2 * np.median(sq)))
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def hsic(k: np.ndarray, l: np.ndarray, *, unbiased: bool = False) -> float:
    """Biased tr(KHLH) or unbiased HSIC_1 of two N x N kernel matrices."""
    n = k.shape[0]
    if not unbiased:
        h = np.eye(n) - np.ones((n, n)) / n
        return float(np.trace(k @ h @ l @ h))
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    value = (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (one @ kt @ lt @ one))
    return float(value / (n * (n - 3)))


def degenerate_floor(frobenius: np.ndarray | float, n: int, *, unbiased: bool, eps: float) -> np.ndarray | float:
    """The self-HSIC at or below which a kernel counts as zero: N eps ||K||_F^2, divided by N(N-3) for
    the unbiased estimator (the normalisation of HSIC_1). `frobenius`: ||K||_F^2 of the centred Gram."""
    return n * eps * np.asarray(frobenius) / (n * (n - 3) if unbiased else 1)


def floor_reason(value: float, floor: float) -> str:
    """The NaN reason of a self-HSIC at or below its floor."""
    return (f"self-HSIC {value:.3g} <= N*eps*||K||_F^2 = {floor:.3g} "
            "(zero relative to the kernel's scale: degenerate kernel)")


def _prepared(x: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Centred rows divided by their RMS, or (None, reason) for a degenerate input."""
    if not np.all(np.isfinite(x)):
        return None, f"{x.size - int(np.isfinite(x).sum())} non-finite (NaN/Inf) values"
    centred = x - x.mean(axis=0)
    rms = np.sqrt(np.mean(centred**2)) if x.size else 0.0
    if np.all(np.ptp(x, axis=0) == 0) or not rms > 0:
        return None, "constant activations (zero variance)"
    return centred / rms, None


def _centred_gram(x: np.ndarray, kernel: str, rbf_threshold: float) -> tuple[np.ndarray | None, str | None]:
    if kernel == "linear":
        return x @ x.T, None
    sq = squared_distances(x)
    median = np.median(sq)
    if not median > 0:
        return None, "median squared pairwise distance is 0 (RBF bandwidth undefined)"
    return np.exp(-sq / (2.0 * rbf_threshold**2 * median)), None


def cka(x: np.ndarray, y: np.ndarray, *, kernel: str = "linear", unbiased: bool = False,
        rbf_threshold: float = 0.5) -> float:
    """CKA between two (N, d_x), (N, d_y) feature matrices, in float64.

    NaN, with a `DegenerateSiteWarning` naming the reason, when either input is degenerate (see the
    module docstring).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (N, d) arrays with the same N, got {x.shape} and {y.shape}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    n = x.shape[0]
    grams, self_hsic = [], []
    for name, a in (("x", x), ("y", y)):
        prepared, reason = _prepared(a)
        k = None
        if reason is None:
            k, reason = _centred_gram(prepared, kernel, rbf_threshold)
        if reason is None:
            value = hsic(k, k, unbiased=unbiased)
            floor = degenerate_floor(np.sum((k - k.mean() if kernel == "rbf" else k) ** 2), n,
                                     unbiased=unbiased, eps=np.finfo(np.float64).eps)
            if not value > floor:
                reason = floor_reason(value, float(floor))
        if reason is not None:
            warnings.warn(f"CKA is NaN: input {name}: {reason}", DegenerateSiteWarning, stacklevel=2)
            return float("nan")
        grams.append(k)
        self_hsic.append(value)
    return hsic(grams[0], grams[1], unbiased=unbiased) / np.sqrt(self_hsic[0] * self_hsic[1])
