"""The parent flow of the command line and the deployments: the stage loop (`flows.loop`) with every stage
a Prefect subflow and every unit of work a Prefect task (`flows.runner.run_as_flow`)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.config import RunConfig
from flows.loop import execute
from flows.runner import run_as_flow


@flow(name="ckaflow-pipeline", log_prints=True)
def run_pipeline(config: str | dict[str, Any] | RunConfig, store: str | None = None, stage: str | None = None,
                 fresh: bool = False, refresh: str | None = None, wait: bool = False, break_locks: bool = False,
                 dask_address: str | None = None, checked: bool = False, skip: list[str] | None = None) -> str:
    """Run the pipeline (or one `stage`) for a config; returns the path of report/index.html.

    fresh: delete everything in the store first. refresh: recompute that stage and the later ones.
    A second run on the same store is refused while this one holds it (or waits, with `wait`);
    break_locks takes over locks of runs that cannot be checked (dead runs on other machines).
    dask_address overrides compute.dask_address. checked: the caller already ran `flows.preflight.preflight`
    on this very config, stage, refresh and fresh (the command line does, before the Prefect server starts),
    so the checks are not repeated; every other caller leaves it False and gets them here. skip: stages not run."""
    return execute(config, run_stage=run_as_flow, store=store, stage=stage, fresh=fresh, refresh=refresh, wait=wait,
                   break_locks=break_locks, dask_address=dask_address, checked=checked, skip=tuple(skip or ()))
