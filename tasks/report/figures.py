"""Report figures (matplotlib, Agg backend): each function returns a Figure; `encode` renders PNG/SVG bytes.

Tick labels are the site names (`<layer>/<sublayer>`), shrunk with the number of sites and thinned
to every k-th label beyond `MAX_LABELS`, so heatmaps of 100+ sites stay readable.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

MAX_LABELS = 60
DPI = 110


def encode(fig: Figure) -> tuple[bytes, bytes]:
    """PNG and SVG bytes of a figure (which is closed afterwards)."""
    out = []
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=DPI, bbox_inches="tight")
        out.append(buffer.getvalue())
    plt.close(fig)
    return out[0], out[1]


def _ticks(n: int) -> tuple[np.ndarray, float]:
    ticks = np.arange(0, n, max(1, int(np.ceil(n / MAX_LABELS))))
    return ticks, float(np.clip(400 / max(len(ticks), 1), 4.5, 9))


def _side(n: int) -> float:
    return float(np.clip(2.5 + 0.16 * n, 4.5, 16))


def heatmap(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str,
            ylabel: str = "", xlabel: str = "", separators: Mapping[str, tuple[int, int]] | None = None) -> Figure:
    """CKA heatmap with site-name tick labels; `separators` (model -> (start, stop)) draws model blocks."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(_side(len(cols)) + 1.2, _side(len(rows))), layout="constrained")
    finite = values[np.isfinite(values)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    image = ax.imshow(values, vmin=vmin, vmax=1.0, cmap="magma", interpolation="nearest", aspect="auto")
    for axis, labels, setter in ((ax.yaxis, rows, ax.set_yticks), (ax.xaxis, cols, ax.set_xticks)):
        ticks, size = _ticks(len(labels))
        setter(ticks, [labels[i] for i in ticks], fontsize=size)
    plt.setp(ax.get_xticklabels(), rotation=90)
    if separators:
        for start, stop in separators.values():
            for edge in (start - 0.5, stop - 0.5):
                ax.axhline(edge, color="white", lw=0.8)
                ax.axvline(edge, color="white", lw=0.8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, shrink=0.8, label="CKA")
    return fig


def _band(ax, x, low, high, color) -> None:
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.fill_between(np.asarray(x)[ok], np.asarray(low)[ok], np.asarray(high)[ok], color=color, alpha=0.2, lw=0)


def depth_curves(matched: xr.Dataset, sites: Sequence[str], *, title: str) -> Figure:
    """Matched-site CKA against depth, one line per model pair; shaded 95% band from the bootstrap
    (`boot_low`/`boot_high`) or else from the minibatch standard error (+-1.96 stderr)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(sites) + 3), 4.2), layout="constrained")
    position = {s: i for i, s in enumerate(sites)}
    pairs = dict.fromkeys(zip(matched.model_a.values, matched.model_b.values))
    for k, (a, b) in enumerate(pairs):
        sel = np.flatnonzero(((matched.model_a == a) & (matched.model_b == b)).values)
        curve = matched.isel(point=sel)
        x = np.array([position[s] for s in curve.site.values])
        idx = np.argsort(x)
        x, y = x[idx], curve["cka"].values[idx]
        color = f"C{k % 10}"
        ax.plot(x, y, marker="o", ms=3, lw=1.4, color=color, label=f"{a} vs {b}")
        if "boot_low" in curve:
            _band(ax, x, curve["boot_low"].values[idx], curve["boot_high"].values[idx], color)
        elif np.isfinite(curve["stderr"].values).any():
            se = curve["stderr"].values[idx]
            _band(ax, x, y - 1.96 * se, y + 1.96 * se, color)
    ticks, size = _ticks(len(sites))
    ax.set_xticks(ticks, [sites[i] for i in ticks], rotation=90, fontsize=size)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(title=title, ylabel="CKA at matched sites", ylim=(min(0.0, ax.get_ylim()[0]), 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def sublayer_bars(by_type: Mapping[str, Mapping[str, Mapping[str, float]]], *, title: str) -> Figure:
    """Grouped bars: summed CKA change per sublayer type (x), one bar per model pair (`by_type`: pair label ->
    type -> {total, ...})."""
    types = list(dict.fromkeys(t for stats in by_type.values() for t in stats))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(types) * max(1, len(by_type)) ** 0.5 + 2), 4),
                           layout="constrained")
    width = 0.8 / max(len(by_type), 1)
    for k, (pair, stats) in enumerate(by_type.items()):
        x = np.arange(len(types)) + (k - (len(by_type) - 1) / 2) * width
        ax.bar(x, [stats.get(t, {}).get("total", np.nan) for t in types], width, label=pair, color=f"C{k % 10}")
    ax.set_xticks(np.arange(len(types)), types, rotation=45, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title=title, ylabel="summed change of CKA (to this sublayer)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def by_depth(values: xr.DataArray, *, title: str, ylabel: str, styles: Mapping[str, str] | None = None) -> Figure:
    """Lines per model of a per-site quantity against relative depth (0 = first site, 1 = last).
    `values`: dim site with coords model and relative_depth, optionally a second dim drawn with `styles`."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    extra = [d for d in values.dims if d != "site"]
    series = [(None, values)] if not extra else [(str(v), values.sel({extra[0]: v})) for v in values[extra[0]].values]
    for k, model in enumerate(dict.fromkeys(values.model.values)):
        for name, da in series:
            sub = da.isel(site=np.flatnonzero((da.model == model).values)).sortby("relative_depth")
            ls = (styles or {}).get(name, "-") if name else "-"
            label = f"{model}" + (f" ({name})" if name else "")
            ax.plot(sub.relative_depth.values, sub.values, ls=ls, marker="o", ms=2.5, color=f"C{k % 10}", label=label)
    ax.set(title=title, xlabel="relative depth (first site 0, last site 1)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def agreement_panels(agreement: xr.Dataset) -> Figure:
    """Three model x model heatmaps: same-class fraction, Cohen's kappa, error consistency."""
    names = [str(m) for m in agreement.model_a.values]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 3.2 * 3 * max(1, len(names) / 5), 4), layout="constrained")
    for ax, var, label in zip(axes, ("agreement", "kappa", "error_consistency"),
                              ("same class", "Cohen's kappa", "error consistency")):
        values = agreement[var].values
        image = ax.imshow(values, vmin=-1 if var != "agreement" else 0, vmax=1, cmap="viridis")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.2f}",
                        ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_title(label)
        fig.colorbar(image, ax=ax, shrink=0.7)
    return fig


def finetuning_curves(ft: xr.Dataset, finetuned: str, sites: Sequence[str], *, title: str) -> Figure:
    """CKA(fine-tuned, X) solid and CKA(pretrained, X) dashed at matched sites, one colour per model X."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(sites) + 3), 4.2), layout="constrained")
    position = {s: i for i, s in enumerate(sites)}
    sel = ft.isel(point=np.flatnonzero((ft.finetuned == finetuned).values))
    pretrained = str(sel.pretrained.values[0]) if sel.sizes["point"] else "?"
    for k, other in enumerate(dict.fromkeys(sel.other.values)):
        curve = sel.isel(point=np.flatnonzero((sel.other == other).values))
        keep = [i for i, s in enumerate(curve.site.values) if s in position]
        x = np.array([position[curve.site.values[i]] for i in keep])
        order = np.argsort(x)
        ax.plot(x[order], curve["cka_finetuned"].values[keep][order], color=f"C{k % 10}", marker="o", ms=3,
                label=f"{finetuned} vs {other}")
        if other != pretrained:
            ax.plot(x[order], curve["cka_pretrained"].values[keep][order], color=f"C{k % 10}", ls="--",
                    label=f"{pretrained} vs {other}")
    ticks, size = _ticks(len(sites))
    ax.set_xticks(ticks, [sites[i] for i in ticks], rotation=90, fontsize=size)
    ax.set(title=title, ylabel="CKA at matched sites", ylim=(min(0.0, ax.get_ylim()[0]), 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig
