"""The parent flow: sample -> extract -> similarity -> analyses -> report, each stage a subflow.

Every stage reads and writes only the run store, so any stage can be run alone (`stage=`), and
re-running after a failure resumes. The store decides what is done: a stage is skipped only when the
store holds outputs with the fingerprint the current config gives them; inside a stage, finished shards
and block pairs are kept. `fresh` wipes the store first; `refresh` recomputes a stage and the ones after
it. Every run appends its record (config, start, finish, outcome, stages, fingerprints) to the store.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

import storage
from flows.analyses import analyses_inputs, analyses_stage
from flows.config import STAGES, RunConfig, load_config, validate_config
from flows.extract import extract_stage
from flows.preflight import preflight
from flows.report import report_stage
from flows.sample import sample_stage
from flows.similarity import matrix_fingerprints, similarity_stage
from flows.threads import thread_plan

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
    refreshed = STAGES[STAGES.index(refresh):]
    deleted = []
    if "sample" in refreshed:
        storage.delete_samples(root)
        deleted.append("samples")
    if "extract" in refreshed:
        for model in config.models:
            storage.delete_model(root, model.name)
        deleted += [f"activations/{m.name}" for m in config.models]
    if "similarity" in refreshed:
        for entry in config.similarity:
            for name in (entry.key, f"{entry.key}{storage.STDERR_SUFFIX}"):
                storage.delete_similarity(root, name)
        deleted += [f"similarity/{s.key}" for s in config.similarity]
    if "analyses" in refreshed:
        storage.delete_analyses(root)
        deleted.append("analyses")
    return deleted


def _stored_fingerprints(root, config: RunConfig, strict: bool) -> dict[str, str]:
    """The stored activation fingerprints of the config's models (strict: StoreError for a missing one)."""
    stored = set(storage.list_models(root))
    return {model.name: storage.model_attrs(root, model.name)["fingerprint"] for model in config.models
            if strict or model.name in stored}


@flow(name="ckaflow-compare", log_prints=True)
def compare(config: str | dict[str, Any] | RunConfig, store: str | None = None, stage: str | None = None,
            fresh: bool = False, refresh: str | None = None, wait: bool = False,
            break_locks: bool = False, dask_address: str | None = None, checked: bool = False) -> str:
    """Run the pipeline (or one `stage`) for a config; returns the path of report/index.html.

    fresh: delete everything in the store first. refresh: recompute that stage and the later ones.
    A second run on the same store is refused while this one holds it (or waits, with `wait`);
    break_locks takes over locks of runs that cannot be checked (dead runs on other machines).
    dask_address overrides compute.dask_address. checked: the caller already ran `flows.preflight.preflight`
    on this very config, stage, refresh and fresh (the command line does, before the Prefect server starts),
    so the checks are not repeated; every other caller leaves it False and gets them here."""
    logger = get_run_logger()
    cfg = resolve_config(config, store)
    if dask_address:
        cfg = cfg.model_copy(update={"compute": cfg.compute.model_copy(update={"dask_address": dask_address})})
    if not checked:
        preflight(cfg, stage, refresh, fresh)
    root = storage.open_store(cfg.store)
    with storage.run_lock(root, wait=wait, break_locks=break_locks):
        if fresh:
            logger.info("--fresh: deleting everything in %s", cfg.store)
            storage.wipe(root)
        elif refresh:
            logger.info("--refresh %s: deleted %s", refresh, ", ".join(forget(root, cfg, refresh)) or "nothing")
        index = _run_stages(root, cfg, {stage} if stage else set(STAGES),
                            set(STAGES[STAGES.index(refresh):]) if refresh else set(), fresh, break_locks)
    if index:
        logger.info("report ready: %s", index)
    return index


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _run_stages(root: Any, cfg: RunConfig, wanted: set[str], refreshed: set[str], fresh: bool,
                break_locks: bool) -> str:
    """The wanted stages, recorded as one run entry: failed (with the error) unless every stage succeeded;
    stages_done lists the finished stages, stages their wall-clock seconds."""
    entry = storage.begin_run(root, config=cfg.model_dump(mode="json"), versions=versions(), started=_now(),
                              requested=[s for s in STAGES if s in wanted], threads=thread_plan(cfg.compute).record())
    done: list[str] = []
    seconds: dict[str, dict[str, float]] = {}

    def timed(name: str, run: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = run()
        seconds[name] = {"seconds": round(time.perf_counter() - start, 3)}
        done.append(name)
        storage.update_run(root, entry, stages_done=done, stages=seconds)
        return result

    def again(name: str) -> bool:
        return fresh or name in refreshed

    try:
        samples_fp = (timed("sample", lambda: sample_stage(cfg)) if "sample" in wanted
                      else storage.samples_fingerprint(root))
        if "extract" in wanted:
            models = timed("extract", lambda: extract_stage(cfg, samples_fp, break_locks=break_locks))
        else:
            models = _stored_fingerprints(root, cfg, strict=bool(wanted & {"similarity", "analyses"}))
        if "similarity" in wanted:
            matrices = timed("similarity", lambda: similarity_stage(cfg, models, refresh=again("similarity")))
        else:
            matrices = matrix_fingerprints(cfg, models)
        if "analyses" in wanted:
            analyses_fp = timed("analyses", lambda: analyses_stage(cfg, samples_fp, models, matrices))
        else:
            analyses_fp = storage.fingerprint(analyses_inputs(cfg, samples_fp, models, matrices))
        record = storage.update_run(root, entry, finished=_now(), fingerprints={
            "samples": samples_fp, "models": models, "similarity": matrices,
            "analyses": analyses_fp})
        index = ""
        if "report" in wanted:
            index = timed("report", lambda: report_stage(cfg.store, dict(record, outcome=storage.SUCCEEDED,
                                                                         stages_done=[*done, "report"])))
        storage.update_run(root, entry, outcome=storage.SUCCEEDED, stages_done=done, stages=seconds, finished=_now())
        return index
    except BaseException as error:
        storage.update_run(root, entry, outcome=storage.FAILED, finished=_now(),
                           error=f"{type(error).__name__}: {error}"[:2000])
        raise
