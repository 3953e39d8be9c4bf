"""Forgetting stored results (for --refresh and --fresh) and the whole-run lock, both refusing to touch
anything another live writer is using."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import fsspec
import zarr

from storage.errors import StoreError
from storage.layout import model_path
from storage.locks import LOCKS, Locks
from storage.results import ANALYSES, PARTIALS, SIMILARITY
from storage.samples import SAMPLES
from storage.store import SCHEMA_KEY, StoreLike, store_url, takes_store

RUN = "_run"
KEEP = (LOCKS, "zarr.json")


@takes_store("a")
@contextlib.contextmanager
def run_lock(root: StoreLike, *, wait: bool = False, break_locks: bool = False,
             timeout: float = 24 * 3600.0) -> Iterator[None]:
    """Hold the store's run lock for the duration: a second run on the same store is refused (or, with
    `wait`, waits for the first); a lock left by a dead process of this host is broken."""
    locks = Locks(root, RUN, break_locks=break_locks)
    what = f"run store {store_url(root)}"
    if wait:
        locks.wait_acquire("run", what, timeout=timeout)
    else:
        holder = locks.try_acquire("run")
        if holder is not None:
            raise StoreError(f"{what} is in use by another run ({holder.describe()}). Wait for it (--wait), or "
                             "pass --break-locks if that run is dead on another machine")
    try:
        yield
    finally:
        locks.release()


def _refuse_if_writing(root: zarr.Group, model: str) -> None:
    busy = Locks(root, model).live_foreign()
    if busy:
        raise StoreError(f"model {model!r} in {store_url(root)} is being written by another run "
                         f"({next(iter(busy.values())).describe()}); not deleting it")


def _delete(root: zarr.Group, path: str) -> None:
    """Delete `path`; a group's attributes (its completion and fingerprint records) go first, so a crash
    halfway through leaves a group every reader and writer treats as absent, never as complete."""
    if path in root:
        node = root[path]
        if isinstance(node, zarr.Group):
            node.attrs.put({})
        del root[path]


@takes_store("r+")
def delete_samples(root: StoreLike) -> None:
    _delete(root, SAMPLES)


@takes_store("r+")
def delete_model(root: StoreLike, model: str) -> None:
    """Forget a model's activations (refused while another run writes them)."""
    _refuse_if_writing(root, model)
    _delete(root, model_path(model))


@takes_store("r+")
def delete_similarity(root: StoreLike, name: str) -> None:
    """Forget a matrix and its partial sums."""
    _delete(root, f"{SIMILARITY}/{name}")
    _delete(root, f"{SIMILARITY}/{PARTIALS}/{name}")


@takes_store("r+")
def delete_analyses(root: StoreLike) -> None:
    _delete(root, ANALYSES)


@takes_store("r+")
def wipe(root: StoreLike) -> None:
    """Delete everything in a store but its schema and locks (--fresh), including report/ and the
    Prefect result cache kept beside the Zarr groups."""
    fs, path = fsspec.core.url_to_fs(store_url(root))
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] not in KEEP:
            fs.rm(entry, recursive=True)
    root.attrs.put({SCHEMA_KEY: root.attrs[SCHEMA_KEY]})
