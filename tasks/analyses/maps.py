"""Analyses that explain the CKA maps: pure functions over xarray/numpy (composed by `tasks.analyses.run`).

Written under `analyses/` (each an xarray Dataset, long form where pairs have different site lists):
- `matched_cka` (dim point): for every model pair and every CKA matrix, CKA at the sites both models
  have (same `<layer>/<sublayer>`), in model_a's depth order; `stderr` from a minibatch matrix's
  `<name>_stderr` companion; `boot_low`/`boot_high` (95% delete-group jackknife band over images,
  `jackknife_band`) when `bootstrap` > 0 groups. Models whose site names differ (a ViT and a ResNet) have no matched
  sites: the full heatmaps show them.
- `sublayer_attribution` (dim transition): for same-architecture pairs, the change of matched CKA from
  each site to the next, attributed to the type of the site it arrives at (`sublayer_type`).
- `target_alignment` (site, target): linear CKA of every site with the one-hot label features
  ("labels") and, when samples have several views, with one-hot image identity ("identity": the
  kernel of "same image, another view"), computed by `tasks.cka.cka_matrix`.
- `probes` (site, test_sample): linear probes per site (`tasks.analyses.probes`).
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

from storage.layout import site_ids
from tasks.analyses.agreement import agreement_matrix
from tasks.cka import cka_matrix


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


def jackknife_band(matched: xr.Dataset, arrays: Callable[[list[str]], Mapping[str, np.ndarray]],
                   image_index: np.ndarray, *, groups: int, seed: int = 0,
                   cka_options: Mapping[str, Any] | None = None, client: Any = None,
                   level: float = 0.95) -> xr.Dataset:
    """Add `boot_low`/`boot_high` to `matched`: a delete-group jackknife band of matched CKA at the full N.

    The images are dealt into `groups` seeded groups of near-equal size (all views of an image together);
    CKA is recomputed without each group (`tasks.cka.cka_matrix` with `cka_options`: kernel, unbiased,
    ...), theta_(g). Standard error sqrt((G-1)/G sum_g (theta_(g) - mean)^2); band: the point estimate
    +- t_{G-1} quantile x standard error. No image is ever repeated (a resample with replacement would
    add duplicate pairs and inflate CKA), and the band is centred on the estimate. `arrays(site_ids)`
    loads the features of those sites, rows matching `image_index`."""
    from scipy.stats import t as student_t

    if matched.sizes.get("point", 0) == 0 or groups <= 0:
        return matched
    if groups < 2:
        raise ValueError(f"jackknife band: need at least 2 groups, got {groups}")
    a_ids = [f"{a}/{s}" for a, s in zip(matched.model_a.values, matched.site.values)]
    b_ids = [f"{b}/{s}" for b, s in zip(matched.model_b.values, matched.site.values)]
    features = arrays(sorted(set(a_ids) | set(b_ids)))
    image_index = np.asarray(image_index)
    images = np.unique(image_index)
    if images.size < groups:
        raise ValueError(f"jackknife band: {groups} groups but only {images.size} images")
    group_of = dict(zip(np.random.default_rng(seed).permutation(images), np.arange(images.size) % groups))
    member = np.array([group_of[im] for im in image_index])
    draws = np.empty((groups, len(a_ids)))
    for g in range(groups):
        rows = np.flatnonzero(member != g)
        cka = flat_matrix(cka_matrix({sid: x[rows] for sid, x in features.items()}, client=client,
                                     precision="float64", **dict(cka_options or {})))
        draws[g] = [float(cka.sel(site_a=ia, site_b=ib)) for ia, ib in zip(a_ids, b_ids)]
    spread = np.sqrt((groups - 1) / groups * np.sum((draws - draws.mean(0)) ** 2, axis=0))
    half = student_t.ppf(0.5 + level / 2, groups - 1) * spread
    point = matched["cka"].values
    return matched.assign(boot_low=("point", point - half), boot_high=("point", point + half)).assign_attrs(
        band_method="delete-group jackknife", band_groups=groups, band_seed=seed, band_level=level)


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
    """(similarity, model_a, model_b) -> sublayer type -> {total, mean, count, undefined} of the CKA changes:
    total/mean/count over the defined (finite) changes only, NaN total and mean when there are none;
    `undefined`: the transitions from or to a site with undefined (NaN) CKA."""
    out: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
    if not attribution.sizes.get("transition", 0):
        return out
    frame = attribution.reset_coords().to_dataframe()
    for key, group in frame.groupby(["similarity", "model_a", "model_b"], sort=False):
        by_type = group.groupby("sublayer_type", sort=False)["delta"]
        stats = by_type.agg(total=lambda v: v.sum(min_count=1), mean="mean", count="count", size="size")
        out[key] = {t: {"total": float(r["total"]), "mean": float(r["mean"]), "count": int(r["count"]),
                        "undefined": int(r["size"] - r["count"])} for t, r in stats.iterrows()}
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
                     progress: Callable[[int, int], Any] | None = None, **cka_options: Any) -> xr.DataArray:
    """CKA (linear, biased unless `cka_options` say otherwise) of every site with every target:
    dims (site, target). One `cka_matrix` call over the sites and the targets together, which forms only
    the site x target products (and each site's self-product): the site x site entries, not wanted here,
    are passed as `known` (NaN, never read)."""
    clash = set(arrays) & {f"target/{t}" for t in targets}
    if clash:
        raise ValueError(f"site ids collide with target names: {sorted(clash)}")
    keyed = dict(arrays) | {f"target/{t}": np.asarray(v) for t, v in targets.items()}
    sites, names = list(arrays), list(targets)
    unwanted = xr.DataArray(np.full((len(sites), len(sites)), np.nan), dims=("site_a", "site_b"),
                            coords={"site_a": sites, "site_b": sites})
    cka = flat_matrix(cka_matrix(keyed, client=client, known=unwanted, progress=progress, **cka_options))
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
