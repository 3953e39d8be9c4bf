"""Prefect caching for ckaflow tasks: keyed on inputs and source code, persisted in the run store.

Results and cache keys live under `<store>/prefect/results` and `<store>/prefect/keys`, so deleting a store also forgets its cache,
and re-running a failed flow on the same store skips every task that already finished.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.filesystems import RemoteFileSystem

CACHE_DIR = "prefect"


def _filesystem(store_url: str, kind: str) -> Path | RemoteFileSystem:
    """Where results and cache keys go: a local directory, or (object storage) a RemoteFileSystem block
    saved on the Prefect server under a name derived from the URL, as Prefect requires for tasks."""
    base = f"{store_url.rstrip('/')}/{CACHE_DIR}/{kind}"
    if "://" in base and not base.startswith("file://"):
        block = RemoteFileSystem(basepath=base)
        block.save(f"ckaflow-results-{hashlib.sha256(base.encode()).hexdigest()[:12]}", overwrite=True)
        return block
    return Path(base.removeprefix("file://")).absolute()


def cached(store_url: str, *, refresh: bool = False) -> dict[str, Any]:
    """`task.with_options(**cached(url))`: cache on inputs + source, results kept in the store."""
    return {
        "cache_policy": (INPUTS + TASK_SOURCE).configure(key_storage=_filesystem(store_url, "keys")),
        "result_storage": _filesystem(store_url, "results"),
        "persist_result": True,
        "refresh_cache": refresh,
    }
