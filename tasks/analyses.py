"""Analyses that explain the CKA maps; pure functions over xarray/numpy, then `run_analyses` (store -> analyses/).

Written under `analyses/` (each an xarray Dataset, long form where pairs have different site lists):
- `matched_cka` (dim point): for every model pair and every CKA matrix, CKA at the sites both models
  have (same `<layer>/<sublayer>`), in model_a's depth order; `stderr` from a minibatch matrix's
  `<name>_stderr` companion; `boot_low`/`boot_high` (95% percentile band of a seeded bootstrap over
  images) when `bootstrap` > 0. Models whose site names differ (a ViT and a ResNet) have no matched
  sites: the full heatmaps show them.
- `sublayer_attribution` (dim transition): for same-architecture pairs, the change of matched CKA from
  each site to the next, attributed to the type of the site it arrives at (`sublayer_type`).
- `target_alignment` (site, target): linear CKA of every site with the one-hot label features
  ("labels") and, when samples have several views, with one-hot image identity ("identity": the
  kernel of "same image, another view"), computed by `tasks.similarity.cka_matrix`.
- `probes` (site, test_sample): linear probes per site (`tasks.probes`).
- `agreement` (model_a, model_b): agreement of the models' last-site probes on the test split.
- `finetuning` (dim point): CKA(fine-tuned, X) and CKA(pretrained, X) at matched sites for each
  model X, for every model with `finetuned_from`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from tasks.agreement import agreement_matrix
from storage.layout import site_ids
from tasks.probes import probe_sites, split_by_image

STDERR_SUFFIX = "_stderr"
TARGETS = ("labels", "identity")


def flat_matrix(da: xr.DataArray) -> xr.DataArray:
    """The matrix with plain site-id string coords on site_a/site_b (drops MultiIndex levels)."""
    a, b = site_ids(da, "site_a"), site_ids(da, "site_b")
    return xr.DataArray(np.asarray(da.values, dtype=np.float64), dims=("site_a", "site_b"),
                        coords={"site_a": a, "site_b": b}, attrs=dict(da.attrs))


def sublayer_type(site: str) -> str:
    """The kind of a site: its sublayer (`attn`, `bn1`, ...) or, for `output`/`input` taps, its layer
    with block numbers replaced by `*` (`norm`, `patch_embed`, `blocks.*.attn`)."""
    layer, _, sub = site.rpartition("/")
    if sub in ("output", "input"):
        return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", layer) or sub
    return sub


def model_pairs(models: Sequence[str]) -> list[tuple[str, str]]:
    return list(combinations(models, 2))


def matched_sites(order: Mapping[str, Sequence[str]], a: str, b: str) -> list[str]:
    """Site names of model `a` (in depth order) that model `b` also has."""
    other = set(order[b])
    return [s for s in order[a] if s in other]


def matched_depth(cka: xr.DataArray, order: Mapping[str, Sequence[str]], *, similarity: str = "",
                  stderr: xr.DataArray | None = None) -> xr.Dataset:
    """CKA at matched sites for every model pair of `order` (model -> site names in depth order).

    Long form along `point`: coords similarity, model_a, model_b, site, sublayer_type, depth (index in
    model_a's order), relative_depth; vars cka and stderr (NaN without a stderr matrix)."""
    cka = flat_matrix(cka)
    se = flat_matrix(stderr) if stderr is not None else None
    pos_a = {s: i for i, s in enumerate(cka.site_a.values)}
    pos_b = {s: i for i, s in enumerate(cka.site_b.values)}
    rows: list[dict[str, Any]] = []
    for a, b in model_pairs(list(order)):
        for site in matched_sites(order, a, b):
            ia, ib = pos_a.get(f"{a}/{site}"), pos_b.get(f"{b}/{site}")
            if ia is None or ib is None:
                continue
            depth = list(order[a]).index(site)
            rows.append({"similarity": similarity, "model_a": a, "model_b": b, "site": site,
                         "sublayer_type": sublayer_type(site), "depth": depth,
                         "relative_depth": depth / max(len(order[a]) - 1, 1),
                         "cka": float(cka.values[ia, ib]),
                         "stderr": float(se.values[ia, ib]) if se is not None else np.nan})
    return _long_form(rows, "point", ("cka", "stderr"))


def _long_form(rows: list[dict[str, Any]], dim: str, data_vars: Sequence[str]) -> xr.Dataset:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return xr.Dataset({v: (dim, np.zeros(0)) for v in data_vars})
    coords = {c: (dim, frame[c].to_numpy()) for c in frame.columns if c not in data_vars}
    return xr.Dataset({v: (dim, frame[v].to_numpy(dtype=np.float64)) for v in data_vars}, coords=coords)


def bootstrap_band(matched: xr.Dataset, arrays: Callable[[list[str]], Mapping[str, np.ndarray]],
                   image_index: np.ndarray, *, replicates: int, seed: int = 0,
                   cka_options: Mapping[str, Any] | None = None, client: Any = None,
                   level: float = 0.95) -> xr.Dataset:
    """Add `boot_low`/`boot_high` to `matched`: percentile band of matched CKA over `replicates` seeded
    resamplings of whole images (all views of a drawn image come along), each recomputed by
    `tasks.similarity.cka_matrix` with `cka_options` (kernel, unbiased, ...). `arrays(site_ids)` loads
    the features of those sites (in memory: the bootstrap is for moderate N)."""
    from tasks.similarity import cka_matrix

    if matched.sizes.get("point", 0) == 0 or replicates <= 0:
        return matched
    a_ids = [f"{a}/{s}" for a, s in zip(matched.model_a.values, matched.site.values)]
    b_ids = [f"{b}/{s}" for b, s in zip(matched.model_b.values, matched.site.values)]
    features = arrays(sorted(set(a_ids) | set(b_ids)))
    images = np.unique(image_index)
    rows_of = {im: np.flatnonzero(image_index == im) for im in images}
    rng = np.random.default_rng(seed)
    draws = np.empty((replicates, len(a_ids)))
    for r in range(replicates):
        rows = np.concatenate([rows_of[im] for im in rng.choice(images, images.size, replace=True)])
        cka = flat_matrix(cka_matrix({sid: x[rows] for sid, x in features.items()}, client=client,
                                     precision="float64", **dict(cka_options or {})))
        draws[r] = [float(cka.sel(site_a=ia, site_b=ib)) for ia, ib in zip(a_ids, b_ids)]
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return matched.assign(boot_low=("point", low), boot_high=("point", high)).assign_attrs(
        bootstrap_replicates=replicates, bootstrap_seed=seed, bootstrap_level=level)


def sublayer_attribution(matched: xr.Dataset, same_arch: Callable[[str, str], bool]) -> xr.Dataset:
    """Change of matched CKA from each site to the next (`delta` = cka[to] - cka[from]) for the pairs
    with `same_arch(a, b)`, attributed to the sublayer type of the `to` site. Dim `transition`."""
    rows: list[dict[str, Any]] = []
    if matched.sizes.get("point", 0):
        frame = matched.reset_coords().to_dataframe()
        for (sim, a, b), group in frame.groupby(["similarity", "model_a", "model_b"], sort=False):
            if not same_arch(a, b):
                continue
            group = group.sort_values("depth")
            for prev, cur in zip(group.itertuples(), group.iloc[1:].itertuples()):
                rows.append({"similarity": sim, "model_a": a, "model_b": b, "from_site": prev.site,
                             "to_site": cur.site, "sublayer_type": cur.sublayer_type, "delta": cur.cka - prev.cka})
    return _long_form(rows, "transition", ("delta",))


def attribution_by_type(attribution: xr.Dataset) -> dict[tuple[str, str, str], dict[str, dict[str, float]]]:
    """(similarity, model_a, model_b) -> sublayer type -> {total, mean, count} of the CKA changes."""
    out: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
    if not attribution.sizes.get("transition", 0):
        return out
    frame = attribution.reset_coords().to_dataframe()
    for key, group in frame.groupby(["similarity", "model_a", "model_b"], sort=False):
        stats = group.groupby("sublayer_type", sort=False)["delta"].agg(["sum", "mean", "count"])
        out[key] = {t: {"total": float(r["sum"]), "mean": float(r["mean"]), "count": int(r["count"])}
                    for t, r in stats.iterrows()}
    return out


def target_features(samples: xr.Dataset) -> dict[str, np.ndarray]:
    """One-hot label features ("labels") and, when some image has several views, one-hot image
    identity ("identity"); rows follow the samples."""
    labels = np.asarray(samples["label"].values)
    images = np.asarray(samples["image_index"].values)
    out = {"labels": (labels[:, None] == np.unique(labels)[None, :]).astype(np.float32)}
    if np.unique(images).size < images.size:
        out["identity"] = (images[:, None] == np.unique(images)[None, :]).astype(np.float32)
    return out


def target_alignment(arrays: Mapping[str, Any], targets: Mapping[str, np.ndarray], *, client: Any = None,
                     **cka_options: Any) -> xr.DataArray:
    """CKA (linear, biased unless `cka_options` say otherwise) of every site with every target:
    dims (site, target). One `cka_matrix` call over the sites and the targets together."""
    from tasks.similarity import cka_matrix

    clash = set(arrays) & {f"target/{t}" for t in targets}
    if clash:
        raise ValueError(f"site ids collide with target names: {sorted(clash)}")
    keyed = dict(arrays) | {f"target/{t}": np.asarray(v) for t, v in targets.items()}
    cka = flat_matrix(cka_matrix(keyed, client=client, **cka_options))
    sites, names = list(arrays), list(targets)
    values = cka.sel(site_a=sites, site_b=[f"target/{t}" for t in names]).values
    return xr.DataArray(values, dims=("site", "target"), coords={"site": sites, "target": names},
                        attrs={k: v for k, v in cka.attrs.items() if k in ("kernel", "estimator", "n_samples")})


def finetuning_comparison(cka: xr.DataArray, order: Mapping[str, Sequence[str]], finetuned: Mapping[str, str],
                          *, similarity: str = "") -> xr.Dataset:
    """For each fine-tuned model F (F -> pretrained P) and every other model X with sites in common:
    `cka_finetuned` = CKA(F, X) and `cka_pretrained` = CKA(P, X) at the sites all three share, in X's
    depth order; X = P itself gives CKA(F, P) (with cka_pretrained = 1). Dim `point`."""
    cka = flat_matrix(cka)
    pos_a = {s: i for i, s in enumerate(cka.site_a.values)}
    pos_b = {s: i for i, s in enumerate(cka.site_b.values)}
    rows: list[dict[str, Any]] = []
    for f, p in finetuned.items():
        for x in order:
            if x == f:
                continue
            shared = [s for s in order[x] if s in set(order[f]) & set(order[p])]
            for site in shared:
                ix, i_f, i_p = pos_b.get(f"{x}/{site}"), pos_a.get(f"{f}/{site}"), pos_a.get(f"{p}/{site}")
                if None in (ix, i_f, i_p):
                    continue
                depth = list(order[x]).index(site)
                rows.append({"similarity": similarity, "finetuned": f, "pretrained": p, "other": x, "site": site,
                             "depth": depth, "relative_depth": depth / max(len(order[x]) - 1, 1),
                             "cka_finetuned": float(cka.values[i_f, ix]), "cka_pretrained": float(cka.values[i_p, ix])})
    return _long_form(rows, "point", ("cka_finetuned", "cka_pretrained"))


def site_coords(ids: Sequence[str], order: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, list]]:
    """model, depth and relative_depth coords along `site` for a list of site ids."""
    models, depth, rel = [], [], []
    for sid in ids:
        model, _, site = sid.partition("/")
        sites = list(order[model])
        models.append(model)
        depth.append(sites.index(site))
        rel.append(sites.index(site) / max(len(sites) - 1, 1))
    return {"model": ("site", models), "depth": ("site", depth), "relative_depth": ("site", rel)}


def last_site_agreement(probes: xr.Dataset, order: Mapping[str, Sequence[str]]) -> xr.Dataset:
    """`agreement_matrix` of every model's probe at its last site, on the test split."""
    last = {m: f"{m}/{sites[-1]}" for m, sites in order.items() if f"{m}/{sites[-1]}" in probes.site.values}
    predictions = {m: probes["prediction"].sel(site=sid).values for m, sid in last.items()}
    out = agreement_matrix(predictions, probes["test_label"].values)
    return out.assign_coords(site=("model", [last[m] for m in out.model.values]))


# ---------------------------------------------------------------- composition and the store wrapper


def _cka_options(attrs: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {"kernel": attrs.get("kernel", "linear"), "unbiased": attrs.get("estimator") == "unbiased"}
    if "rbf_threshold" in attrs:
        options["rbf_threshold"] = attrs["rbf_threshold"]
    return options


def compute_analyses(*, similarity: Mapping[str, xr.DataArray], order: Mapping[str, Sequence[str]],
                     model_attrs: Mapping[str, Mapping[str, Any]], samples: xr.Dataset, arrays: Mapping[str, Any],
                     probes: bool = True, probe_seed: int = 0, test_fraction: float = 0.3, bootstrap: int = 0,
                     client: Any = None, memory_budget: str = "2GiB", device: str = "auto") -> dict[str, xr.Dataset]:
    """Every analysis, by name. `similarity`: CKA matrices by name (with `<name>_stderr` companions),
    `order`: model -> site names in depth order, `arrays`: site id -> (sample, feature) array (zarr or numpy)."""
    from dask.utils import parse_bytes

    out: dict[str, xr.Dataset] = {}
    names = [n for n in similarity if not n.endswith(STDERR_SUFFIX)]
    finetuned = {m: a["finetuned_from"] for m, a in model_attrs.items() if a.get("finetuned_from") in order}

    def load(ids: list[str]) -> dict[str, np.ndarray]:
        return {sid: np.asarray(arrays[sid][:], dtype=np.float64) for sid in ids}

    matched_parts, finetune_parts = [], []
    for name in names:
        part = matched_depth(similarity[name], order, similarity=name, stderr=similarity.get(name + STDERR_SUFFIX))
        if bootstrap > 0:
            part = bootstrap_band(part, load, samples["image_index"].values, replicates=bootstrap, seed=probe_seed,
                                  cka_options=_cka_options(similarity[name].attrs), client=client)
        matched_parts.append(part)
        if finetuned:
            finetune_parts.append(finetuning_comparison(similarity[name], order, finetuned, similarity=name))
    if matched_parts:
        out["matched_cka"] = xr.concat(matched_parts, dim="point", data_vars="all", coords="all", join="outer",
                                       combine_attrs="drop_conflicts")
        out["sublayer_attribution"] = sublayer_attribution(
            out["matched_cka"], lambda a, b: model_attrs[a].get("arch") == model_attrs[b].get("arch"))
    if finetune_parts:
        out["finetuning"] = xr.concat(finetune_parts, dim="point", data_vars="all", coords="all", join="outer")

    ids = [f"{m}/{s}" for m in order for s in order[m] if f"{m}/{s}" in arrays]
    targets = target_features(samples)
    alignment = xr.concat([target_alignment({sid: arrays[sid] for sid in ids if sid.startswith(m + "/")}, targets,
                                            client=client, memory_budget=memory_budget) for m in order], dim="site")
    out["target_alignment"] = alignment.assign_coords(site_coords(list(alignment.site.values), order)).to_dataset(name="cka")
    if probes:
        labels = samples["label"].values
        mask = split_by_image(samples["image_index"].values, labels, test_fraction, probe_seed)
        probe_ds = probe_sites({sid: arrays[sid] for sid in ids}, labels, mask, seed=probe_seed,
                               memory_budget=parse_bytes(memory_budget), device=device,
                               sample=samples["sample"].values)
        out["probes"] = probe_ds.assign_coords(site_coords(ids, order)).assign_attrs(test_fraction=test_fraction)
        out["agreement"] = last_site_agreement(out["probes"], order)
    return out


def site_order(root: Any, model: str) -> list[str]:
    """A model's site names in depth (forward) order: the `sites` recorded in its attrs (a list, or
    a dict of widths in insertion order), else the order the store lists its arrays in."""
    import storage

    sites = storage.model_attrs(root, model).get("sites")
    return list(sites) if sites else list(storage.activation_arrays(root, model))


def run_analyses(root: Any, *, probes: bool = True, probe_seed: int = 0, test_fraction: float = 0.3,
                 bootstrap: int = 0, client: Any = None) -> list[str]:
    """Compute every analysis from the store (samples, activations, similarity/) and write each under
    analyses/; returns the names written. Memory budget and device come from the run config, if recorded."""
    import storage

    models = storage.list_models(root)
    if not models:
        raise ValueError(f"{storage.store_url(root)}: no extracted models; run the extract stage first")
    attrs = {m: dict(storage.model_attrs(root, m)) for m in models}
    order = {m: site_order(root, m) for m in models}
    compute = root.attrs.get("run", {}).get("config", {}).get("compute", {})
    results = compute_analyses(
        similarity={n: storage.open_similarity(root, n) for n in storage.list_similarity(root)},
        order=order, model_attrs=attrs, samples=storage.read_samples(root),
        arrays={f"{m}/{s}": a for m in models for s, a in storage.activation_arrays(root, m).items()},
        probes=probes, probe_seed=probe_seed, test_fraction=test_fraction, bootstrap=bootstrap, client=client,
        memory_budget=compute.get("memory_budget", "2GiB"), device=compute.get("device", "auto"))
    for name, ds in results.items():
        storage.write_analysis(root, name, ds)
    return list(results)
