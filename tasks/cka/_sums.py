"""Sufficient statistics of all S x S HSIC values, their merging, and the final HSIC / CKA formulas.

For site kernels K_s (N x N) the engine accumulates, in float64:
- F[s, t] = <K_s, K_t> (Frobenius product, diagonal included),
- R[s]    = K_s 1 (row sums), stored per row block,
- D[s]    = diag(K_s), stored per row block.
From these: biased tr(KHLH) = <K,L> - (2/N) r_K.r_L + (1'K1)(1'L1)/N^2, and unbiased HSIC_1 with
K~ = K - diag: tr(K~L~) = <K,L> - d_K.d_L, 1'K~1 = 1'K1 - sum d_K, K~1 = r_K - d_K.
(With `offdiagonal`, F holds <K~, L~> directly.) A site is degenerate when its self-HSIC is at most
N eps <K_s, K_s> (`self_floor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.cka.reference import degenerate_floor, floor_reason


@dataclass
class Sums:
    """Partial sums over some block pairs; `rows` / `diag` map a row-block start to an (S, len) array."""

    products: np.ndarray
    rows: dict[int, np.ndarray] = field(default_factory=dict)
    diag: dict[int, np.ndarray] = field(default_factory=dict)
    offdiagonal: bool = False        # products are <K~, L~>, the Grams' diagonals left out (no cancellation)


def _add_blocks(into: dict[int, np.ndarray], blocks: dict[int, np.ndarray]) -> None:
    for start, values in blocks.items():
        into[start] = into[start] + values if start in into else values.copy()


def combine(parts: list[Sums]) -> Sums:
    """Sum of partial sums (associative; used as the tree-reduction step)."""
    out = Sums(np.array(parts[0].products, dtype=np.float64, copy=True), offdiagonal=parts[0].offdiagonal)
    _add_blocks(out.rows, parts[0].rows)
    _add_blocks(out.diag, parts[0].diag)
    for part in parts[1:]:
        out.products += part.products
        _add_blocks(out.rows, part.rows)
        _add_blocks(out.diag, part.diag)
    return out


def assemble(blocks: dict[int, np.ndarray], n_sites: int, n: int) -> np.ndarray:
    """(S, N) array from per-block pieces; rows no piece covers are zero."""
    out = np.zeros((n_sites, n))
    for start, values in blocks.items():
        out[:, start:start + values.shape[1]] += values
    return out


def hsic_matrix(sums: Sums, n: int, *, unbiased: bool) -> np.ndarray:
    """All S x S HSIC values (biased tr(KHLH), or unbiased HSIC_1) from the accumulated sums."""
    s = sums.products.shape[0]
    f = sums.products
    r = assemble(sums.rows, s, n)
    if not unbiased:
        total = r.sum(axis=1)
        return f - (2.0 / n) * (r @ r.T) + np.outer(total, total) / n**2
    d = assemble(sums.diag, s, n)
    trace = f if sums.offdiagonal else f - d @ d.T
    off_total = r.sum(axis=1) - d.sum(axis=1)
    off_rows = r - d
    value = (trace + np.outer(off_total, off_total) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * (off_rows @ off_rows.T))
    return value / (n * (n - 3))


def self_floor(sums: Sums, n: int, *, unbiased: bool, precision: str) -> np.ndarray:
    """Per-site self-HSIC at or below which the site's kernel is zero relative to its scale (degenerate):
    N eps ||K_s||_F^2 (`reference.degenerate_floor`), eps of the working precision."""
    eps = float(np.finfo(np.float32 if precision == "float32" else np.float64).eps)
    squares = np.diag(sums.products)
    if sums.offdiagonal:
        d = assemble(sums.diag, sums.products.shape[0], n)
        squares = squares + (d * d).sum(axis=1)
    return degenerate_floor(squares, n, unbiased=unbiased, eps=eps)


def cka_from_hsic(hsic: np.ndarray, keys: list[str], reasons: dict[str, str], floor: np.ndarray) -> np.ndarray:
    """CKA = HSIC_st / sqrt(HSIC_ss HSIC_tt), NaN in the rows/columns of degenerate sites.

    Sites already in `reasons` stay NaN; sites whose self-HSIC is not finite or not above `floor`
    (per site, `self_floor`) are added to `reasons` (in place). Nothing is clamped.
    """
    self_hsic = np.diag(hsic).copy()
    for i, key in enumerate(keys):
        if key in reasons:
            continue
        if not np.isfinite(self_hsic[i]):
            reasons[key] = f"self-HSIC is {self_hsic[i]!r} (degenerate kernel)"
        elif not self_hsic[i] > floor[i]:
            reasons[key] = floor_reason(float(self_hsic[i]), float(floor[i]))
    bad = np.array([key in reasons for key in keys])
    scale = np.sqrt(np.where(bad, 1.0, self_hsic))
    out = hsic / np.outer(scale, scale)
    out[bad, :] = np.nan
    out[:, bad] = np.nan
    return out
