"""The loop over the stages (`flows.stages`) that both runners share: sample -> extract -> similarity ->
analyses -> report, each a subflow under Prefect (`flows.pipeline`) or a plain call in-process
(`ckaflow.compare`); `flows.runner` runs them.

Every stage reads and writes only the run store, so any stage can be run alone (`stage=`), and
re-running after a failure resumes. The store decides what is done: a stage is skipped only when the
store holds outputs with the fingerprint the current config gives them; inside a stage, finished shards
and block pairs are kept. `fresh` wipes the store first; `refresh` recomputes a stage and the ones after
it. Every run appends its record (config, start, finish, outcome, stages, fingerprints) to the store.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import storage
from flows.analyses import ANALYSES_STAGE
from flows.cluster import run_cluster
from flows.config import STAGES, RunConfig, load_config, validate_config
from flows.extract import EXTRACT
from flows.logs import run_logger
from flows.preflight import preflight
from flows.report import REPORT_STAGE
from flows.sample import SAMPLE
from flows.similarity import SIMILARITY_STAGE
from flows.stages import RunContext, Stage
from flows.threads import thread_plan

PIPELINE: tuple[Stage, ...] = (SAMPLE, EXTRACT, SIMILARITY_STAGE, ANALYSES_STAGE, REPORT_STAGE)
assert tuple(s.name for s in PIPELINE) == STAGES, "flows.config.STAGES names the pipeline's stages in order"
VERSIONED = ("ckaflow", "torch", "timm", "zarr", "xarray", "dask", "distributed", "prefect", "numpy", "scikit-learn")


def resolve_config(config: str | dict[str, Any] | RunConfig, store: str | None = None) -> RunConfig:
    """A validated RunConfig from a YAML path, a mapping or a RunConfig; `store` overrides the store."""
    overrides = {"store": store} if store else {}
    if isinstance(config, RunConfig):
        return config.model_copy(update=overrides)
    if isinstance(config, dict):
        return validate_config(dict(config, **overrides))
    return load_config(Path(config), overrides)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def forget(root: Any, config: RunConfig, refresh: str) -> list[str]:
    """Delete the stored outputs of stage `refresh` and of every stage after it (for this config's
    models and matrices), so they are recomputed rather than resumed; returns what was deleted."""
    return [deleted for stage in PIPELINE[STAGES.index(refresh):] for deleted in stage.forget(root, config)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def execute(config: str | dict[str, Any] | RunConfig, *, run_stage: Callable[[Stage, RunContext], Any],
            store: str | None = None, stage: str | None = None, fresh: bool = False, refresh: str | None = None,
            wait: bool = False, break_locks: bool = False, dask_address: str | None = None,
            checked: bool = False, worker_processes: bool = True, skip: Sequence[str] = ()) -> str:
    """Run the pipeline (or one `stage`) for a config with `run_stage` (`flows.runner`); returns the path of
    report/index.html when the report stage ran, else "". skip: stages not run. worker_processes=False: a LocalCluster's workers are
    threads of this process (`flows.cluster.run_cluster`). The other arguments as for
    `flows.pipeline.run_pipeline`."""
    cfg = resolve_config(config, store)
    if dask_address:
        cfg = cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"dask_address": dask_address})})
    if not checked:
        preflight(cfg, stage, refresh, fresh)
    logger = run_logger()
    root = storage.open_store(cfg.store)
    refreshed = frozenset(STAGES[STAGES.index(refresh):]) if refresh else frozenset()
    with storage.run_lock(root, wait=wait, break_locks=break_locks):
        if fresh:
            logger.info("--fresh: deleting everything in %s", cfg.store)
            storage.wipe(root)
        elif refresh:
            logger.info("--refresh %s: deleted %s", refresh, ", ".join(forget(root, cfg, refresh)) or "nothing")
        wanted = [s.name for s in PIPELINE if stage in (None, s.name) and s.name not in skip]
        context = RunContext(cfg, thread_plan(cfg.compute), refreshed=refreshed, break_locks=break_locks)
        with run_cluster(processes=worker_processes):
            _run_stages(root, context, wanted, run_stage)
    index = storage.report_index(root) if "report" in wanted and storage.report_exists(root) else ""
    if index:
        logger.info("report ready: %s", index)
    return index


def _run_stages(root: Any, context: RunContext, wanted: list[str],
                run_stage: Callable[[Stage, RunContext], Any]) -> None:
    """The wanted stages, recorded as one run entry: failed (with the error) unless every stage succeeded;
    stages_done lists the finished stages, stages their wall-clock seconds, fingerprints every stage's."""
    entry = storage.begin_run(root, config=context.config.model_dump(mode="json"), versions=versions(),
                              started=_now(), requested=wanted, threads=context.threads.record())
    done: list[str] = []
    seconds: dict[str, dict[str, float]] = {}
    try:
        for stage in PIPELINE:
            if stage.name in wanted:
                start = time.perf_counter()
                fingerprint = run_stage(stage, context)
                seconds[stage.name] = {"seconds": round(time.perf_counter() - start, 3)}
                done.append(stage.name)
            else:
                fingerprint = stage.fingerprint(context)
            record = storage.update_run(root, entry, stages_done=done, stages=seconds, finished=_now(),
                                        fingerprints={**context.upstream, stage.output: fingerprint})
            context = context.after(stage.output, fingerprint, record)
        storage.update_run(root, entry, outcome=storage.SUCCEEDED, finished=_now())
    except BaseException as error:
        storage.update_run(root, entry, outcome=storage.FAILED, finished=_now(),
                           error=f"{type(error).__name__}: {error}"[:2000])
        raise
