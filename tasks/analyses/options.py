"""The options of the analyses stage: a frozen record built once from the config (sizes already in bytes).
Cheap to import: no numpy, torch or xarray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tasks.cka.options import DEFAULT_BUDGET, Views

Solver = Literal["auto", "lbfgs", "ridge"]
ANALYSES = ("matched_cka", "sublayer_attribution", "crossarch_cka", "finetuning", "target_alignment", "probes",
            "agreement")  # what the stage can write under analyses/


@dataclass(frozen=True)
class AnalysesOptions:
    """probes: fit a linear probe per site (on a seeded split holding out `test_fraction` of the images,
    seed `probe_seed`, which also seeds the jackknife groups); bootstrap: groups of the delete-group
    jackknife band of the matched curves (0: none); views: the rows of the probes, agreement and label
    alignment; probe_solver: auto, lbfgs or ridge; skip: analyses (of `ANALYSES`) not computed; memory_budget
    (bytes) and device as for the CKA engine."""

    probes: bool = True
    test_fraction: float = 0.3
    probe_seed: int = 0
    bootstrap: int = 0
    views: Views = "clean"
    probe_solver: Solver = "auto"
    skip: tuple[str, ...] = ()
    memory_budget: int = DEFAULT_BUDGET
    device: str = "auto"
