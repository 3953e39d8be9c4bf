"""What produced each stored result: a fingerprint (sha256 of the canonical JSON of its inputs) recorded
with the result, so a stage is skipped only when the store already holds outputs of exactly its inputs.

samples/ and activations/<model>/ record `fingerprint` in their group attrs (written by their writers);
similarity/<name> and analyses/ record `fingerprint` and `fingerprint_inputs` here, after the data."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import zarr

from storage.records import COMPLETE, is_complete, json_safe

FINGERPRINT = "fingerprint"
INPUTS = "fingerprint_inputs"


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """The fingerprint of a result computed from `inputs` (any JSON-able mapping; key order irrelevant)."""
    canonical = json.dumps(json_safe(dict(inputs)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def recorded_fingerprint(root: zarr.Group, path: str) -> str | None:
    """The fingerprint recorded with the complete result at `path`; None when missing, partial or unrecorded."""
    if not is_complete(root, path):
        return None
    found = root[path].attrs.get(FINGERPRINT)
    return None if found is None else str(found)


def record_fingerprint(root: zarr.Group, path: str, inputs: Mapping[str, Any]) -> str:
    """Record the fingerprint of `inputs` (and the inputs themselves) with the result at `path`, and mark
    it complete: call it once everything under `path` is written."""
    value = fingerprint(inputs)
    root.require_group(path).attrs.update({FINGERPRINT: value, INPUTS: json_safe(dict(inputs)), COMPLETE: True})
    return value
