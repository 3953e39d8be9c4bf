"""The analyses stage: every analysis composed (`compute_analyses`), and the store wrapper
(`run_analyses`: samples, activations and similarity/ in, analyses/ out)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

import storage
from storage import STDERR_SUFFIX
from tasks.analyses.crossarch import crossarch_cka
from tasks.analyses.maps import (
    finetuning_comparison,
    jackknife_band,
    last_site_agreement,
    matched_depth,
    site_coords,
    sublayer_attribution,
    target_alignment,
    target_features,
)
from tasks.analyses.options import AnalysesOptions
from tasks.analyses.probes import probe_sites
from tasks.analyses.probes.protocol import split_by_image
from tasks.cka import select_rows, view_rows

Progress = Callable[[int, int | None], Any]


def _cka_options(attrs: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"kernel": attrs.get("kernel", "linear"), "unbiased": attrs.get("estimator") == "unbiased"}
    if "rbf_threshold" in attrs:
        options["rbf_threshold"] = attrs["rbf_threshold"]
    return options


class _Consecutive:
    """The progress of consecutive engine calls as one count: each call's total adds to the earlier ones'."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.earlier, self.current = progress, 0, 0

    def __call__(self, done_now: int, total: int | None) -> None:
        self.current = total or 0
        if self.progress is not None:
            self.progress(done_now, self.earlier + self.current)

    def next_call(self) -> None:
        self.earlier, self.current = self.earlier + self.current, 0


def _views_of(matrix: xr.DataArray) -> str:
    """The views a stored matrix was computed on (one without the record: every row)."""
    return str(matrix.attrs.get("views", "all"))


def compute_analyses(options: AnalysesOptions = AnalysesOptions(), *, similarity: Mapping[str, xr.DataArray],
                     order: Mapping[str, Sequence[str]], model_attrs: Mapping[str, Mapping[str, Any]],
                     samples: xr.Dataset, arrays: Mapping[str, Any], client: Any = None,
                     probe_progress: Progress | None = None,
                     alignment_progress: Progress | None = None) -> dict[str, xr.Dataset]:
    """Every analysis, by name. `similarity`: CKA matrices by name (with `<name>_stderr` companions),
    `order`: model -> site names in depth order, `arrays`: site id -> (sample, feature) array (zarr or numpy)
    on the rows of `samples`. `options.views` (`tasks.cka.view_rows`): the rows of the probes, agreement and
    label alignment; the identity target uses every view; matched curves, bands and fine-tuning follow
    each matrix's own recorded views. Every result records `views` and `rows` in its attrs.
    `options.skip`: analyses not computed (without probes, no agreement either).
    Progress, `(done now, total)`: `probe_progress` in probed sites, `alignment_progress` in the CKA tasks
    of the target alignment (all sites against the labels, then against image identity)."""
    views, bootstrap, probe_seed = options.views, options.bootstrap, options.probe_seed
    out: dict[str, xr.Dataset] = {}
    n_all = samples.sizes["sample"]
    names = [n for n in similarity if not n.endswith(STDERR_SUFFIX)]
    finetuned = {m: a["finetuned_from"] for m, a in model_attrs.items() if a.get("finetuned_from") in order}
    by_matrix = {n: {"views": _views_of(similarity[n]), "rows": int(similarity[n].attrs.get("rows", n_all))}
                 for n in names}

    matched_parts, finetune_parts = [], []
    for name in names:
        part = matched_depth(similarity[name], order, similarity=name, stderr=similarity.get(name + STDERR_SUFFIX))
        if bootstrap > 0:
            rows = view_rows(samples, by_matrix[name]["views"])
            part = jackknife_band(
                part, lambda ids: {sid: np.asarray(arrays[sid][:], dtype=np.float64)[rows] for sid in ids},
                samples["image_index"].values[rows], groups=bootstrap, seed=probe_seed,
                cka_options=_cka_options(similarity[name].attrs), client=client)
        matched_parts.append(part)
        if finetuned:
            finetune_parts.append(finetuning_comparison(similarity[name], order, finetuned, similarity=name))
    record = {"views_by_matrix": by_matrix}
    if matched_parts:
        out["matched_cka"] = xr.concat(matched_parts, dim="point", data_vars="all", coords="all", join="outer",
                                       combine_attrs="drop_conflicts").assign_attrs(record)
        out["sublayer_attribution"] = sublayer_attribution(
            out["matched_cka"], lambda a, b: model_attrs[a].get("arch") == model_attrs[b].get("arch")
        ).assign_attrs(record)
    cross = [crossarch_cka(similarity[name], order, similarity=name) for name in names]
    cross = [part for part in cross if part.sizes["point"]]
    if cross:
        out["crossarch_cka"] = xr.concat(cross, dim="point", data_vars="all", coords="all", join="outer").assign_attrs(
            record)
    if finetune_parts:
        out["finetuning"] = xr.concat(finetune_parts, dim="point", data_vars="all", coords="all",
                                      join="outer").assign_attrs(record)

    rows = view_rows(samples, views)
    chosen, chosen_arrays = samples.isel(sample=rows), select_rows(arrays, rows, n_all)
    ids = [f"{m}/{s}" for m in order for s in order[m] if f"{m}/{s}" in arrays]
    label_target = {"labels": target_features(chosen)["labels"]}
    identity = {k: v for k, v in target_features(samples).items() if k == "identity"}
    jobs = [({sid: chosen_arrays[sid] for sid in ids}, label_target)]
    if identity:
        jobs.append(({sid: arrays[sid] for sid in ids}, identity))
    if "target_alignment" not in options.skip:
        tick = _Consecutive(alignment_progress)
        parts = []
        for sites, target in jobs:
            parts.append(target_alignment(sites, target, client=client, memory_budget=options.memory_budget,
                                          progress=tick))
            tick.next_call()
        alignment = xr.concat(parts, dim="target")
        out["target_alignment"] = alignment.assign_coords(site_coords(list(alignment.site.values), order)).to_dataset(
            name="cka").assign_attrs(views=views, rows=int(rows.size), identity_views="all" if identity else "none",
                                     identity_rows=int(n_all) if identity else 0)
    if options.probes and "probes" not in options.skip:
        labels = chosen["label"].values
        mask = split_by_image(chosen["image_index"].values, labels, options.test_fraction, probe_seed)
        probe_ds = probe_sites({sid: chosen_arrays[sid] for sid in ids}, labels, mask, seed=probe_seed,
                               solver=options.probe_solver, memory_budget=options.memory_budget,
                               device=options.device, client=client, sample=chosen["sample"].values,
                               image_index=chosen["image_index"].values, progress=probe_progress)
        out["probes"] = probe_ds.assign_coords(site_coords(ids, order)).assign_attrs(
            test_fraction=options.test_fraction, views=views, rows=int(rows.size))
        out["agreement"] = last_site_agreement(out["probes"], order).assign_attrs(
            views=views, rows=int(mask.sum()), rows_meaning="test rows")
    return {name: ds for name, ds in out.items() if name not in options.skip}


def site_order(root: Any, model: str) -> list[str]:
    """A model's site names in depth (forward) order: the `sites` recorded in its attrs (a list, or
    a dict of widths in insertion order), else the order the store lists its arrays in."""
    sites = storage.model_attrs(root, model).get("sites")
    return list(sites) if sites else list(storage.activation_arrays(root, model))


def run_analyses(root: Any, options: AnalysesOptions = AnalysesOptions(), *, models: Sequence[str] | None = None,
                 similarity: Sequence[str] | None = None, client: Any = None, probe_progress: Progress | None = None,
                 alignment_progress: Progress | None = None) -> list[str]:
    """Compute every analysis from the store (samples, activations, similarity/) and write each under
    analyses/; returns the names written. models / similarity: the models and matrices to use (default:
    all in the store). Refuses activations extracted from another sample than the stored one. The other
    arguments as for `compute_analyses`."""
    models = list(storage.list_models(root) if models is None else models)
    if not models:
        raise ValueError(f"{storage.store_url(root)}: no extracted models; run the extract stage first")
    samples = storage.read_samples(root)
    attrs = {m: dict(storage.model_attrs(root, m)) for m in models}
    for model, model_attrs in attrs.items():
        if model_attrs.get("samples_fingerprint") != samples.attrs["fingerprint"]:
            raise storage.StoreError(
                f"model {model!r} in {storage.store_url(root)} was extracted from the sample "
                f"{model_attrs.get('samples_fingerprint')}, not from the stored sample {samples.attrs['fingerprint']}: "
                "its activations do not match the labels; re-run the extract stage")
    names = list(storage.list_similarity(root) if similarity is None else similarity)
    order = {m: site_order(root, m) for m in models}
    results = compute_analyses(
        options, similarity={n: storage.open_similarity(root, n) for n in names}, order=order, model_attrs=attrs,
        samples=samples, arrays={f"{m}/{s}": a for m in models for s, a in storage.activation_arrays(root, m).items()},
        client=client, probe_progress=probe_progress, alignment_progress=alignment_progress)
    for name, ds in results.items():
        storage.write_analysis(root, name, ds)
    return list(results)
