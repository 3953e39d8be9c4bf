"""`probe_sites`: every site's probe (the solver chosen per site), as one labelled dataset."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import xarray as xr

from tasks.analyses.options import Solver
from tasks.analyses.probes.fanout import client_groups, fit_groups, site_groups
from tasks.analyses.probes.protocol import VALIDATION_FRACTION, validation_mask
from tasks.analyses.probes.solvers import (
    C_GRID,
    RIDGE_GRID,
    STOPPING_RULE,
    ProbeResult,
    choose_solver,
    probe_group,
    probe_ridge,
    probe_streaming,
)
from tasks.extract import resolve_device


def probe_sites(arrays: Mapping[str, Any], labels: np.ndarray, test_mask: np.ndarray, *, seed: int = 0,
                solver: Solver = "auto", memory_budget: int = 2**30, device: str = "auto", client: Any = None,
                sample: np.ndarray | None = None, image_index: np.ndarray | None = None,
                progress: Callable[[int, int | None], Any] | None = None) -> xr.Dataset:
    """Probe every site (site id -> (n, d) array): `train_accuracy`, `test_accuracy`, `backend`, `converged`,
    `C`, `iterations`, `gradient` (site), `validation_accuracy` (site, C) and `prediction` (site,
    test_sample), test_sample = the test rows' `sample` coordinate (default: row numbers), with their true
    `test_label`. `solver` auto: batched L-BFGS for the sites that fit `memory_budget` (in groups that fit
    it), out-of-core SGD for the others. With a Dask `client` (and a CPU device), the L-BFGS groups run in
    parallel as tasks on its workers (at least four groups per worker thread; the groups in flight together
    fit the budget); the results are the same as in this process. `progress(done_now, total)` in sites:
    (0, total) before the first fit, then after every group or site, the sites it finished."""
    labels, test_mask = np.asarray(labels), np.asarray(test_mask, dtype=bool)
    image_index = np.arange(labels.size) if image_index is None else np.asarray(image_index)
    val_mask = validation_mask(image_index, labels, test_mask, seed)
    n = labels.size
    for sid, array in arrays.items():
        if array.shape[0] != n:
            raise ValueError(f"probe: site {sid!r} has {array.shape[0]} rows but there are {n} labels")
    solvers = {sid: choose_solver(n, a.shape[1], memory_budget) if solver == "auto" else solver
               for sid, a in arrays.items()}
    results: dict[str, ProbeResult] = {}

    def done(now: int) -> None:
        if progress:
            progress(now, len(arrays))

    done(0)
    batched = {s: arrays[s].shape[1] for s in arrays if solvers[s] == "lbfgs"}
    if client is not None and resolve_device(device).type == "cpu":
        slots = sum(client.nthreads().values())  # worker threads: the groups run as tasks there
        planned = client_groups(batched, n, memory_budget, slots)
    else:
        client, slots, planned = None, 1, site_groups(batched, n, memory_budget)
    fit = functools.partial(probe_group, labels=labels, test_mask=test_mask, val_mask=val_mask, device=device)
    for group, fitted in fit_groups(planned, arrays, fit, client, slots):
        results.update(zip(group, fitted))
        done(len(group))
    for sid in (s for s in arrays if solvers[s] != "lbfgs"):
        results[sid] = (probe_ridge(arrays[sid], labels, test_mask, val_mask) if solvers[sid] == "ridge"
                        else probe_streaming(arrays[sid], labels, test_mask, seed=seed, device=device))
        done(1)
    sites = list(arrays)
    rows = np.flatnonzero(test_mask) if sample is None else np.asarray(sample)[test_mask]
    grid = sorted({c for r in results.values() for c in r.validation_accuracy})
    val = [[results[s].validation_accuracy.get(c, np.nan) for c in grid] for s in sites]
    return xr.Dataset(
        {"train_accuracy": ("site", [results[s].train_accuracy for s in sites]),
         "test_accuracy": ("site", [results[s].test_accuracy for s in sites]),
         "backend": ("site", [results[s].backend for s in sites]),
         "converged": ("site", [results[s].converged for s in sites]),
         "C": ("site", [results[s].C for s in sites]),
         "iterations": ("site", [results[s].iterations for s in sites]),
         "gradient": ("site", [results[s].gradient for s in sites]),
         "validation_accuracy": (("site", "penalty"), np.asarray(val, dtype=np.float64).reshape(len(sites), len(grid))),
         "prediction": (("site", "test_sample"), np.stack([results[s].predictions for s in sites]))},
        coords={"site": sites, "penalty": grid, "test_sample": rows,
                "test_label": ("test_sample", labels[test_mask])},
        attrs={"seed": seed, "n_train": int((~test_mask).sum()), "n_test": int(test_mask.sum()),
               "n_validation": int(val_mask.sum()), "C_grid": list(C_GRID), "ridge_grid": list(RIDGE_GRID),
               "stopping_rule": STOPPING_RULE,
               "selection": f"C per site by validation accuracy on {VALIDATION_FRACTION:.0%} of the training images",
               "standardised": "train mean/std"})
