"""Input side of the CKA engine: uniform row access to numpy / dask / Zarr / xarray arrays, and the
first pass over the data (column means and centred second moments in float64, constant columns,
non-finite values, digests of the stored bytes, RBF bandwidths).

A `Sources` object is small to pickle when it wraps Zarr or dask arrays, so Dask tasks receive it and
read their own rows; numpy inputs are scattered to the workers once by the caller.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def _unwrap(array: Any) -> Any:
    """xarray objects -> their underlying (numpy or dask) data; everything else unchanged."""
    return array.data if hasattr(array, "dims") and hasattr(array, "variable") else array


def _is_dask(array: Any) -> bool:
    return hasattr(array, "dask") and hasattr(array, "compute")


def _is_zarr(array: Any) -> bool:
    return hasattr(array, "get_orthogonal_selection")


@dataclass
class Sources:
    """The sites' (N, d_s) arrays in input order, read row-block by row-block as float64."""

    keys: list[str]
    arrays: list[Any]
    n: int
    dims: list[int]

    @classmethod
    def from_mapping(cls, arrays: Mapping[str, Any]) -> Sources:
        """Validate shapes (2-D, same N, d >= 1) and wrap; errors name the site."""
        if not arrays:
            raise ValueError("arrays: need at least one site")
        keys, data, dims = [], [], []
        n = None
        for key, array in arrays.items():
            if not isinstance(key, str):
                raise ValueError(f"arrays: site keys must be strings, got {key!r}")
            array = _unwrap(array)
            shape = tuple(getattr(array, "shape", ()))
            if len(shape) != 2:
                raise ValueError(f"site {key!r}: expected a (sample, feature) array, got shape {shape}")
            if shape[1] < 1:
                raise ValueError(f"site {key!r}: has no features (shape {shape})")
            if n is None:
                n = shape[0]
            elif shape[0] != n:
                raise ValueError(f"site {key!r}: has {shape[0]} samples, the first site has {n}")
            if not (isinstance(array, np.ndarray) or _is_dask(array) or _is_zarr(array)):
                array = np.asarray(array)
            keys.append(key)
            data.append(array)
            dims.append(int(shape[1]))
        return cls(keys, data, int(n), dims)

    @property
    def in_memory(self) -> bool:
        """Every site is a numpy array (random row access is cheap)."""
        return all(isinstance(a, np.ndarray) for a in self.arrays)

    def rows(self, site: int, start: int, stop: int, dtype: type | None = np.float64) -> np.ndarray:
        """Rows start:stop of one site as a float64 array (dtype=None: as stored)."""
        array = self.arrays[site]
        block = array[start:stop]
        if _is_dask(block):
            block = block.compute(scheduler="sync")
        return np.asarray(block, dtype=dtype)

    def read_rows(self) -> int:
        """Most rows one storage chunk holds (reads touch whole chunks); 1 for in-memory numpy."""
        rows = [1]
        for array in self.arrays:
            chunks = getattr(array, "chunks", None)
            if chunks and not isinstance(array, np.ndarray):
                first = chunks[0]
                rows.append(int(max(first) if isinstance(first, tuple) else first))
        return max(rows)

    def stored_itemsize(self) -> int:
        """Largest bytes per stored value over the sites."""
        return max(int(np.dtype(a.dtype).itemsize) for a in self.arrays)

    def take(self, site: int, index: np.ndarray, dtype: type | None = np.float64) -> np.ndarray:
        """The rows at sorted integer positions `index` of one site, as float64 (dtype=None: as stored)."""
        array = self.arrays[site]
        if len(index) and index[-1] - index[0] == len(index) - 1:      # sorted and contiguous: a slice
            return self.rows(site, int(index[0]), int(index[-1]) + 1, dtype=dtype)
        if _is_zarr(array):
            block = array.get_orthogonal_selection((index, slice(None)))
        else:
            block = array[index]
            if _is_dask(block):
                block = block.compute(scheduler="sync")
        return np.asarray(block, dtype=dtype)


@dataclass
class ColumnStats:
    """Per-site column sums, centred sums of squares (M2), minima, maxima and non-finite counts over
    `rows` rows (float64), and, when asked, a digest of each row block's stored bytes (start -> hex)."""

    rows: int
    sums: list[np.ndarray]
    m2: list[np.ndarray]
    mins: list[np.ndarray]
    maxs: list[np.ndarray]
    nonfinite: list[int]
    digests: list[dict[int, str]]

    @property
    def means(self) -> list[np.ndarray]:
        """Float64 column means of every site."""
        return [s / self.rows for s in self.sums]

    @property
    def scales(self) -> list[float]:
        """Per-site RMS of the centred features (1 where it is zero or undefined): the engine divides
        the centred rows by it before casting them to the working precision."""
        out = []
        for m2 in self.m2:
            rms = float(np.sqrt(m2.sum() / (self.rows * m2.size)))
            out.append(rms if np.isfinite(rms) and rms > 0 else 1.0)
        return out

    def content_digest(self, keys: list[str], sources: Sources) -> str:
        """Digest of every site's stored bytes in row order, with its key, shape and dtype."""
        h = hashlib.sha256()
        for s, key in enumerate(keys):
            array = sources.arrays[s]
            h.update(json.dumps([key, list(array.shape), str(np.dtype(array.dtype))]).encode())
            for start in sorted(self.digests[s]):
                h.update(f"{start}:{self.digests[s][start]}".encode())
        return h.hexdigest()


def column_stats(sources: Sources, start: int, stop: int, digest: bool = False) -> ColumnStats:
    """Statistics of rows start:stop of every site (one site in memory at a time); digest: also hash
    the bytes as stored."""
    sums, m2, mins, maxs, bad, digests = [], [], [], [], [], []
    for s in range(len(sources.keys)):
        x = sources.rows(s, start, stop, dtype=None)
        digests.append({start: hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()} if digest else {})
        n_bad = x.size - int(np.count_nonzero(np.isfinite(x)))
        if n_bad:
            x = np.where(np.isfinite(x), x, 0)
        bad.append(n_bad)
        total = x.sum(axis=0, dtype=np.float64)
        sums.append(total)
        m2.append(((x - total / len(x)) ** 2).sum(axis=0))
        mins.append(x.min(axis=0).astype(np.float64))
        maxs.append(x.max(axis=0).astype(np.float64))
    return ColumnStats(stop - start, sums, m2, mins, maxs, bad, digests)


def combine_stats(parts: list[ColumnStats]) -> ColumnStats:
    """Merge the statistics of disjoint row ranges (M2 by Chan et al.'s pairwise update)."""
    first, *rest = parts
    out = ColumnStats(first.rows, list(first.sums), list(first.m2), list(first.mins), list(first.maxs),
                      list(first.nonfinite), [dict(d) for d in first.digests])
    for part in rest:
        rows = out.rows + part.rows
        for s in range(len(out.sums)):
            delta = part.sums[s] / part.rows - out.sums[s] / out.rows
            out.m2[s] = out.m2[s] + part.m2[s] + delta**2 * (out.rows * part.rows / rows)
            out.sums[s] = out.sums[s] + part.sums[s]
            out.mins[s] = np.minimum(out.mins[s], part.mins[s])
            out.maxs[s] = np.maximum(out.maxs[s], part.maxs[s])
            out.nonfinite[s] += part.nonfinite[s]
            out.digests[s].update(part.digests[s])
        out.rows = rows
    return out


def degenerate_reasons(keys: list[str], stats: ColumnStats) -> dict[str, str]:
    """Sites whose CKA is undefined from the data alone: non-finite values, or every column constant."""
    reasons = {}
    for key, bad, lo, hi in zip(keys, stats.nonfinite, stats.mins, stats.maxs):
        if bad:
            reasons[key] = f"{bad} non-finite (NaN/Inf) activation values"
        elif np.all(lo == hi):
            reasons[key] = "constant activations (zero variance)"
    return reasons


MEDIAN_FLOOR = 64 * float(np.finfo(np.float64).eps)


def rbf_scale(sources: Sources, site: int, index: np.ndarray, mean: np.ndarray, scale: float,
              threshold: float) -> tuple[float, float]:
    """(median squared distance over all pairs of the subsample, diagonal included; mean kernel value),
    in float64 from the centred rows divided by `scale` (as the Gram blocks see them).

    The mean kernel value is subtracted from the RBF Gram blocks: HSIC is invariant to it, and it
    removes most of the cancellation in the float32 Gram products. Holds two len(index)^2 float64 arrays.
    A median at most MEDIAN_FLOOR * d (the scaled rows have mean squared norm d) is rounding noise of
    the Gram-form distances and is returned as 0 (bandwidth undefined).
    """
    x = (sources.take(site, index) - mean) / scale
    norms = np.einsum("ij,ij->i", x, x)
    sq = x @ x.T
    sq *= -2.0
    sq += norms[:, None]
    sq += norms[None, :]
    np.maximum(sq, 0.0, out=sq)
    np.fill_diagonal(sq, 0.0)
    median = float(np.median(sq))
    if not median > MEDIAN_FLOOR * x.shape[1]:
        return 0.0, 0.0
    sq *= -1.0 / (2.0 * threshold**2 * median)
    return median, float(np.exp(sq, out=sq).mean())
