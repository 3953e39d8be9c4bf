"""What the report shows, read from the run store: `ReportData` and `collect`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xarray as xr

from storage import STDERR_SUFFIX


@dataclass
class ReportData:
    """Everything the report shows, read from the store (or built by hand in tests)."""

    run: dict[str, Any]
    samples: xr.Dataset
    models: dict[str, dict[str, Any]]
    similarity: dict[str, xr.DataArray]  # name -> flat (site_a, site_b) matrix; `<name>_stderr` companions included
    analyses: dict[str, xr.Dataset] = field(default_factory=dict)
    store_url: str = ""
    others: list[dict[str, Any]] = field(default_factory=list)  # results in the store that are not this run's

    def __post_init__(self) -> None:
        """Models in config order (the run's `config.models`), any others after them in their given order."""
        configured = [m.get("name") for m in self.run.get("config", {}).get("models", []) if isinstance(m, Mapping)]
        rank = {name: k for k, name in enumerate(configured)}
        self.models = dict(sorted(self.models.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    @property
    def order(self) -> dict[str, list[str]]:
        return {m: list(a.get("sites", [])) for m, a in self.models.items()}

    @property
    def cka_names(self) -> list[str]:
        return [n for n in self.similarity if not n.endswith(STDERR_SUFFIX)]

    @property
    def primary(self) -> str | None:
        """The first CKA matrix (the configured primary one), which the findings and per-pair figures use."""
        return next(iter(self.cka_names), None)


def collect(root: Any, run: Mapping[str, Any] | None = None, *, analyses: Sequence[str]) -> ReportData:
    """Read a run's results from the store: run metadata, samples, model attrs, CKA matrices, the
    `analyses` results that exist.

    run: the run record (default: the store's last successful run). When it records the fingerprints of
    its results, only stored results with exactly those fingerprints (and activations of its sample) are
    shown; everything else in the store goes to `others` with its own fingerprint. A record without
    fingerprints (a store written by hand) shows everything the store holds."""
    import storage
    from tasks.analyses import flat_matrix, site_order

    run = dict(storage.last_successful_run(root) if run is None else run)
    expected = run.get("fingerprints")
    stored_models, stored_matrices = storage.list_models(root), storage.list_similarity(root)
    attrs = {m: storage.model_attrs(root, m) for m in stored_models}
    matrix_fps = {n: storage.recorded_fingerprint(root, f"similarity/{n}") for n in stored_matrices}
    analyses_fp = storage.recorded_fingerprint(root, "analyses")
    if expected is None:
        model_names, matrix_names, show_analyses = stored_models, stored_matrices, True
    else:
        model_names = [m for m, fp in expected["models"].items() if m in attrs and attrs[m]["fingerprint"] == fp
                       and attrs[m].get("samples_fingerprint") == expected["samples"]]
        matrix_names = [n for n, fp in expected["similarity"].items() if n in matrix_fps and matrix_fps[n] == fp]
        show_analyses = analyses_fp == expected["analyses"]
    others = [{"kind": "activations", "name": m, "fingerprint": attrs[m]["fingerprint"]}
              for m in stored_models if m not in model_names]
    others += [{"kind": "similarity", "name": n, "fingerprint": matrix_fps[n]}
               for n in stored_matrices if n not in matrix_names]
    models = {m: dict(attrs[m], sites=site_order(root, m)) for m in model_names}
    similarity = {n: flat_matrix(storage.open_similarity(root, n)) for n in matrix_names}
    results = {}
    if show_analyses:
        for name in analyses:
            try:
                results[name] = storage.read_analysis(root, name).load()
            except (storage.StoreError, KeyError, FileNotFoundError):
                continue  # not computed (e.g. probes disabled, no fine-tuned model)
    elif storage.list_analyses(root):
        others.append({"kind": "analyses", "name": ", ".join(storage.list_analyses(root)), "fingerprint": analyses_fp})
    return ReportData(run=run, samples=storage.read_samples(root), models=models, similarity=similarity,
                      analyses=results, store_url=storage.store_url(root), others=others)
