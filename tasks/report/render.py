"""The report: report/index.html (self-contained: images embedded as base64 PNG), report/figures/*.png
and *.svg, report/summary.json (every number, labelled), report/results.nc (the matrices and analyses
as one xarray Dataset), written next to the run store's data (`<store>/report/`, any fsspec URL).

`collect` reads the store into a `ReportData`; `build_report` is pure (data -> files); `render_report`
does both and, when asked, publishes Prefect artifacts (markdown summary, probe and agreement tables,
a link to the HTML).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import xarray as xr

from storage import STDERR_SUFFIX
from tasks.analyses import attribution_by_type, flat_matrix, model_pairs, site_order
from tasks.report import figures
from tasks.report.findings import baseline_findings, crossarch_findings, finetuning_findings, pair_findings

ANALYSES = ("matched_cka", "crossarch_cka", "sublayer_attribution", "target_alignment", "probes", "agreement", "finetuning")
TARGET_STYLES = {"labels": "-", "identity": "--"}


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


@dataclass
class FigureFile:
    """One figure's files; a heatmap also carries its matrix (`hover`: gid, rows, cols, values) so the
    HTML shows it as inline SVG with a hover read-out."""

    name: str
    title: str
    png: bytes
    svg: bytes
    hover: dict[str, Any] | None = None

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    @property
    def inline_svg(self) -> str:
        """The SVG element alone (no XML prolog or doctype), for embedding in the page."""
        text = self.svg.decode("utf-8")
        return text[text.index("<svg"):]

    @property
    def hover_json(self) -> str:
        """`hover` as JSON safe inside a <script> element (values rounded to 4 digits, NaN as null)."""
        values = [[None if not math.isfinite(v) else round(v, 4) for v in row] for row in self.hover["values"]]
        return json.dumps(self.hover | {"values": values}).replace("</", "<\\/")


# ---------------------------------------------------------------- reading


def collect(root: Any, run: Mapping[str, Any] | None = None) -> ReportData:
    """Read a run's results from the store: run metadata, samples, model attrs, CKA matrices, analyses.

    run: the run record (default: the store's last successful run). When it records the fingerprints of
    its results, only stored results with exactly those fingerprints (and activations of its sample) are
    shown; everything else in the store goes to `others` with its own fingerprint. A record without
    fingerprints (a store written by hand) shows everything the store holds."""
    import storage

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
    analyses = {}
    if show_analyses:
        for name in ANALYSES:
            try:
                analyses[name] = storage.read_analysis(root, name).load()
            except (storage.StoreError, KeyError, FileNotFoundError):
                continue  # not computed (e.g. probes disabled, no fine-tuned model)
    elif storage.list_analyses(root):
        others.append({"kind": "analyses", "name": ", ".join(storage.list_analyses(root)), "fingerprint": analyses_fp})
    return ReportData(run=run, samples=storage.read_samples(root), models=models, similarity=similarity,
                      analyses=analyses, store_url=storage.store_url(root), others=others)


# ---------------------------------------------------------------- summary.json


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _per_pair(ds: xr.Dataset, keys: Sequence[str], site_var: str, values: Sequence[str]) -> list[dict[str, Any]]:
    if not ds.sizes.get(ds[values[0]].dims[0], 0):
        return []
    frame = ds.reset_coords().to_dataframe()
    out = []
    for key, group in frame.groupby(list(keys), sort=False):
        out.append(dict(zip(keys, key)) | {"sites": group[site_var].tolist()}
                   | {v: group[v].tolist() for v in values if v in group})
    return out


def _data_facts(data: ReportData) -> dict[str, Any]:
    s = data.samples
    labels = s["label"].values
    names = dict(zip(labels.tolist(), s["label_name"].values.tolist())) if "label_name" in s else {}
    return {"n_samples": int(s.sizes["sample"]), "n_images": int(np.unique(s["image_index"].values).size),
            "views": int(np.unique(s["view"].values).size) if "view" in s else 1,
            "classes": [names.get(c, str(c)) for c in sorted(names)] or sorted(np.unique(labels).tolist()),
            "skipped": list(s.attrs.get("skipped", [])),
            "dataset": _describe(s.attrs.get("dataset", s.attrs.get("description"))), "seed": s.attrs.get("seed")}


def _describe(value: Any) -> str | None:
    """A dataset description (often a dict of kind, path, split, ...) as one line."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items() if v not in (None, "", {}))
    return None if value is None else str(value)


def _views_record(ds: xr.Dataset) -> dict[str, Any]:
    """The views and row count an analysis used (per CKA matrix for the ones derived from matrices)."""
    keys = ("views", "rows", "views_by_matrix", "identity_views", "identity_rows", "rows_meaning")
    return {k: ds.attrs[k] for k in keys if k in ds.attrs}


def build_summary(data: ReportData) -> dict[str, Any]:
    """summary.json: run, models, similarity (issue 2's keys, kept), analyses and findings."""
    facts = _data_facts(data)
    run = {"n_samples": facts["n_samples"], "config": data.run.get("config", {}), "started": data.run.get("started"),
           "finished": data.run.get("finished"), "versions": data.run.get("versions", {}), "data": facts,
           "outcome": data.run.get("outcome"), "stages_done": data.run.get("stages_done", []),
           "stages": data.run.get("stages", {}), "threads": data.run.get("threads", {}),
           "fingerprints": data.run.get("fingerprints")}
    models = {m: {"sites": list(a.get("sites", []))} | {k: v for k, v in a.items() if k != "sites"}
              for m, a in data.models.items()}
    similarity = {}
    for name in data.cka_names:
        cka = data.similarity[name]
        entry = {"kernel": cka.attrs.get("kernel", "linear"), "estimator": cka.attrs.get("estimator", "biased"),
                 "views": cka.attrs.get("views", "all"), "rows": cka.attrs.get("rows", facts["n_samples"]),
                 "sites": list(cka.site_a.values), "matrix": cka.values,
                 "attrs": {k: v for k, v in cka.attrs.items() if k not in ("kernel", "estimator")}}
        if name + STDERR_SUFFIX in data.similarity:
            entry["stderr"] = data.similarity[name + STDERR_SUFFIX].values
        similarity[name] = entry
    analyses: dict[str, Any] = {}
    a = data.analyses
    if "matched_cka" in a:
        analyses["matched_cka"] = _per_pair(a["matched_cka"], ("similarity", "model_a", "model_b"), "site",
                                            ("cka", "stderr", "boot_low", "boot_high"))
    if "sublayer_attribution" in a:
        analyses["sublayer_attribution"] = [
            {"similarity": k[0], "model_a": k[1], "model_b": k[2], "by_type": v}
            for k, v in attribution_by_type(a["sublayer_attribution"]).items()]
        analyses["sublayer_transitions"] = _per_pair(a["sublayer_attribution"], ("similarity", "model_a", "model_b"),
                                                     "to_site", ("delta",))
    if "target_alignment" in a:
        ta = a["target_alignment"]["cka"]
        analyses["target_alignment"] = {"sites": list(ta.site.values), "attrs": dict(ta.attrs)} | {
            str(t): ta.sel(target=t).values for t in ta.target.values}
    if "probes" in a:
        p = a["probes"]
        analyses["probes"] = {"sites": list(p.site.values), "test_accuracy": p["test_accuracy"].values,
                              "train_accuracy": p["train_accuracy"].values, "backend": p["backend"].values,
                              "converged": p["converged"].values, "attrs": dict(p.attrs)}
    if "agreement" in a:
        g = a["agreement"]
        analyses["agreement"] = {"models": list(g.model_a.values), "site": list(g.site.values),
                                 "accuracy": g["accuracy"].values} | {
            v: g[v].values for v in ("agreement", "kappa", "error_consistency")}
    if "finetuning" in a:
        analyses["finetuning"] = _per_pair(a["finetuning"], ("similarity", "finetuned", "pretrained", "other"), "site",
                                           ("cka_finetuned", "cka_pretrained"))
    if "crossarch_cka" in a:
        analyses["crossarch_cka"] = _per_pair(a["crossarch_cka"], ("similarity", "model_a", "model_b"), "site",
                                              ("best_cka", "best_site", "best_relative_depth", "aligned_cka",
                                               "aligned_site", "relative_depth"))
    if a:
        analyses["views"] = {name: _views_record(ds) for name, ds in a.items()}
    ft = data.analyses.get("finetuning")
    ft_facts = finetuning_findings(ft, similarity=data.cka_names[0]) if ft is not None and data.cka_names else []
    cross = data.analyses.get("crossarch_cka")
    cross_facts = crossarch_findings(cross, similarity=data.cka_names[0]) if cross is not None and data.cka_names else []
    return _clean({"run": run, "models": models, "similarity": similarity, "analyses": analyses,
                   "findings": build_findings(data), "finetuning_findings": ft_facts, "crossarch_findings": cross_facts,
                   "other_results": data.others})


def build_findings(data: ReportData) -> list[dict[str, Any]]:
    """Findings for the first CKA matrix (the configured primary one)."""
    if not data.cka_names:
        return []
    name = data.cka_names[0]
    matched = data.analyses.get("matched_cka", xr.Dataset())
    attribution = data.analyses.get("sublayer_attribution")
    findings = pair_findings(data.similarity[name], matched, data.order, similarity=name,
                             attribution=attribution_by_type(attribution) if attribution is not None else None,
                             probes=data.analyses.get("probes"), agreement=data.analyses.get("agreement"))
    return baseline_findings(findings, data.models, matched)


# ---------------------------------------------------------------- figures


def _block(cka: xr.DataArray, a: str, b: str, order: Mapping[str, Sequence[str]]) -> tuple[np.ndarray, list, list]:
    rows = [s for s in order[a] if f"{a}/{s}" in cka.site_a.values]
    cols = [s for s in order[b] if f"{b}/{s}" in cka.site_b.values]
    return cka.sel(site_a=[f"{a}/{s}" for s in rows], site_b=[f"{b}/{s}" for s in cols]).values, rows, cols


def _overview(cka: xr.DataArray, name: str, order: Mapping[str, Sequence[str]],
              full_range: bool) -> tuple[np.ndarray, list[str], figures.Figure]:
    ids = [f"{m}/{s}" for m, sites in order.items() for s in sites if f"{m}/{s}" in cka.site_a.values]
    bounds, start = {}, 0
    for m in order:
        n = sum(1 for i in ids if i.startswith(m + "/"))
        if n:
            bounds[m] = (start, start + n)
        start += n
    values = cka.sel(site_a=ids, site_b=ids).values
    return values, ids, figures.heatmap(values, ids, ids, separators=bounds, full_range=full_range,
                                        gid=f"hm-{name}-all", title=f"{name}: CKA between all sites")


def _degenerate(data: ReportData) -> dict[str, str]:
    """Site id -> reason, for the sites any CKA matrix reports as degenerate (NaN rows)."""
    out: dict[str, str] = {}
    for cka in data.similarity.values():
        reasons = cka.attrs.get("nan_reasons") or {}
        if isinstance(reasons, Mapping):
            out.update({str(k): str(v) for k, v in reasons.items()})
    return out


def build_figures(data: ReportData, *, full_range: bool = False,
                  progress: Callable[[int], None] | None = None) -> dict[str, list[FigureFile]]:
    """Figures by report section; `full_range`: heatmap colours over 0-1 instead of the data's range;
    `progress(1)` after each figure."""
    order, a = data.order, data.analyses
    out: dict[str, list[FigureFile]] = {k: [] for k in ("heatmaps", "depth", "crossarch", "sublayers", "targets",
                                                        "probes", "agreement", "finetuning")}

    def add(section: str, name: str, title: str, fig: figures.Figure, hover: dict[str, Any] | None = None) -> None:
        png, svg = figures.encode(fig)
        out[section].append(FigureFile(name, title, png, svg, hover))
        if progress is not None:
            progress(1)

    for k, name in enumerate(data.cka_names):
        cka = data.similarity[name]
        values, ids, fig = _overview(cka, name, order, full_range)
        add("heatmaps", f"cka_{name}_all", f"{name}: all sites", fig,
            {"gid": f"hm-{name}-all", "rows": ids, "cols": ids, "values": values.tolist()})
        if k == 0:
            for m_a, m_b in [(m, m) for m in order] + model_pairs(list(order)):
                values, rows, cols = _block(cka, m_a, m_b, order)
                if values.size:
                    gid = f"hm-{name}-{m_a}--{m_b}"
                    add("heatmaps", f"cka_{name}_{m_a}__{m_b}", f"{m_a} vs {m_b}",
                        figures.heatmap(values, rows, cols, title=f"{name}: {m_a} (rows) vs {m_b} (columns)",
                                        ylabel=m_a, xlabel=m_b, full_range=full_range, gid=gid),
                        {"gid": gid, "rows": rows, "cols": cols, "values": values.tolist()})
    matched = a.get("matched_cka")
    if matched is not None and matched.sizes.get("point", 0):
        for name in data.cka_names:
            for m_a in order:
                sel = np.flatnonzero(((matched.similarity == name) & (matched.model_a == m_a)).values)
                if sel.size:
                    add("depth", f"depth_{name}_{m_a}", f"{name}: pairs with {m_a}",
                        figures.depth_curves(matched.isel(point=sel), order[m_a],
                                             title=f"{name}: CKA at matched sites, {m_a} vs each model"))
    cross = a.get("crossarch_cka")
    if cross is not None and cross.sizes.get("point", 0) and data.cka_names:
        name = data.cka_names[0]
        for m_a in order:
            sel = np.flatnonzero(((cross.similarity == name) & (cross.model_a == m_a)).values)
            if sel.size:
                add("crossarch", f"crossarch_{name}_{m_a}", f"{name}: {m_a} vs models with other site names",
                    figures.crossarch_curves(cross.isel(point=sel), m_a,
                                             title=f"{name}: {m_a} vs models with other site names"))
    if "sublayer_attribution" in a:
        by_pair = attribution_by_type(a["sublayer_attribution"])
        for name in data.cka_names:
            chosen = {f"{k[1]} vs {k[2]}": v for k, v in by_pair.items() if k[0] == name}
            if chosen:
                add("sublayers", f"sublayers_{name}", name,
                    figures.sublayer_bars(chosen, title=f"{name}: CKA change per sublayer type (same-architecture pairs)"))
    if "target_alignment" in a:
        add("targets", "target_alignment", "target alignment",
            figures.by_depth(a["target_alignment"]["cka"], styles=TARGET_STYLES, ylabel="CKA with target kernel",
                             title="CKA with the label kernel (solid) and the instance-identity kernel (dashed)"))
    if "probes" in a:
        n_classes = len(np.unique(data.samples["label"].values))
        add("probes", "probe_accuracy", "probe accuracy",
            figures.by_depth(a["probes"]["test_accuracy"], ylabel="test accuracy", degenerate=_degenerate(data),
                             chance=1 / n_classes if n_classes else None,
                             title="Linear probe test accuracy per site"))
    if "agreement" in a:
        add("agreement", "agreement", "agreement", figures.agreement_panels(a["agreement"]))
    ft = a.get("finetuning")
    if ft is not None and ft.sizes.get("point", 0):
        name = data.cka_names[0]
        for f in dict.fromkeys(ft.finetuned.values):
            sel = ft.isel(point=np.flatnonzero(((ft.finetuned == f) & (ft.similarity == name)).values))
            add("finetuning", f"finetuning_{f}", str(f),
                figures.finetuning_curves(sel, str(f), order[str(f)],
                                          title=f"{name}: {f} (solid) vs its pretrained model (dashed)"))
    return out


# ---------------------------------------------------------------- results.nc


def _netcdf_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(_clean(v), default=str)
            for k, v in attrs.items()}


def _prefixed(ds: xr.Dataset, prefix: str) -> xr.Dataset:
    names = {n: f"{prefix}__{n}" for n in list(ds.variables) + list(ds.dims)}
    ds = ds.rename(names)
    for var in ds.variables.values():
        var.attrs = _netcdf_attrs(var.attrs)
    return ds.assign_attrs({})


def results_dataset(data: ReportData) -> xr.Dataset:
    """One Dataset for xarray users: `similarity_<name>__cka` etc. and `<analysis>__<var>`, names
    prefixed so different site lists never clash. Attrs JSON-encoded where not scalar."""
    parts = [_prefixed(da.to_dataset(name="cka" if not n.endswith(STDERR_SUFFIX) else "stderr"), f"similarity_{n}")
             for n, da in data.similarity.items()]
    parts += [_prefixed(ds, name) for name, ds in data.analyses.items()]
    merged = xr.merge(parts, combine_attrs="drop") if parts else xr.Dataset()
    return merged.assign_attrs(_netcdf_attrs({"run": data.run, "store": data.store_url}))


# ---------------------------------------------------------------- HTML


def _duration(run: Mapping[str, Any]) -> str | None:
    try:
        seconds = (datetime.fromisoformat(run["finished"]) - datetime.fromisoformat(run["started"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None
    return f"{seconds:.0f} s"


def _nan_sites(data: ReportData) -> list[dict[str, Any]]:
    """One row per site with non-finite activations or NaN CKA: its reasons and where they were seen."""
    rows: dict[str, dict[str, dict[str, None]]] = {}

    def note(site: str, what: str, where: str) -> None:
        entry = rows.setdefault(site, {"what": {}, "where": {}})
        entry["what"][what] = None
        entry["where"][where] = None

    for m, attrs in data.models.items():
        for site, count in (attrs.get("nonfinite") or {}).items():
            if count:
                note(f"{m}/{site}", f"{count} non-finite activation values", "activations")
    for name, cka in data.similarity.items():
        reasons = cka.attrs.get("nan_reasons") or {}
        for site, reason in (reasons.items() if isinstance(reasons, Mapping) else enumerate(reasons)):
            note(str(site), str(reason), name)
    return [{"site": site, "what": "; ".join(e["what"]), "where": ", ".join(e["where"])} for site, e in rows.items()]


def render_html(data: ReportData, summary: Mapping[str, Any], figs: Mapping[str, list[FigureFile]]) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("tasks.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda v, d=3: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (
        f"{v:.{d}f}" if isinstance(v, float) else str(v))
    return env.get_template("report.html.j2").render(
        title=data.run.get("config", {}).get("name", "ckaflow"), store=data.store_url, summary=summary,
        data=summary["run"]["data"], duration=_duration(data.run), figures=figs, nan_sites=_nan_sites(data),
        similarity_info={n: summary["similarity"][n] for n in data.cka_names}, order=data.order,
        analyses=summary["analyses"], findings=summary["findings"], ft_findings=summary["finetuning_findings"],
        crossarch_findings=summary["crossarch_findings"],
        probes=_probe_rows(data),
        targets=_target_rows(data))


def _stored_site_ids(data: ReportData, result: Any) -> Iterator[tuple[str, list[str]]]:
    """(model, its site ids present in an analysis result along `site`, in depth order), per model."""
    present = set(map(str, result.site.values))
    for model, sites in data.order.items():
        ids = [f"{model}/{s}" for s in sites if f"{model}/{s}" in present]
        if ids:
            yield model, ids


def _probe_rows(data: ReportData) -> list[dict[str, Any]]:
    p = data.analyses.get("probes")
    if p is None:
        return []
    rows = []
    for m, ids in _stored_site_ids(data, p):
        acc = p["test_accuracy"].sel(site=ids).values
        best = int(np.argmax(acc))
        rows.append({"model": m, "last_site": ids[-1], "last": float(acc[-1]), "best_site": ids[best],
                     "best": float(acc[best]), "backend": ", ".join(sorted(set(p["backend"].sel(site=ids).values)))})
    return rows


def _target_rows(data: ReportData) -> list[dict[str, Any]]:
    t = data.analyses.get("target_alignment")
    if t is None:
        return []
    rows = []
    for m, ids in _stored_site_ids(data, t):
        row = {"model": m}
        for target in t.target.values:
            values = t["cka"].sel(site=ids, target=target).values
            mid = len(ids) // 2
            row[str(target)] = {"middle": float(values[mid]), "middle_site": ids[mid], "last": float(values[-1]),
                                "max": float(np.nanmax(values)) if np.isfinite(values).any() else None}
        rows.append(row)
    return rows


# ---------------------------------------------------------------- writing


def build_report(data: ReportData, out_url: str, summary: Mapping[str, Any] | None = None, *,
                 full_range: bool = False, progress: Callable[[int], None] | None = None) -> str:
    """Write index.html, figures/, summary.json and results.nc under `out_url` (a directory path or
    fsspec URL); returns the path/URL of index.html. full_range: heatmap colours over 0-1; progress:
    as for `build_figures`."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(out_url)
    fs.makedirs(f"{base}/figures", exist_ok=True)
    summary = summary if summary is not None else build_summary(data)
    figs = build_figures(data, full_range=full_range, progress=progress)
    for section in figs.values():
        for fig in section:
            fs.pipe_file(f"{base}/figures/{fig.name}.png", fig.png)
            fs.pipe_file(f"{base}/figures/{fig.name}.svg", fig.svg)
    fs.pipe_file(f"{base}/summary.json", json.dumps(summary, indent=1, default=str).encode())
    fs.pipe_file(f"{base}/results.nc", results_dataset(data).to_netcdf(engine="scipy"))
    fs.pipe_file(f"{base}/index.html", render_html(data, summary, figs).encode("utf-8"))
    return out_url.rstrip("/") + "/index.html"


@dataclass
class ReportArtifacts:
    """What the orchestrator publishes beside the report: a markdown summary, tables (key -> rows and
    description) and the report's link."""

    markdown: str
    tables: dict[str, tuple[list[dict[str, Any]], str]]
    link: str


def report_artifacts(data: ReportData, summary: Mapping[str, Any], index: str) -> ReportArtifacts:
    """Markdown summary, probe and agreement tables, and link to the report at `index`."""
    lines = [f"# ckaflow report: {data.run.get('config', {}).get('name', '')}",
             f"{summary['run']['n_samples']} samples, {len(data.models)} models, CKA matrices: "
             f"{', '.join(data.cka_names) or 'none'}.", "", "## Findings", ""]
    lines += [f"- {f['text']}" for f in summary["findings"] + summary["crossarch_findings"]
              + summary["finetuning_findings"]] or ["- none (no CKA matrix)"]
    tables = {}
    probes = _probe_rows(data)
    if probes:
        tables["ckaflow-probes"] = (_clean(probes), "linear probe test accuracy")
    g = summary["analyses"].get("agreement")
    if g:
        rows = [{"model_a": a, "model_b": b, **{v: g[v][i][j] for v in ("agreement", "kappa", "error_consistency")}}
                for i, a in enumerate(g["models"]) for j, b in enumerate(g["models"]) if i < j]
        tables["ckaflow-agreement"] = (rows, "last-site probe agreement")
    link = index if "://" in index else Path(index).resolve().as_uri()
    return ReportArtifacts("\n".join(lines), tables, link)


def render_report(root: Any, *, run: Mapping[str, Any] | None = None,
                  publish: Callable[[ReportArtifacts], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> str:
    """Render `<store>/report/` from the store; returns the path or URL of report/index.html.
    run: the run record to report (default: the last successful run); publish: called with the
    report's artifacts (the flows publish them to Prefect); progress: `progress(1)` per figure drawn."""
    data = collect(root, run)
    summary = build_summary(data)
    index = build_report(data, data.store_url.rstrip("/") + "/report", summary, progress=progress)
    if publish is not None:
        publish(report_artifacts(data, summary, index))
    return index
