"""Incremental CKA matrices: the entries of a previous matrix reused for the sites present in both runs.

A previous matrix `known` (dims site_a, site_b; plain site-id coords, or the (model, layer, sublayer)
MultiIndex that `storage.open_similarity` returns) fixes CKA(s, t) for every pair of *old* sites (sites
of this run that `known` has on both axes): those entries (and, for minibatch CKA, their standard errors)
are copied exactly. Only pairs with at least one *new* site are computed.

What that saves, and what it does not (the engine's cost is Grams + products):
- saved: the products among old sites. The blocked and minibatch paths form only the new sites' rows of
  M M^T (and each old site's self-product); the features path forms only old x new and new x new
  cross-products (and each old site's X^T X). When every site is old, nothing is read at all.
- not saved: pass 1 over every site (column means, degenerate checks, RBF bandwidths), and every old
  site's data: the new entries need HSIC(old, new), built from old sites' Gram blocks (blocked,
  minibatch) or features (features path), and the old sites' self-HSIC that normalises them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from storage import site_ids


@dataclass
class Known:
    """A previous matrix (and optionally its stderr) aligned to this run's site keys."""

    keys: list[str]
    old: np.ndarray                     # bool (S,): the site's entries with other old sites are reused
    values: np.ndarray                  # (S, S) float64, valid where both sites are old
    stderr: np.ndarray | None
    attrs: dict[str, Any]

    @property
    def new_sites(self) -> frozenset[int]:
        """Indices of the sites whose rows and columns must be computed."""
        return frozenset(np.flatnonzero(~self.old).tolist())

    def merge(self, computed: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """`computed` with the old x old block replaced by `previous`'s."""
        out = np.array(computed, dtype=np.float64, copy=True)
        block = np.ix_(self.old, self.old)
        out[block] = previous[block]
        return out

    def reused_attrs(self) -> dict[str, Any]:
        """Attributes of a result that is entirely reused: the previous ones, restricted to these sites."""
        reasons = self.attrs.get("nan_reasons") or {}
        return {**self.attrs, "nan_reasons": {k: v for k, v in reasons.items() if k in self.keys},
                **reuse_counts(self, len(self.keys))}


class IncompatibleKnownError(ValueError):
    """The previous matrix was computed with other settings (kernel, estimator, N, ...) than this run."""


def reuse_counts(known: Known | None, n_sites: int) -> dict[str, int]:
    """attrs reused_entries / computed_entries of an (n_sites x n_sites) result."""
    reused = int(known.old.sum()) ** 2 if known is not None else 0
    return {"reused_entries": reused, "computed_entries": n_sites * n_sites - reused}


def _positions(table: xr.DataArray, dim: str) -> dict[str, int]:
    return {site: i for i, site in enumerate(site_ids(table, dim))}


def _check_compatible(attrs: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for name, value in expected.items():
        if name in attrs and attrs[name] != value:
            raise IncompatibleKnownError(f"known: the previous matrix has {name}={attrs[name]!r}, this computation "
                             f"uses {value!r}; its entries cannot be reused")


def align_known(known: xr.DataArray | None, keys: list[str], expected: Mapping[str, Any], *,
                stderr: xr.DataArray | None = None) -> Known | None:
    """The reusable part of `known` for sites `keys`; None when there is nothing to reuse.

    expected: attributes the previous computation must share with this one (kernel, estimator,
    n_samples, ...); a mismatch in one that `known.attrs` records raises IncompatibleKnownError. With `stderr`,
    a site is old only if both matrices have it.
    """
    if known is None:
        return None
    _check_compatible(known.attrs, expected)
    tables = [t.transpose("site_a", "site_b") for t in (known, stderr) if t is not None]
    positions = [(_positions(t, "site_a"), _positions(t, "site_b")) for t in tables]
    old = np.array([all(k in pa and k in pb for pa, pb in positions) for k in keys], dtype=bool)
    if not old.any():
        return None
    index = np.flatnonzero(old)

    def aligned(table: xr.DataArray, pos: tuple[dict[str, int], dict[str, int]]) -> np.ndarray:
        out = np.full((len(keys), len(keys)), np.nan)
        rows, cols = ([p[keys[i]] for i in index] for p in pos)
        out[np.ix_(index, index)] = np.asarray(table.values, dtype=np.float64)[np.ix_(rows, cols)]
        return out

    values = aligned(tables[0], positions[0])
    errors = aligned(tables[1], positions[1]) if stderr is not None else None
    return Known(list(keys), old, values, errors, dict(known.attrs))
