"""CKA across architectures: model pairs whose site names differ (a ViT and a ResNet) have no matched
sites, so their curves are read off the full CKA matrix over relative depth (0 = first site, 1 = last).

`crossarch_cka` (dim point, one per site of model_a, in depth order), for every such pair of `order`:
- `best_cka`, coords `best_site` and `best_relative_depth`: the site of model_b with the highest CKA
  with this site (argmax over model_b's sites; NaN and '' when the row has no finite value);
- `aligned_cka`, coord `aligned_site`: CKA with the site of model_b nearest in relative depth
  (index floor(d * (n_b - 1) + 1/2): the nearest, ties to the deeper site).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

from tasks.analyses.maps import flat_matrix, matched_sites, model_pairs

VARS = ("best_cka", "aligned_cka")


def _relative(n: int) -> np.ndarray:
    return np.arange(n) / max(n - 1, 1)


def crossarch_pairs(order: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """Model pairs (config order) that share no site name."""
    return [(a, b) for a, b in model_pairs(list(order)) if not matched_sites(order, a, b)]


def crossarch_cka(cka: xr.DataArray, order: Mapping[str, Sequence[str]], *, similarity: str = "") -> xr.Dataset:
    """Best-matching and depth-aligned CKA for every pair of `crossarch_pairs(order)` (see the module doc)."""
    cka = flat_matrix(cka)
    present_a, present_b = set(cka.site_a.values), set(cka.site_b.values)
    rows: list[dict[str, Any]] = []
    for a, b in crossarch_pairs(order):
        sites_a = [s for s in order[a] if f"{a}/{s}" in present_a]
        sites_b = [s for s in order[b] if f"{b}/{s}" in present_b]
        if not sites_a or not sites_b:
            continue
        block = cka.sel(site_a=[f"{a}/{s}" for s in sites_a], site_b=[f"{b}/{s}" for s in sites_b]).values
        depth_a, depth_b = _relative(len(sites_a)), _relative(len(sites_b))
        aligned = np.floor(depth_a * (len(sites_b) - 1) + 0.5).astype(int)
        for i, site in enumerate(sites_a):
            row = block[i]
            finite = np.isfinite(row)
            j = int(np.nanargmax(row)) if finite.any() else -1
            rows.append({"similarity": similarity, "model_a": a, "model_b": b, "site": site, "depth": i,
                         "relative_depth": float(depth_a[i]),
                         "best_site": sites_b[j] if j >= 0 else "", "best_cka": float(row[j]) if j >= 0 else np.nan,
                         "best_relative_depth": float(depth_b[j]) if j >= 0 else np.nan,
                         "aligned_site": sites_b[aligned[i]], "aligned_cka": float(row[aligned[i]])})
    coords = ("similarity", "model_a", "model_b", "site", "depth", "relative_depth", "best_site",
              "best_relative_depth", "aligned_site")
    if not rows:
        return xr.Dataset({v: ("point", np.zeros(0)) for v in VARS},
                          coords={c: ("point", np.zeros(0, dtype=float if "depth" in c else str)) for c in coords})
    return xr.Dataset({v: ("point", np.array([r[v] for r in rows], dtype=float)) for v in VARS},
                      coords={c: ("point", np.array([r[c] for r in rows])) for c in coords})
