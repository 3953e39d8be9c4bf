"""Prefect caching for ckaflow tasks: keyed on inputs and source code, persisted in the run store.

Results and cache keys live under `<store>/prefect/`, so deleting a store also forgets its cache,
and re-running a failed flow on the same store skips every task that already finished.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.filesystems import LocalFileSystem, RemoteFileSystem

CACHE_DIR = "prefect"


def _filesystem(store_url: str) -> LocalFileSystem | RemoteFileSystem:
    base = f"{store_url.rstrip('/')}/{CACHE_DIR}"
    if "://" in base and not base.startswith("file://"):
        return RemoteFileSystem(basepath=base)
    return LocalFileSystem(basepath=base.removeprefix("file://"))


def cached(store_url: str, *, refresh: bool = False) -> dict[str, Any]:
    """`task.with_options(**cached(url))`: cache on inputs + source, results kept in the store."""
    storage = _filesystem(store_url)
    return {
        "cache_policy": (INPUTS + TASK_SOURCE).configure(key_storage=storage),
        "result_storage": storage,
        "persist_result": True,
        "refresh_cache": refresh,
    }
