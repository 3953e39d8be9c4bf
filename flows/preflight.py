"""Checks run before any heavy work and before the Prefect server starts, so that a config, data,
model, store or disk problem is reported in seconds, by one message naming the field, model, file
or path, and nothing is written.

What is checked: the stage names; the dataset (its path, and that it can supply the sample); every
model, built on the meta device (no weights allocated): its architecture, its site spec and
reduction, resolved by a dry forward pass, and its checkpoint's keys and shapes; the device; that
the store location is a run store (or free for one) and writable; and that the free disk space
holds the estimated size of what is still to be written.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import storage
from flows.config import STAGES, ConfigError, RunConfig
from tasks.extract import (
    CheckpointError,
    ModelError,
    SiteError,
    build_model,
    data_config,
    load_checkpoint,
    resolve_device,
    resolve_sites,
)

def check_sample_size(config: RunConfig) -> None:
    """Fail before any heavy work when the dataset cannot supply the requested sample."""
    dataset = config.dataset.open()
    sampling = config.sampling
    if sampling.n is not None and sampling.n > len(dataset.keys):
        raise ValueError(f"sampling.n: {sampling.n} images requested, but the dataset has only {len(dataset.keys)}")
    if sampling.per_class is not None:
        for label, name in enumerate(dataset.class_names):
            available = int((dataset.labels == label).sum())
            if available < sampling.per_class:
                raise ValueError(f"sampling.per_class: {sampling.per_class} images per class requested, "
                                 f"but class {name!r} has only {available}")


@dataclass
class Plan:
    """What the run will write: rows, feature widths per model, the estimated bytes still to write."""

    rows: int
    widths: dict[str, int] = field(default_factory=dict)   # model -> summed feature width of its sites
    store_bytes: int = 0                                     # estimated size of the finished store
    needed_bytes: int = 0                                    # what is not yet written
    free_bytes: int | None = None                            # on the store's file system (None: remote)


def check_stages(stage: str | None, refresh: str | None) -> None:
    for name, value in (("stage", stage), ("refresh", refresh)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"--{name}: unknown stage {value!r}; stages: {', '.join(STAGES)}")


def _sample_rows(config: RunConfig) -> int:
    try:
        check_sample_size(config)
        dataset = config.dataset.open()
    except ConfigError:
        raise
    except (ValueError, OSError) as error:
        raise ConfigError(f"dataset ({config.dataset.kind}, path {config.dataset.path!r}): {error}") from None
    sampling = config.sampling
    if sampling.per_class is not None:
        images = sampling.per_class * len(dataset.class_names)
    else:
        images = sampling.n if sampling.n is not None else len(dataset.keys)
    return images * sampling.views


def _structure(arch: str, arch_kwargs: dict, weights: str) -> torch.nn.Module:
    """The model's modules and parameter shapes without its weights (meta device), for timm names and
    factories; in-memory modules are used as they are."""
    if weights == "module":
        return build_model(arch, arch_kwargs, weights)
    with torch.device("meta"):
        return build_model(arch, arch_kwargs, weights if weights.startswith("random:") else "random:0")


def check_model(config: RunConfig, index: int) -> int:
    """Build model `index` of the config on the meta device and resolve its sites and reduction; check its
    checkpoint's keys. Returns the summed feature width of its sites; ConfigError names the model."""
    model_cfg = config.models[index]
    where = f"models[{index}] {model_cfg.name!r} (arch {model_cfg.arch!r})"
    sites_spec, reduction = config.sites_of(model_cfg), config.reduction_of(model_cfg)
    reduction_source = "its `reduction`" if model_cfg.reduction is not None else "the top-level `reduction`"
    sites_source = "its `sites`" if model_cfg.sites is not None else "the top-level `sites`"
    try:
        model = _structure(model_cfg.arch, model_cfg.arch_kwargs, model_cfg.weights)
        if model_cfg.weights not in ("timm", "module") and not model_cfg.weights.startswith("random:"):
            with warnings.catch_warnings():  # loading into meta parameters checks keys and shapes only
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter", category=UserWarning)
                load_checkpoint(model, model_cfg.weights)
        size = tuple(data_config(model, model_cfg.preprocessing)["input_size"])
        sites = resolve_sites(model, sites_spec, size)
    except SiteError as error:
        raise ConfigError(f"{where}: sites {sites_spec!r} (from {sites_source}): {error}") from None
    except (ModelError, CheckpointError) as error:
        raise ConfigError(f"{where}: {error}") from None
    widths = 0
    for site in sites:
        try:
            widths += site.width(reduction)
        except SiteError as error:
            raise ConfigError(f"{where}: reduction {reduction!r} (from {reduction_source}) does not apply: {error}; "
                              f"set `reduction` on this model (`ckaflow sites {model_cfg.arch}` lists what applies)") from None
    return widths


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def check_store(config: RunConfig, plan: Plan, fresh: bool = False) -> None:
    """The store location holds a run store or nothing, is writable, and its file system has room for
    what is still to be written. Remote (fsspec URL) stores are only checked when opened."""
    url = config.store
    if "://" in url and not url.startswith("file://"):
        return
    path = Path(url.removeprefix("file://")).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"store {url!r}: {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        storage.open_store(str(path), mode="r")  # StoreError when it is not a ckaflow run store
    base = _existing(path)
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise ConfigError(f"store {url!r}: {base} is not writable ({error.strerror})") from None
    kept = 0 if fresh else sum(_bytes_under(path / "activations" / name) for name in plan.widths)
    plan.needed_bytes = max(0, plan.store_bytes - kept)
    plan.free_bytes = shutil.disk_usage(base).free
    if plan.needed_bytes > plan.free_bytes:
        raise ConfigError(f"store {url!r}: not enough disk space: about {storage.format_size(plan.needed_bytes)} still to "
                          f"write ({plan.rows} rows x {sum(plan.widths.values())} features over {len(plan.widths)} "
                          f"models, {config.compute.dtype}), {storage.format_size(plan.free_bytes)} free on {base}")


def preflight(config: RunConfig, stage: str | None = None, refresh: str | None = None,
              fresh: bool = False) -> Plan:
    """Every check that needs no heavy work (module docstring); returns the run's size estimate.
    Raises ConfigError (or StoreError) with one message naming the field, model, file or path."""
    check_stages(stage, refresh)
    try:
        resolve_device(config.compute.device)
        for device in config.compute.extract_devices:
            resolve_device(device)
    except ValueError as error:
        raise ConfigError(f"compute: {error}") from None
    plan = Plan(rows=_sample_rows(config))
    for index, model in enumerate(config.models):
        plan.widths[model.name] = check_model(config, index)
    itemsize = np.dtype(config.compute.dtype).itemsize
    plan.store_bytes = plan.rows * sum(plan.widths.values()) * itemsize
    check_store(config, plan, fresh=fresh)
    return plan
