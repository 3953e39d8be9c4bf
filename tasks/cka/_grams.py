"""Block Grams of all sites and their products, in torch (CPU, or CUDA when present): one block pair.

For rows a and b, every site's block Gram G_s = k(X_s[a], X_s[b]) is written into one stacked
tensor M (S x |a| x |b|); then P = w M M^T (w = 1 on diagonal blocks, 2 off it), the row sums of
both blocks and, on diagonal blocks, the Gram diagonal are returned in float64. With `GramSpec.rows`
(an incremental run) only those sites' rows of P and the other sites' self-products are formed.
Rows are centred with the float64 global column means and divided by the site's RMS (`scales`) in
float64, and only then cast to the working precision; RBF distances come from these rows, and RBF
Grams have their (subsample) mean value subtracted. None of this changes CKA, and it keeps float32
Grams and products accurate for large offsets and any overall scale.

Diagonal blocks are symmetric: their Grams are built in row tiles of GRAM_TILE from the upper
triangle (mirrored), and their products summed over the upper triangle (off-diagonal entries twice),
so the all-pairs cost is close to N^2 / 2 Gram entries rather than N^2 / 2 + N * block. Linear row
sums and diagonals come from the features in float64 (O(block * d), not O(block^2)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tasks.cka._sources import Sources
from tasks.cka._sums import Sums

Load = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]   # site -> centred (rows a, rows b or None)


@dataclass
class GramSpec:
    """Everything a task needs to build centred site Grams: data, means, scales, kernel scales, precision,
    device."""

    sources: Sources
    means: list[np.ndarray]
    scales: list[float]                # per-site RMS of the centred features (rows are divided by it)
    skip: frozenset[int]               # degenerate sites: their Grams are zero (NaN in the result)
    kernel: str
    bandwidths: list[float]            # RBF: 2 t^2 m per site (unused for linear)
    offsets: list[float]               # RBF: mean kernel value subtracted from every entry
    precision: str
    device: str
    rows: frozenset[int] | None = None   # sites whose product rows are needed (None: all pairs)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "float32" else torch.float64

    def tensor(self, site: int, raw: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Centred, scaled rows of one site (as read) in the working precision, on the device (into
        `out` when given; the input is never modified).

        float32 work on float16/float32 values is done in float32, subtracting the float64 mean in two
        float32 parts (its rounding, then the remainder): the first subtraction is exact for values near
        the mean (Sterbenz), so the result equals the float64 computation cast to float32 to rounding,
        whatever the offset, at a third of the memory traffic. Anything else is computed in float64."""
        raw = np.ascontiguousarray(raw)
        if self.dtype == torch.float32 and raw.dtype in (np.float16, np.float32):
            mean = self.means[site]
            high = mean.astype(np.float32)
            low = (mean - high).astype(np.float32)
            x = torch.as_tensor(raw, device=self.device)
            out = torch.sub(x, torch.as_tensor(high, device=self.device), out=out)
            return out.sub_(torch.as_tensor(low, device=self.device)).mul_(1.0 / self.scales[site])
        x = torch.as_tensor(raw, device=self.device).to(torch.float64)
        x = ((x - torch.as_tensor(self.means[site], device=self.device)) * (1.0 / self.scales[site])).to(self.dtype)
        return x if out is None else out.copy_(x)

    def centred(self, site: int, raw: np.ndarray) -> np.ndarray:
        """Centred, scaled rows of one site in float64 (numpy)."""
        return (np.asarray(raw, dtype=np.float64) - self.means[site]) / self.scales[site]

    def gram_into(self, site: int, xa: torch.Tensor, xb: torch.Tensor | None, out: torch.Tensor) -> None:
        """Write k(xa, xb) (xb None: k(xa, xa)) into `out`."""
        same = xb is None
        if same:
            symmetric_matmul(xa, out, mirror=self.kernel != "linear")   # linear margins never read the Gram
        else:
            for start in range(0, xa.shape[0], GRAM_TILE):    # row tiles: the output tile stays in cache
                torch.matmul(xa[start:start + GRAM_TILE], xb.T, out=out[start:start + GRAM_TILE])
        xb = xa if same else xb
        if self.kernel == "linear":
            return
        na, nb = (xa * xa).sum(1), (xb * xb).sum(1)
        out.mul_(-2.0).add_(na[:, None]).add_(nb[None, :]).clamp_(min=0.0)
        if same:
            out.fill_diagonal_(0.0)
        out.mul_(-1.0 / self.bandwidths[site]).exp_().sub_(self.offsets[site])


GRAM_TILE = 256           # rows per Gram tile (diagonal blocks: tiles of the upper triangle)


def symmetric_matmul(x: torch.Tensor, out: torch.Tensor, mirror: bool = True) -> None:
    """out = x x^T from the row tiles of its upper triangle (each tile: its rows, columns from the tile
    start on). mirror=False leaves the rest of the lower triangle unset: only for readers that stay in
    the computed tiles (`stack_products(symmetric=True)`)."""
    n = x.shape[0]
    for start in range(0, n, GRAM_TILE):
        stop = min(start + GRAM_TILE, n)
        torch.matmul(x[start:stop], x[start:].T, out=out[start:stop, start:])
        if mirror and stop < n:
            out[stop:, start:stop] = out[start:stop, stop:].T


def _margins(spec: GramSpec, xa: torch.Tensor, xb: torch.Tensor | None, g: torch.Tensor
             ) -> tuple[np.ndarray, np.ndarray]:
    """(row sums of g, its diagonal when xb is None, else its column sums) in float64.

    Linear kernel: from the features (xa (xb^T 1), |xa_i|^2), exact in float64; otherwise from g."""
    if spec.kernel == "linear":
        a = xa.to(torch.float64)
        b = a if xb is None else xb.to(torch.float64)
        rows = a @ b.sum(0)
        other = (a * a).sum(1) if xb is None else b @ a.sum(0)
    else:
        rows = g.sum(1, dtype=torch.float64)
        other = g.diagonal().to(torch.float64) if xb is None else g.sum(0, dtype=torch.float64)
    return rows.cpu().numpy(), other.cpu().numpy()


def gram_sums(spec: GramSpec, load: Load, starts: tuple[int, int], lengths: tuple[int, int],
              same: bool) -> Sums:
    """Partial sums of one block pair (same=True: a diagonal block, rows b == rows a)."""
    n_sites = len(spec.sources.keys)
    stack = torch.empty((n_sites, lengths[0], lengths[1]), dtype=spec.dtype, device=spec.device)
    row_a, other = np.zeros((n_sites, lengths[0])), np.zeros((n_sites, lengths[0 if same else 1]))
    for s in range(n_sites):
        if s in spec.skip:
            stack[s].zero_()                  # every other slot is overwritten by its Gram
            continue
        xa, xb = load(s)
        spec.gram_into(s, xa, xb, stack[s])
        row_a[s], other[s] = _margins(spec, xa, xb, stack[s])
    if same:
        return Sums(stack_products(stack, spec.rows, symmetric=True), {starts[0]: row_a}, {starts[0]: other})
    return Sums(2.0 * stack_products(stack, spec.rows), {starts[0]: row_a, starts[1]: other})


PRODUCT_CHUNK = 16384     # Gram entries per float32 dot product before the partial sum goes to float64


def stack_products(stack: torch.Tensor, rows: frozenset[int] | None, symmetric: bool = False) -> np.ndarray:
    """M M^T of the flattened site Grams, in row chunks whose products are summed in float64.

    rows: only these sites' rows (and columns, by symmetry) plus the other sites' diagonal entries.
    symmetric: every Gram is symmetric; only the upper triangle is read (off-diagonal entries twice)."""
    n_sites, height, cols = stack.shape
    step = max(1, PRODUCT_CHUNK // max(cols, 1))
    total = torch.zeros((n_sites, n_sites), dtype=torch.float64, device=stack.device)
    if rows is not None:
        new = torch.tensor(sorted(rows), dtype=torch.long, device=stack.device)
        old = torch.tensor([s for s in range(n_sites) if s not in rows], dtype=torch.long, device=stack.device)

    def add(piece: torch.Tensor, weight: float) -> None:
        flat = piece.reshape(n_sites, -1)
        if rows is None:
            total.add_((flat @ flat.T).to(torch.float64), alpha=weight)
            return
        total[new] += weight * (flat[new] @ flat.T).to(torch.float64)
        total[old, old] += weight * (flat[old] * flat[old]).sum(1).to(torch.float64)

    if not symmetric:
        for start in range(0, height, step):
            add(stack[:, start:start + step], 1.0)
    for tile in range(0, height if symmetric else 0, GRAM_TILE):     # chunks stay inside computed tiles
        end = min(tile + GRAM_TILE, height)
        for start in range(tile, end, step):
            stop = min(start + step, end)
            add(stack[:, start:stop, start:stop], 1.0)
            if stop < cols:
                add(stack[:, start:stop, stop:], 2.0)
    if rows is not None:
        total[:, new] = total[new].T
    return total.cpu().numpy()


def block_pair_sums(spec: GramSpec, a: tuple[int, int], b: tuple[int, int]) -> Sums:
    """Partial sums of sample blocks a <= b (each (start, stop)), reading one site at a time."""
    same = a == b
    src = spec.sources

    def load(s: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        xa = spec.tensor(s, src.rows(s, *a, dtype=None))       # one block read in flight at a time
        return xa, None if same else spec.tensor(s, src.rows(s, *b, dtype=None))

    return gram_sums(spec, load, (a[0], b[0]), (a[1] - a[0], b[1] - b[0]), same)


@dataclass
class SiteGram:
    """One site's full N x N Gram (working precision, on the CPU), its row sums and diagonal (float64)."""

    gram: torch.Tensor
    rows: np.ndarray
    diag: np.ndarray


def site_grams(spec: GramSpec, group: list[int], read_rows: int) -> dict[int, SiteGram]:
    """Full Grams of the sites in `group`, each from all N rows held once in the working precision
    (read and centred `read_rows` rows at a time): the site-major schedule of the blocked path."""
    n, out = spec.sources.n, {}
    for s in group:
        x = torch.empty((n, spec.sources.dims[s]), dtype=spec.dtype, device=spec.device)
        for start in range(0, n, read_rows):
            stop = min(start + read_rows, n)
            spec.tensor(s, spec.sources.rows(s, start, stop, dtype=None), out=x[start:stop])
        gram = torch.empty((n, n), dtype=spec.dtype, device=spec.device)
        if spec.kernel == "linear":
            symmetric_matmul(x, gram)
        else:
            spec.gram_into(s, x, None, gram)
        if spec.kernel == "linear" and spec.dtype == torch.float64:     # margins exact from the features
            rows, diag = x @ x.sum(0), (x * x).sum(1)
        else:              # from the Gram (N^2, not N d): consistent with it to the working precision
            rows, diag = gram.sum(1).to(torch.float64), gram.diagonal().to(torch.float64)
        del x
        out[s] = SiteGram(gram.cpu(), rows.cpu().numpy(), diag.cpu().numpy())
    return out


def merge_grams(parts: list[dict[int, SiteGram]]) -> dict[int, SiteGram]:
    """The union of site-gram results (the tree-reduction step of the site-major schedule)."""
    return {s: g for part in parts for s, g in part.items()}


def stacked_sums(spec: GramSpec, grams: dict[int, SiteGram], unbiased: bool) -> Sums:
    """Sums of the site-major schedule: every site's Gram stacked, their products, margins as one block.

    unbiased: the products leave the Grams' diagonals out (<K~, L~> directly), rather than subtracting
    d_K.d_L from <K, L> afterwards, which cancels when the diagonals dominate (wide sites, d >> N)."""
    n_sites, n = len(spec.sources.keys), spec.sources.n
    stack = torch.zeros((n_sites, n, n), dtype=spec.dtype, device=spec.device)
    rows, diag = np.zeros((n_sites, n)), np.zeros((n_sites, n))
    while grams:                         # each Gram freed once copied: one stack's worth of memory
        s, g = grams.popitem()
        stack[s].copy_(g.gram)
        if unbiased:
            stack[s].diagonal().zero_()
        rows[s], diag[s] = g.rows, g.diag
    return Sums(stack_products(stack, spec.rows, symmetric=True), {0: rows}, {0: diag}, offdiagonal=unbiased)
