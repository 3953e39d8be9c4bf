"""The parent flow: sample -> extract -> similarity -> analyses -> report, each stage a subflow.

Every stage reads and writes only the run store, so any stage can be run alone (`stage=`), and
re-running after a failure resumes: finished tasks are cached, finished shards and block pairs are
kept in the store. `fresh` wipes the store first; `refresh` recomputes a stage and the ones after it.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
from prefect import flow, get_run_logger

import storage
from flows.analyses import analyses_stage
from flows.config import STAGES, ConfigError, RunConfig, load_config, validate_config
from flows.extract import extract_stage
from flows.report import report_stage
from flows.sample import check_sample_size, sample_stage
from flows.similarity import similarity_stage

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


def wipe_store(url: str) -> None:
    """Delete a run store, after checking that it is one (never delete a foreign directory)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return
    storage.open_store(url, mode="r")
    fs.rm(path, recursive=True)


def _record_run(root, config: RunConfig, **fields: Any) -> None:
    run = dict(root.attrs.get("run", {}))
    run.update(config=config.model_dump(mode="json"), versions=versions(), **fields)
    root.attrs["run"] = run


def _stored_fingerprints(root, config: RunConfig) -> dict[str, str]:
    return {model.name: storage.model_attrs(root, model.name)["fingerprint"] for model in config.models}


@flow(name="ckaflow-compare", log_prints=True)
def compare(config: str | dict[str, Any] | RunConfig, store: str | None = None, stage: str | None = None,
            fresh: bool = False, refresh: str | None = None) -> str:
    """Run the pipeline (or one `stage`) for a config; returns the path of report/index.html."""
    logger = get_run_logger()
    cfg = resolve_config(config, store)
    for name, value in (("stage", stage), ("refresh", refresh)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{name}: unknown stage {value!r}; stages: {', '.join(STAGES)}")
    check_sample_size(cfg)
    if fresh:
        logger.info("--fresh: deleting %s", cfg.store)
        wipe_store(cfg.store)
    root = storage.open_store(cfg.store)
    _record_run(root, cfg, started=datetime.now(timezone.utc).isoformat(), finished=None)
    refreshed = set(STAGES[STAGES.index(refresh):]) if refresh else set()
    wanted = {stage} if stage else set(STAGES)

    def runs(name: str) -> bool:
        return name in wanted

    samples_fp = (sample_stage(cfg, refresh=fresh or "sample" in refreshed) if runs("sample")
                  else storage.samples_fingerprint(root))
    fingerprints = (extract_stage(cfg, samples_fp, refresh=fresh or "extract" in refreshed) if runs("extract")
                    else _stored_fingerprints(root, cfg))
    names = (similarity_stage(cfg, fingerprints, refresh=fresh or "similarity" in refreshed) if runs("similarity")
             else [s.key for s in cfg.similarity])
    if runs("analyses"):
        analyses_stage(cfg, sorted(names) + sorted(f"{m}:{fp}" for m, fp in fingerprints.items()),
                       refresh=fresh or "analyses" in refreshed)
    _record_run(root, cfg, finished=datetime.now(timezone.utc).isoformat())
    index = report_stage(cfg.store) if runs("report") else ""
    if index:
        logger.info("report ready: %s", index)
    return index
