"""Checks run before any heavy work and before the Prefect server starts, so that a config, data,
model, store or disk problem is reported in seconds, by one message naming the field, model, file
or path, and nothing is written.

What is checked, cheapest first, so that torch is imported only once the checks that need none
have passed: the stage names; that the store location is a run store (or free for one) and
writable; the dataset (its path, and that it can supply the sample); then the device and every
model, built on the meta device (no weights allocated): its architecture, its site spec and
reduction, resolved by a dry forward pass, and its checkpoint's keys and shapes; and that the free
disk space holds the estimated size of what is still to be written.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import storage
from flows.config import STAGES, ConfigError, RunConfig
from tasks.suggest import did_you_mean

if TYPE_CHECKING:
    import torch

    from tasks.data import ImageDataset


def check_sample_size(config: RunConfig, dataset: ImageDataset) -> None:
    """Fail before any heavy work when the dataset cannot supply the requested sample."""
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
    site_widths: dict[str, list[int]] = field(default_factory=dict)   # model -> each site's feature width
    store_bytes: int = 0                                     # estimated size of the finished store
    needed_bytes: int = 0                                    # what is not yet written
    free_bytes: int | None = None                            # on the store's file system (None: remote)


def check_stages(stage: str | None, refresh: str | None) -> None:
    for name, value in (("stage", stage), ("refresh", refresh)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"--{name}: unknown stage {value!r}{did_you_mean(value, STAGES)} "
                              f"(stages: {', '.join(STAGES)})")


def _first_image_size(dataset: ImageDataset) -> tuple[int, int] | None:
    """(H, W) of the dataset's first image that decodes: the input size of models that take the images as they are."""
    from tasks.data import BadImageError

    for index in range(len(dataset.keys)):
        try:
            image = dataset.load(index)
        except BadImageError:
            continue
        return image.height, image.width
    return None


def _open_dataset(config: RunConfig) -> tuple[int, tuple[int, int] | None]:
    """The rows of the sample, and the image size when a model may take the images as they are (an arch
    that is not a timm name)."""
    try:
        dataset = config.dataset.open()
        check_sample_size(config, dataset)
        image_size = _first_image_size(dataset) if any(":" in m.arch for m in config.models) else None
    except ConfigError:
        raise
    except (ValueError, OSError) as error:
        where = f", path {config.dataset.path!r}" if config.dataset.path else ""
        raise ConfigError(f"dataset ({config.dataset.kind}{where}): {error}") from None
    sampling = config.sampling
    if sampling.per_class is not None:
        images = sampling.per_class * len(dataset.class_names)
    else:
        images = sampling.n if sampling.n is not None else len(dataset.keys)
    return images * sampling.views, image_size


def _structure(arch: str, arch_kwargs: dict, weights: str) -> torch.nn.Module:
    """The model's modules and parameter shapes without its weights (meta device), for timm names and
    factories; in-memory modules are used as they are."""
    import torch

    from tasks.extract import build_model

    if weights == "module":
        return build_model(arch, arch_kwargs, weights)
    with torch.device("meta"):
        return build_model(arch, arch_kwargs, weights if weights.startswith("random:") else "random:0")


def check_model(config: RunConfig, index: int, image_size: tuple[int, int] | None = None) -> list[int]:
    """Build model `index` of the config on the meta device and resolve its sites and reduction (at
    `image_size`, (H, W), when it takes the images as they are); check its checkpoint's keys. Returns the
    feature width of each of its sites; ConfigError names the model."""
    from tasks.extract import CheckpointError, ModelError, SiteError, data_config, load_checkpoint, resolve_sites

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
        size = tuple(data_config(model, model_cfg.preprocessing, image_size)["input_size"])
        sites = resolve_sites(model, sites_spec, size)
    except SiteError as error:
        raise ConfigError(f"{where}: sites {sites_spec!r} (from {sites_source}): {error}") from None
    except (ModelError, CheckpointError) as error:
        raise ConfigError(f"{where}: {error}") from None
    widths = []
    for site in sites:
        try:
            widths.append(site.width(reduction))
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


def _local_path(url: str) -> Path | None:
    """The directory of a local store; None for a remote (fsspec URL) one, checked only when opened."""
    return None if "://" in url and not url.startswith("file://") else Path(url.removeprefix("file://")).absolute()


def check_store_location(config: RunConfig) -> None:
    """The store location holds a run store or nothing, and is writable."""
    url, path = config.store, _local_path(config.store)
    if path is None:
        return
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


def check_disk(config: RunConfig, plan: Plan, fresh: bool = False) -> None:
    """The store's file system has room for what is still to be written (`plan.needed_bytes`)."""
    url, path = config.store, _local_path(config.store)
    if path is None:
        return
    base = _existing(path)
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
    check_store_location(config)
    rows, image_size = _open_dataset(config)
    plan = Plan(rows=rows)
    from tasks.extract import resolve_device  # the first check that needs torch

    try:
        resolve_device(config.compute.device)
        for device in config.compute.extract_devices:
            resolve_device(device)
    except ValueError as error:
        raise ConfigError(f"compute: {error}") from None
    for index, model in enumerate(config.models):
        plan.site_widths[model.name] = check_model(config, index, image_size)
        plan.widths[model.name] = sum(plan.site_widths[model.name])
    itemsize = np.dtype(config.compute.dtype).itemsize
    plan.store_bytes = plan.rows * sum(plan.widths.values()) * itemsize
    check_similarity_budget(config, plan)
    check_disk(config, plan, fresh=fresh)
    return plan


def check_similarity_budget(config: RunConfig, plan: Plan) -> None:
    """Every exact CKA matrix has a plan within compute.memory_budget, from the sites' widths (as the engine
    will decide once the activations exist): ConfigError naming the entry and the minimum, before any
    extraction. Skipped on an external Dask cluster, whose threads are not known here."""
    from flows.threads import thread_plan
    from storage.layout import chunk_rows
    from tasks.cka import _plan as cka_plan

    compute = config.compute
    if compute.dask_address or not plan.site_widths:
        return
    threads = thread_plan(compute)
    parallel = threads.workers * threads.threads_per_worker
    dims = [width for widths in plan.site_widths.values() for width in widths]
    itemsize = np.dtype(compute.dtype).itemsize
    rows = max(chunk_rows(compute.shard_size, width, itemsize) for width in dims)
    for i, entry in enumerate(config.similarity):
        if entry.method == "minibatch":
            continue
        n = plan.rows if entry.views == "all" else plan.rows // config.sampling.views
        chosen, items = cka_plan.choose_method(entry.method, entry.kernel, n, dims, compute.budget_bytes // parallel,
                                               compute.precision)
        shortfall = cka_plan.budget_shortfall(chosen, dims, compute.budget_bytes, parallel, compute.precision,
                                              rows, itemsize)
        if chosen == "features" and items is None:
            shortfall = cka_plan.too_wide("of the widest width", max(dims))
        if shortfall:
            raise ConfigError(f"similarity[{i}] {entry.name or entry.kernel + '_' + entry.estimator}: {shortfall}")
