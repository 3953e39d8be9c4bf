"""The run record: every run appends an entry (config, start, finish, outcome, stages done, the
fingerprints of the results it stands for) to the store's history. The entry of the last successful
run is also kept apart (`run`): it describes the results on disk, and a failed run never replaces it."""

from __future__ import annotations

from typing import Any

import zarr

from storage.records import json_safe

HISTORY = "runs"
LAST_SUCCESS = "run"
SUCCEEDED, FAILED, RUNNING = "succeeded", "failed", "running"


def run_history(root: zarr.Group) -> list[dict[str, Any]]:
    """Every recorded run, oldest first."""
    return [dict(entry) for entry in root.attrs.get(HISTORY, [])]


def begin_run(root: zarr.Group, **fields: Any) -> int:
    """Append an entry for a run that starts now (outcome 'running'); returns its index in the history."""
    history = run_history(root)
    history.append(json_safe({**fields, "outcome": RUNNING, "stages_done": [], "stages": {}, "finished": None}))
    root.attrs[HISTORY] = history
    return len(history) - 1


def update_run(root: zarr.Group, index: int, **fields: Any) -> dict[str, Any]:
    """Update entry `index`; an entry whose outcome becomes 'succeeded' becomes the last successful run."""
    history = run_history(root)
    history[index] = json_safe({**history[index], **fields})
    updates: dict[str, Any] = {HISTORY: history}
    if history[index]["outcome"] == SUCCEEDED:
        updates[LAST_SUCCESS] = history[index]
    root.attrs.update(updates)
    return history[index]


def model_order(root: zarr.Group) -> list[str]:
    """Model names in the order the recorded runs' configs list them: the latest run's models first, then
    those only earlier runs had (each name once)."""
    names: dict[str, None] = {}
    for entry in reversed(run_history(root)):
        for model in (entry.get("config") or {}).get("models", []):
            names.setdefault(model["name"])
    return list(names)


def last_successful_run(root: zarr.Group) -> dict[str, Any]:
    """The record of the last successful run ({} when none)."""
    return dict(root.attrs.get(LAST_SUCCESS, {}))
