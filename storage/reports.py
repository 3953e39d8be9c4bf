"""Where a store's report lives and what it was rendered from. report/ holds plain files (index.html,
figures, summary.json); the fingerprint of the inputs it was rendered from is kept in the Zarr group
`report_record`, written only after index.html, so a report is up to date only when both agree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec

from storage.fingerprints import record_fingerprint, recorded_fingerprint
from storage.store import StoreLike, open_store, store_url

REPORT_RECORD = "report_record"


def report_index(root: StoreLike) -> str:
    """The path or URL of the store's report/index.html (written or not)."""
    return store_url(open_store(root, mode="r") if isinstance(root, str) else root).rstrip("/") + "/report/index.html"


def report_exists(root: StoreLike) -> bool:
    fs, path = fsspec.core.url_to_fs(report_index(root))
    return bool(fs.exists(path))


def report_fingerprint(root: Any) -> str | None:
    """The fingerprint recorded with the store's report; None without a record or without index.html."""
    return recorded_fingerprint(root, REPORT_RECORD) if report_exists(root) else None


def record_report(root: Any, inputs: Mapping[str, Any]) -> str:
    """Record what the report now in the store was rendered from (after it is written)."""
    return record_fingerprint(root, REPORT_RECORD, inputs)


def forget_report(root: Any) -> None:
    """Drop the record, so the next report stage renders again."""
    if REPORT_RECORD in root:
        del root[REPORT_RECORD]
