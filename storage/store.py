"""Opening a run store (a Zarr v3 group at a local path or fsspec URL), its schema version, and raw
key access for the few objects that are not Zarr nodes (locks)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from storage.errors import StoreError

SCHEMA_VERSION = 1
SCHEMA_KEY = "ckaflow_schema"
StoreLike = str | os.PathLike | zarr.Group
"""What every storage function takes as the store: a local path, an fsspec URL, or an opened root group."""
F = TypeVar("F", bound=Callable[..., Any])


def open_store(url: StoreLike, mode: str = "a") -> zarr.Group:
    """The root group of the run store at `url` (created with mode 'a' or 'w'; mode 'r' requires it);
    an opened group is returned as it is.

    Raises StoreError when the location holds no store (mode 'r'), something that is not a Zarr v3
    group, or a store of another schema version."""
    if isinstance(url, zarr.Group):
        return url
    if mode not in ("r", "r+", "a", "w"):
        raise StoreError(f"store mode must be r, r+, a or w, got {mode!r}")
    local = "://" not in str(url)
    if local:
        url = os.fspath(url)
        if mode in ("r", "r+") and not os.path.isdir(url):
            raise StoreError(f"no run store at {url} (directory does not exist)")
        if os.path.isdir(url) and os.listdir(url) and not os.path.exists(os.path.join(url, "zarr.json")):
            raise StoreError(f"{url} is a non-empty directory but not a ckaflow run store (no zarr.json); "
                             "choose another store location")
    try:
        root = zarr.open_group(store=url, mode=mode, zarr_format=3)
    except FileNotFoundError as error:
        raise StoreError(f"no run store at {url}") from error
    except (ValueError, TypeError) as error:
        raise StoreError(f"cannot open the run store at {url}: {error}") from error
    _check_schema(root, str(url), mode)
    return root


def _check_schema(root: zarr.Group, url: str, mode: str) -> None:
    found = root.attrs.get(SCHEMA_KEY)
    if found is None:
        if any(True for _ in root.members()):
            raise StoreError(f"{url} is a Zarr group without a ckaflow schema version; not a ckaflow run store")
        if mode == "r":
            raise StoreError(f"no run store at {url} (empty group)")
        root.attrs[SCHEMA_KEY] = SCHEMA_VERSION
    elif found != SCHEMA_VERSION:
        raise StoreError(f"run store {url} has schema version {found}, this ckaflow reads version "
                         f"{SCHEMA_VERSION}; use the matching ckaflow version or start a new store")


def takes_store(mode: str) -> Callable[[F], F]:
    """Let a function whose first argument is the store's root group take any `StoreLike`, opened with `mode`."""
    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(store: StoreLike, *args: Any, **kwargs: Any) -> Any:
            return function(open_store(store, mode=mode), *args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


@takes_store("r")
def store_url(root: zarr.Group) -> str:
    """The path or URL of the store holding `root` (as a user would pass it to open_store)."""
    store: Any = root.store
    if isinstance(store, LocalStore):
        base = str(store.root)
    elif isinstance(store, FsspecStore):
        base = store.fs.unstrip_protocol(store.path)
    else:
        base = f"{type(store).__name__}:{id(store):x}"
    return f"{base.rstrip('/')}/{root.path}" if root.path else base


def _key(root: zarr.Group, key: str) -> str:
    return f"{root.path}/{key}" if root.path else key


def create_key(root: zarr.Group, key: str, value: bytes) -> bool:
    """Create a raw object atomically where the store allows it; False when it already exists."""
    store, full = root.store, _key(root, key)
    buffer = default_buffer_prototype().buffer.from_bytes(value)
    try:
        sync(store.set_if_not_exists(full, buffer))
    except FileExistsError:
        return False
    found = read_key(root, key)
    return found == value


def read_key(root: zarr.Group, key: str) -> bytes | None:
    buffer = sync(root.store.get(_key(root, key), prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.to_bytes()


def delete_key(root: zarr.Group, key: str) -> None:
    sync(root.store.delete(_key(root, key)))


def list_keys(root: zarr.Group, prefix: str) -> list[str]:
    """Raw keys under `prefix` (relative to root)."""
    full = _key(root, prefix)

    async def collect() -> list[str]:
        return [k async for k in root.store.list_prefix(full)]

    start = len(_key(root, "")) if root.path else 0
    return sorted(k[start:].lstrip("/") for k in sync(collect()))
