"""`compare`: the whole pipeline on models given as in-memory `nn.Module`s (or config entries), for
notebooks; the results come back as labelled xarray objects."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr

import storage
from tasks.extract import register_module


@dataclass(frozen=True)
class Comparison:
    """What `compare` returns: the store, every CKA matrix and analysis by name, the report's path."""

    store: str
    similarity: dict[str, xr.DataArray]
    analyses: dict[str, xr.Dataset]
    report: str


def _model_entry(name: str, model: torch.nn.Module | Mapping[str, Any], preprocessing: Mapping[str, Any] | None
                 ) -> dict[str, Any]:
    extra = {"preprocessing": dict(preprocessing)} if preprocessing else {}
    if isinstance(model, torch.nn.Module):
        return {"name": name, "arch": register_module(model), "weights": "module", **extra}
    if isinstance(model, Mapping):
        return {"name": name, **extra, **model}
    raise TypeError(f"model {name!r}: expected a torch.nn.Module or a model config mapping "
                    f"(arch, weights, ...), got {type(model).__name__}")


def _preprocessing_of(name: str, preprocessing: Mapping[str, Any] | None, models: Mapping[str, Any]
                      ) -> Mapping[str, Any] | None:
    """The preprocessing given for model `name`: per model when every key names a model, else for all."""
    if not preprocessing:
        return None
    if set(preprocessing) <= set(models):
        return preprocessing.get(name)
    return preprocessing


def _dataset(images: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(images, (str, Path)):
        return {"kind": "imagefolder", "path": str(images)}
    return dict(images)


def compare(models: Mapping[str, torch.nn.Module | Mapping[str, Any]], images: str | Path | Mapping[str, Any], *,
            store: str | None = None, preprocessing: Mapping[str, Any] | None = None, report: bool = True,
            orchestrate: bool = False, verbose: bool = False, **config: Any) -> Comparison:
    """Run sample -> extract -> similarity -> analyses -> report on `models` (name -> in-memory module, or a
    model config entry such as {"arch": "resnet18", "weights": "random:0"}) over `images` (an image-folder
    path, or a `dataset` config mapping), in `store` (default: a new temporary directory, kept).

    `config`: any other top-level config keys (sites, reduction, sampling, similarity, analyses, compute),
    as in the YAML; every key is validated the same way (`analyses={"skip": [...]}` leaves analyses out).
    preprocessing: one model entry's `preprocessing` (input_size, mean, std, crop_pct, interpolation) for every
    model, or model name -> such a mapping; a model config entry's own `preprocessing` wins. report=False: no
    report stage. In-memory modules are fingerprinted by their state_dict bytes, so re-running on the same
    store resumes and only changed models are recomputed.

    The stages run in this process, with no Prefect server and no worker processes (Dask's workers are threads
    here, so a script needs no `if __name__ == "__main__":` guard), unless `compute.dask_address` names a
    cluster; `orchestrate=True` runs them as Prefect flows (tracked by a server) on a LocalCluster of processes.
    Logs are ckaflow's own lines (each warning once); `verbose=True` adds Dask's and Prefect's INFO lines.
    """
    from flows.logs import configure_logging
    from flows.loop import execute
    from flows.runner import run_in_process

    configure_logging(verbose=verbose)
    skip = () if report else ("report",)

    store = store or tempfile.mkdtemp(prefix="ckaflow-")
    run = {"name": "notebook", "store": str(store), "dataset": _dataset(images),
           "models": [_model_entry(name, model, _preprocessing_of(name, preprocessing, models))
                      for name, model in models.items()], **config}
    if orchestrate:
        from flows.pipeline import run_pipeline

        index = run_pipeline(run, skip=skip)
    else:
        index = execute(run, run_stage=run_in_process, worker_processes=False, skip=skip)
    root = storage.open_store(store, mode="r")
    return Comparison(store=str(store),
                      similarity={n: storage.open_similarity(root, n) for n in storage.list_similarity(root)},
                      analyses={n: storage.read_analysis(root, n) for n in storage.list_analyses(root)},
                      report=index)
