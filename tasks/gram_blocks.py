"""Block Grams of all sites and their products, in torch (CPU, or CUDA when present): one block pair.

For rows a and b, every site's block Gram G_s = k(X_s[a], X_s[b]) is written into one stacked
tensor M (S x |a| x |b|); then P = w M M^T (w = 1 on diagonal blocks, 2 off it), the row sums of
both blocks and, on diagonal blocks, the Gram diagonal are returned in float64. With `GramSpec.rows`
(an incremental run) only those sites' rows of P and the other sites' self-products are formed.
Features are centred with the global column means first; RBF Grams have their (subsample) mean value
subtracted. Both leave every HSIC unchanged and keep the float32 products accurate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tasks.cka_sources import Sources
from tasks.cka_sums import Sums

Load = Callable[[int], tuple[torch.Tensor, torch.Tensor | None]]   # site -> centred (rows a, rows b or None)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; explicit 'cpu' / 'cuda[:k]' checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:k]', got {device!r}")
    return device


@dataclass
class GramSpec:
    """Everything a task needs to build centred site Grams: data, means, kernel scales, precision, device."""

    sources: Sources
    means: list[np.ndarray]
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

    def tensor(self, site: int, raw: np.ndarray) -> torch.Tensor:
        """Centred rows of one site (as read) in the working precision, on the device."""
        x = torch.as_tensor(np.ascontiguousarray(raw), device=self.device, dtype=self.dtype)
        return x - torch.as_tensor(self.means[site], device=self.device, dtype=self.dtype)   # never in place

    def gram_into(self, site: int, xa: torch.Tensor, xb: torch.Tensor | None, out: torch.Tensor) -> None:
        """Write k(xa, xb) (xb None: k(xa, xa)) into `out`."""
        same = xb is None
        xb = xa if same else xb
        torch.matmul(xa, xb.T, out=out)
        if self.kernel == "linear":
            return
        na, nb = (xa * xa).sum(1), (xb * xb).sum(1)
        out.mul_(-2.0).add_(na[:, None]).add_(nb[None, :]).clamp_(min=0.0)
        if same:
            out.fill_diagonal_(0.0)
        out.mul_(-1.0 / self.bandwidths[site]).exp_().sub_(self.offsets[site])


def gram_sums(spec: GramSpec, load: Load, starts: tuple[int, int], lengths: tuple[int, int],
              same: bool) -> Sums:
    """Partial sums of one block pair (same=True: a diagonal block, rows b == rows a)."""
    n_sites = len(spec.sources.keys)
    stack = torch.empty((n_sites, lengths[0], lengths[1]), dtype=spec.dtype, device=spec.device)
    row_a, row_b, diag = (np.zeros((n_sites, length)) for length in (lengths[0], lengths[1], lengths[0]))
    for s in range(n_sites):
        if s in spec.skip:
            stack[s].zero_()                  # every other slot is overwritten by its Gram
            continue
        g = stack[s]
        spec.gram_into(s, *load(s), g)
        row_a[s] = g.sum(1, dtype=torch.float64).cpu().numpy()
        if same:
            diag[s] = g.diagonal().to(torch.float64).cpu().numpy()
        else:
            row_b[s] = g.sum(0, dtype=torch.float64).cpu().numpy()
    products = stack_products(stack, spec.rows) * (1.0 if same else 2.0)
    if same:
        return Sums(products, {starts[0]: row_a}, {starts[0]: diag})
    return Sums(products, {starts[0]: row_a, starts[1]: row_b})


PRODUCT_CHUNK = 16384     # Gram entries per float32 dot product before the partial sum goes to float64


def stack_products(stack: torch.Tensor, rows: frozenset[int] | None) -> np.ndarray:
    """M M^T of the flattened site Grams, in row chunks whose products are summed in float64.

    rows: only these sites' rows (and columns, by symmetry) plus the other sites' diagonal entries."""
    n_sites, height, cols = stack.shape
    step = max(1, PRODUCT_CHUNK // max(cols, 1))
    total = torch.zeros((n_sites, n_sites), dtype=torch.float64, device=stack.device)
    if rows is not None:
        new = torch.tensor(sorted(rows), dtype=torch.long, device=stack.device)
        old = torch.tensor([s for s in range(n_sites) if s not in rows], dtype=torch.long, device=stack.device)
    for start in range(0, height, step):
        flat = stack[:, start:start + step].reshape(n_sites, -1)
        if rows is None:
            total += (flat @ flat.T).to(torch.float64)
            continue
        total[new] += (flat[new] @ flat.T).to(torch.float64)
        total[old, old] += (flat[old] * flat[old]).sum(1).to(torch.float64)
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
