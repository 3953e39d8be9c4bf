"""Float64 reference CKA, written straight from the formulas in DESIGN.md ("Similarity: the math").

Slow on purpose (it builds N x N matrices and the centring matrix H): it is the oracle every fast
path in `tasks.cka.exact` is tested against. numpy only.

- Linear kernel K = X X^T.  RBF kernel K_ij = exp(-|x_i - x_j|^2 / (2 t^2 m)), where m is the median
  of the squared pairwise distances over all N^2 pairs, diagonal included (the convention of
  Kornblith et al.'s public reference code, so values match it).
- Biased HSIC: tr(K H L H).  Unbiased HSIC_1 (Song et al. 2012), with K~ = K with a zero diagonal:
  [tr(K~ L~) + (1'K~1)(1'L~1)/((N-1)(N-2)) - 2/(N-2) 1'K~L~1] / (N(N-3)).
- CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); the unbiased value may be negative (never clamped).
"""

from __future__ import annotations

import numpy as np

KERNELS = ("linear", "rbf")


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


def cka(x: np.ndarray, y: np.ndarray, *, kernel: str = "linear", unbiased: bool = False,
        rbf_threshold: float = 0.5) -> float:
    """CKA between two (N, d_x), (N, d_y) feature matrices.

    NaN when either input is constant (every column), has non-finite values, or has a self-HSIC
    that is not positive.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be (N, d) arrays with the same N, got {x.shape} and {y.shape}")
    if any(not np.all(np.isfinite(a)) or np.all(np.ptp(a, axis=0) == 0) for a in (x, y)):
        return float("nan")
    k, l = gram(x, kernel, rbf_threshold), gram(y, kernel, rbf_threshold)
    kl, kk, ll = (hsic(a, b, unbiased=unbiased) for a, b in ((k, l), (k, k), (l, l)))
    if not (kk > 0 and ll > 0):
        return float("nan")
    return kl / np.sqrt(kk * ll)
