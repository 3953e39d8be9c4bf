"""Feature-space path for the linear kernel: <K_s, K_t> = |Xc_s^T Xc_t|_F^2, one site-group pair per task.

The cross-products of the centred features of two site groups are accumulated in float64 over row
chunks (for a group with itself, only the upper triangle, in tiles of whole sites); the Gram
diagonals |xc_i|^2 (for the unbiased estimator) come from the diagonal group pairs.
Row sums of centred linear Grams are zero, so none are recorded.
"""

from __future__ import annotations

import numpy as np
import torch

from tasks.cka._grams import GRAM_TILE, GramSpec
from tasks.cka._sums import Sums


def features_pair_sums(spec: GramSpec, group_a: list[int], group_b: list[int],
                       chunks: list[tuple[int, int]]) -> Sums:
    """Partial sums <K_s, K_t> for s in group_a, t in group_b (group_a == group_b on the diagonal)."""
    n_sites = len(spec.sources.keys)
    same = group_a == group_b
    dims = spec.sources.dims
    width_a, width_b = sum(dims[s] for s in group_a), sum(dims[s] for s in group_b)
    cross = torch.zeros((width_a, width_b), dtype=torch.float64, device=spec.device)
    sums = Sums(np.zeros((n_sites, n_sites)))

    def load(group: list[int], start: int, stop: int) -> torch.Tensor:
        parts = []
        for s in group:
            raw = spec.sources.rows(s, start, stop, dtype=None)
            if s in spec.skip:
                raw = np.broadcast_to(spec.means[s], raw.shape)
            parts.append(spec.tensor(s, raw))
            if same:
                diag = sums.diag.setdefault(start, np.zeros((n_sites, stop - start)))
                diag[s] = (spec.centred(s, raw) ** 2).sum(axis=1) if s not in spec.skip else 0.0
        return torch.cat(parts, dim=1)

    offsets_a = np.cumsum([0] + [dims[s] for s in group_a])
    offsets_b = np.cumsum([0] + [dims[s] for s in group_b])
    tiles = site_tiles(offsets_a, GRAM_TILE) if same else [(0, width_a)]
    for start, stop in chunks:
        za = load(group_a, start, stop)
        zb = za if same else load(group_b, start, stop)
        for lo, hi in tiles:        # a diagonal group pair: only the upper triangle, whole site blocks
            cross[lo:hi, lo:] += (za[:, lo:hi].T @ zb[:, lo:]).to(torch.float64)
    for i, s in enumerate(group_a):
        for j, t in enumerate(group_b):
            if same and j < i:
                continue
            block = cross[offsets_a[i]:offsets_a[i + 1], offsets_b[j]:offsets_b[j + 1]]
            sums.products[s, t] = sums.products[t, s] = float((block * block).sum())
    return sums


def site_tiles(offsets: np.ndarray, width: int) -> list[tuple[int, int]]:
    """Column ranges of consecutive whole sites, each at least `width` wide (except the last)."""
    tiles, lo = [], 0
    for edge in offsets[1:]:
        if edge - lo >= width or edge == offsets[-1]:
            tiles.append((lo, int(edge)))
            lo = int(edge)
    return tiles
