"""Names in the run store: site ids, array paths, chunk shapes."""

from __future__ import annotations

import pandas as pd
import xarray as xr

ACTIVATIONS = "activations"
DONE = "_done"
NONFINITE = "_nonfinite"
CHUNK_TARGET_BYTES = 4 << 20


def split_site_id(site_id: str) -> tuple[str, str, str]:
    """'<model>/<layer>/<sublayer>' -> (model, layer, sublayer); ids without a layer give layer ''."""
    model, _, rest = site_id.partition("/")
    layer, _, sublayer = rest.rpartition("/")
    return model, layer, sublayer


def site_ids(matrix: xr.DataArray, dim: str) -> list[str]:
    """Site ids along `dim` of a matrix indexed by plain strings or a (model, layer, sublayer) MultiIndex."""
    index = matrix.indexes[dim]
    if isinstance(index, pd.MultiIndex):
        return ["/".join(map(str, item)) for item in index]
    return [str(item) for item in index]


def site_index(site_ids: list[str], side: str) -> xr.Coordinates:
    """A (model_<side>, layer_<side>, sublayer_<side>) MultiIndex along dim `site_<side>`."""
    parts = [split_site_id(s) for s in site_ids]
    index = pd.MultiIndex.from_tuples(parts, names=[f"model_{side}", f"layer_{side}", f"sublayer_{side}"])
    return xr.Coordinates.from_pandas_multiindex(index, f"site_{side}")


def model_path(model: str) -> str:
    return f"{ACTIVATIONS}/{model}"


def site_path(model: str, site: str) -> str:
    """activations/<model>/<layer>/<sublayer> for a site named '<layer>/<sublayer>'."""
    return f"{ACTIVATIONS}/{model}/{site}"


def shard_count(n_samples: int, shard_size: int) -> int:
    """How many shards of `shard_size` samples hold `n_samples` (the last one may be short)."""
    return -(-n_samples // shard_size)


def shard_bounds(shard: int, n_samples: int, shard_size: int) -> tuple[int, int]:
    """The sample rows [start, stop) of `shard`."""
    start = shard * shard_size
    return start, min(start + shard_size, n_samples)


def chunk_rows(shard_size: int, width: int, itemsize: int, target: int = CHUNK_TARGET_BYTES) -> int:
    """Rows per chunk: the largest divisor of shard_size whose chunk stays within `target` bytes
    (so chunks never straddle a shard and each is a few MB at most)."""
    row_bytes = max(1, width * itemsize)
    best = 1
    for rows in range(1, shard_size + 1):
        if shard_size % rows == 0 and rows * row_bytes <= target:
            best = rows
    return best
