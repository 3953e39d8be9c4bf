"""The stage contract: each stage of the pipeline is one `Stage` (in `flows/<stage>.py`), and the parent
flow is a loop over them (`flows.pipeline`).

A stage knows four things: its `name`; the `fingerprint` its outputs have for the current config and the
upstream fingerprints, used by the loop when the stage does not run (computed where cheap, read from the
store where computing it is the stage's own work); `run`, which makes the outputs (skipping what the store
already holds with that fingerprint) and returns their fingerprint; and `forget`, what a refresh deletes.
Both runners (Prefect flows for the CLI and deployments, in-process calls for `ckaflow.compare`) execute
the same objects (`flows.runner`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import storage
from flows.config import RunConfig
from tasks.threads import ThreadPlan


@dataclass(frozen=True)
class RunContext:
    """What a stage runs with: the config, the run's thread plan, the fingerprints of the stages before it
    (by output key), the stages being refreshed, and the run record so far."""

    config: RunConfig
    threads: ThreadPlan
    upstream: Mapping[str, Any] = field(default_factory=dict)
    refreshed: frozenset[str] = frozenset()
    break_locks: bool = False
    record: Mapping[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Any:
        return storage.open_store(self.config.store)

    def refreshing(self, stage: str) -> bool:
        return stage in self.refreshed

    def after(self, key: str, fingerprint: Any, record: Mapping[str, Any]) -> RunContext:
        """The context of the next stage: this stage's fingerprint added under `key`, the updated record."""
        return dataclasses.replace(self, upstream={**self.upstream, key: fingerprint}, record=record)


@dataclass(frozen=True)
class Stage:
    """One stage: `output` names its fingerprint in the run record and in `RunContext.upstream`."""

    name: str
    output: str
    fingerprint: Callable[[RunContext], Any]
    run: Callable[[RunContext], Any]
    forget: Callable[[Any, RunConfig], list[str]]
