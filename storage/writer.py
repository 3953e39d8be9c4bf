"""ActivationWriter: the extraction stage's only way into activations/<model>/.

Per model: one (sample, feature) array per site at activations/<model>/<layer>/<sublayer>, chunked
along sample so that chunks (and Zarr shards, when enabled) never straddle a sample shard; a `_done`
array with one flag per sample shard (each flag its own chunk); a `_nonfinite` array with the count of
NaN/Inf values per shard and site; a `_digests` array with the SHA-256 of each site's stored bytes per
shard (`shard_digests` reads them). A shard's flag is set only after every site's rows, its counts and
digests are written, so a crash at any point leaves at most one shard to rewrite. Writers lock the shards they
write (`storage.locks`), so disjoint shard ranges may be written by several processes at once while a
second writer of the same shards is refused."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.errors import StoreError
from storage.layout import DONE, NONFINITE, chunk_rows, model_path, shard_bounds, shard_count, site_path
from storage.locks import Locks
from storage.records import json_safe
from storage.store import store_url

log = logging.getLogger(__name__)
DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)
INIT = "init"
DIGESTS = "_digests"       # (shard, site, 4) uint64: SHA-256 of the site's rows of the shard as stored; 0: none
DIGEST_WORDS = 4


def stored_digest(data: np.ndarray) -> np.ndarray:
    """SHA-256 of an array's bytes (C order, as stored) as DIGEST_WORDS uint64 words."""
    return np.frombuffer(hashlib.sha256(np.ascontiguousarray(data).tobytes()).digest(), dtype=np.uint64).copy()


def _check_name(kind: str, name: str, parts: int) -> None:
    pieces = name.split("/")
    if len(pieces) != parts or any(not p or p.startswith("_") or p in (".", "..") for p in pieces):
        shape = "<layer>/<sublayer>" if parts == 2 else "a name without '/'"
        raise StoreError(f"{kind} {name!r} is not a valid store name: expected {shape}, parts not empty "
                         "and not starting with '_'")


class ActivationWriter:
    """Writes whole sample shards of every site of one model; use as a context manager."""

    def __init__(self, root: zarr.Group, model: str, widths: dict[str, int], n_samples: int, *,
                 shard_size: int, fingerprint: str, dtype: str = "float32", attrs: dict[str, Any] | None = None,
                 site_attrs: dict[str, dict[str, Any]] | None = None, compression_level: int = 3,
                 zarr_shards: bool = False, break_locks: bool = False) -> None:
        _check_name("model", model, 1)
        for site in widths:
            _check_name(f"site of model {model!r}", site, 2)
        if dtype not in DTYPES:
            raise StoreError(f"{model}: dtype must be one of {DTYPES}, got {dtype!r}")
        if n_samples < 1 or shard_size < 1 or not widths:
            raise StoreError(f"{model}: need n_samples >= 1, shard_size >= 1 and at least one site "
                             f"(got {n_samples}, {shard_size}, {len(widths)} sites)")
        self.root, self.model, self.widths = root, model, dict(widths)
        self.n_samples, self.shard_size, self.dtype = int(n_samples), int(shard_size), dtype
        self.fingerprint = fingerprint
        self.locks = Locks(root, model, break_locks=break_locks)
        self._layout = {"fingerprint": fingerprint, "sites": list(widths), "widths": self.widths, "dtype": dtype,
                        "n_samples": self.n_samples, "compression_level": compression_level,
                        "zarr_shards": zarr_shards}
        self._attrs = json_safe(attrs or {})
        self._site_attrs = json_safe(site_attrs or {})
        self._open()

    # ------------------------------------------------------------------ layout
    @property
    def n_shards(self) -> int:
        return shard_count(self.n_samples, self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        if not 0 <= shard < self.n_shards:
            raise StoreError(f"{self.model}: shard {shard} out of range 0..{self.n_shards - 1}")
        return shard_bounds(shard, self.n_samples, self.shard_size)

    def _open(self) -> None:
        """Reuse the model's arrays when they hold the same fingerprint, else (re)create them."""
        what = f"activations of model {self.model!r} in {store_url(self.root)}"
        self.locks.wait_acquire(INIT, what)
        try:
            path = model_path(self.model)
            existing = self.root[path].attrs if path in self.root else None
            if existing is not None and existing.get("initialized") and all(
                    existing.get(k) == v for k, v in self._layout.items()) and self._arrays_present(path):
                if existing["shard_size"] != self.shard_size:
                    log.warning("%s: keeping the stored shard_size %d (asked %d) to reuse extracted shards",
                                what, existing["shard_size"], self.shard_size)
                    self.shard_size = int(existing["shard_size"])
            else:
                if existing is not None:
                    busy = {u: h for u, h in self.locks.live_foreign().items() if u != INIT}
                    if busy:
                        raise StoreError(f"{what}: stored with another fingerprint and being written by "
                                         f"another run ({next(iter(busy.values())).describe()}); refusing to replace")
                    log.warning("%s: stored with fingerprint %s (now %s) or incomplete; replacing them",
                                what, existing.get("fingerprint"), self.fingerprint)
                    del self.root[path]
                self._create(path)
            group = self.root[path]
            if DIGESTS not in group:          # a store written before digests were recorded
                self._create_digests(group)
            self._done = group[DONE]
            self._nonfinite = group[NONFINITE]
            self._digests = group[DIGESTS]
            self._arrays = {site: self.root[site_path(self.model, site)] for site in self.widths}
        finally:
            self.locks.release([INIT])

    def _arrays_present(self, path: str) -> bool:
        """Every array of the layout exists (a group half-deleted by a killed run lacks some)."""
        group = self.root[path]
        return DONE in group and NONFINITE in group and all(site_path(self.model, s) in self.root for s in self.widths)

    def _create(self, path: str) -> None:
        level = self._layout["compression_level"]
        compressors = ZstdCodec(level=level) if level else None
        itemsize = np.dtype(self.dtype).itemsize
        group = self.root.create_group(path, overwrite=True)
        for site, width in self.widths.items():
            rows = chunk_rows(self.shard_size, width, itemsize)
            shards = (self.shard_size, width) if self._layout["zarr_shards"] else None
            layer, sublayer = site.split("/")
            array = self.root.create_array(site_path(self.model, site), shape=(self.n_samples, width),
                                           dtype=self.dtype, chunks=(rows, width), shards=shards,
                                           compressors=compressors, fill_value=np.nan,
                                           dimension_names=("sample", "feature"))
            array.attrs.update({"layer": layer, "sublayer": sublayer, "site": site,
                                **self._site_attrs.get(site, {})})
        group.create_array(DONE, shape=(self.n_shards,), chunks=(1,), dtype="uint8", fill_value=0,
                           compressors=None)
        group.create_array(NONFINITE, shape=(self.n_shards, len(self.widths)), chunks=(1, len(self.widths)),
                           dtype="int64", fill_value=0, compressors=None)
        self._create_digests(group)
        group.attrs.update({**self._attrs, **self._layout, "shard_size": self.shard_size,
                            "n_shards": self.n_shards, "initialized": True})

    def _create_digests(self, group: zarr.Group) -> None:
        group.create_array(DIGESTS, shape=(self.n_shards, len(self.widths), DIGEST_WORDS),
                           chunks=(1, len(self.widths), DIGEST_WORDS), dtype="uint64", fill_value=0,
                           compressors=None)

    # ------------------------------------------------------------------ writing
    def pending_shards(self, requested: list[int] | None = None) -> list[int]:
        """The requested shards (default all) not yet done, now locked by this writer."""
        wanted = list(range(self.n_shards)) if requested is None else sorted(set(requested))
        for shard in wanted:
            self.shard_bounds(shard)
        done = np.asarray(self._done[:])
        pending = [s for s in wanted if not done[s]]
        self.locks.acquire_all([f"shard-{s}" for s in pending],
                               f"{self.model}: shards {_ranges(pending)} of {store_url(self.root)}")
        return pending

    def write_shard(self, shard: int, values: dict[str, np.ndarray]) -> None:
        """Write one whole shard of every site, then mark it done. Checks everything before writing."""
        start, stop = self.shard_bounds(shard)
        missing, extra = set(self.widths) - set(values), set(values) - set(self.widths)
        if missing or extra:
            raise StoreError(f"{self.model} shard {shard}: sites missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}")
        converted, counts = {}, []
        for site, width in self.widths.items():
            data = np.asarray(values[site])
            if data.shape != (stop - start, width):
                raise StoreError(f"{self.model}/{site} shard {shard}: expected shape {(stop - start, width)}, "
                                 f"got {data.shape}")
            finite = np.isfinite(data)
            counts.append(int(data.size - finite.sum()))
            if self.dtype == "float16" and finite.any() and float(np.abs(data[finite]).max()) > FLOAT16_MAX:
                raise StoreError(f"{self.model}/{site} shard {shard}: value {float(np.abs(data[finite]).max()):.4g} "
                                 f"is outside float16's range (max {FLOAT16_MAX:.0f}); store this model as float32")
            converted[site] = data.astype(self.dtype, copy=False)
        self.locks.acquire_all([f"shard-{shard}"], f"{self.model}: shard {shard} of {store_url(self.root)}")
        if self._done[shard]:
            self._done[shard] = 0
        for site, data in converted.items():
            self._arrays[site][start:stop] = data
        self._nonfinite[shard] = np.asarray(counts, dtype=np.int64)
        self._digests[shard] = np.stack([stored_digest(data) for data in converted.values()])
        self._done[shard] = 1

    def close(self) -> None:
        self.locks.release()

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ranges(shards: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, run = [], []
    for s in shards:
        if run and s != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(s)
    if run:
        parts.append(run)
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts) or "none"
