"""Report figures (matplotlib, Agg backend): each function returns a Figure; `encode` renders PNG/SVG bytes.

Heatmap tick labels are the site names (`<layer>/<sublayer>`). When every label fits they are all drawn;
otherwise one labelled major tick marks the first site of each layer (a ViT block, a ResNet block), every
site keeps a minor tick, and a short legend names the sublayers a layer's ticks stand for. Models are
separated by drawn lines, NaN cells have their own colour (named in a legend), and the colour range comes
from the data (0-1 on request), one per CKA matrix, with the scale shown. Depth curves take their y range from the data.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.markers import TICKDOWN, TICKLEFT  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

DPI = 110
CMAP = "magma"
NAN_COLOR = "#39d353"       # not in magma, not the separator colour
SEPARATOR_COLOR = "#00c8ff"
LABEL_PT = 7.0              # tick label size when every label is drawn
HEATMAP_GID = "ckaflow-heatmap"


def encode(fig: Figure) -> tuple[bytes, bytes]:
    """PNG and SVG bytes of a figure (which is closed afterwards), both from one layout: the layout engine
    runs once, then each format is drawn once into the padded tight box (`bbox_inches="tight"` would draw
    each format twice, laying it out each time). SVG text stays text (searchable, and readable by the
    report's scripts); the bytes depend on the figure only (no date in the SVG)."""
    out = []
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ckaflow"}):
        fig.set_dpi(DPI)
        engine = fig.get_layout_engine()
        if engine is not None:
            engine.execute(fig)
        box = fig.get_tightbbox().padded(matplotlib.rcParams["savefig.pad_inches"])
        fig.set_layout_engine(None)  # keep the layout as it is: None, unlike "none", skips savefig's layout pass
        for fmt in ("png", "svg"):
            buffer = io.BytesIO()
            fig.savefig(buffer, format=fmt, dpi=DPI, bbox_inches=box, metadata={"Date": None} if fmt == "svg" else None)
            out.append(buffer.getvalue())
    plt.close(fig)
    return out[0], out[1]


def _side(n: int) -> float:
    return float(np.clip(2.5 + 0.16 * n, 4.5, 16))


def layer_of(label: str) -> str:
    """The layer part of a site name or id: everything before the last `/` (`vit_a/blocks.3`)."""
    return label.rpartition("/")[0] or label


def _star(layer: str) -> str:
    """A layer name with its block numbers as `*` (`blocks.*`, `layer*.*`)."""
    return re.sub(r"\d+", "*", layer.rpartition("/")[2])


@dataclass(frozen=True)
class Ticks:
    """Tick plan for one heatmap axis: labelled positions, unlabelled (minor) positions, font size and
    the sublayer legend ('' when every site is labelled)."""

    major: list[int]
    labels: list[str]
    minor: list[int]
    size: float
    legend: str


def site_ticks(labels: Sequence[str], length_in: float) -> Ticks:
    """Every label when they fit in `length_in` inches at LABEL_PT; else the first site of each layer
    (every k-th layer when even those do not fit) with minor ticks at every site."""
    n = len(labels)
    capacity = int(length_in * 72 / (LABEL_PT * 1.3))
    if n <= capacity:
        return Ticks(list(range(n)), list(labels), [], float(min(9.0, length_in * 72 / (1.3 * max(n, 1)))), "")
    starts = [i for i in range(n) if i == 0 or layer_of(labels[i]) != layer_of(labels[i - 1])]
    sizes = np.diff(starts + [n])
    step = max(1, int(np.ceil(len(starts) / capacity)))
    gap = n / capacity
    major: list[int] = []
    # layer starts at least `gap` sites apart; multi-site layers (blocks) first, single sites where room is left
    for k in sorted(range(0, len(starts), step), key=lambda k: (sizes[k] == 1, k)):
        if all(abs(starts[k] - m) >= gap for m in major):
            major.append(starts[k])
    major.sort()
    groups = Counter()
    for k, s in enumerate(starts):
        stop = starts[k + 1] if k + 1 < len(starts) else n
        if stop - s > 1:
            groups[(_star(layer_of(labels[s])), tuple(l.rpartition("/")[2] for l in labels[s:stop]))] += 1
    patterns = dict.fromkeys(f"{layer}: {', '.join(subs)}" for (layer, subs), _ in groups.most_common(4))
    every = "each layer" if step == 1 else f"every {step}th layer"
    legend = (f"Labelled ticks: the first site of {every} (where labels would overlap, some single-site layers go "
              "unlabelled); minor ticks: every site, in this order within a layer:\n"
              + "\n".join(patterns))
    return Ticks(major, [labels[i] for i in major], list(range(n)), LABEL_PT, legend)


def _minor_marks(ax, axis: str, positions: Sequence[int], *, width: float) -> None:
    """Minor ticks (length 2 pt, outward) at `positions` of the bottom x or left y axis that lie in its view
    (the data must be drawn first), as one line of tick markers that leaves the data limits alone: hundreds
    of matplotlib Tick objects would cost most of a large heatmap's drawing time."""
    low, high = sorted(ax.get_xlim() if axis == "x" else ax.get_ylim())
    at = np.asarray([p for p in positions if low <= p <= high], dtype=float)
    if not at.size:
        return
    x, y, marker, transform = ((at, np.zeros_like(at), TICKDOWN, ax.get_xaxis_transform()) if axis == "x" else
                               (np.zeros_like(at), at, TICKLEFT, ax.get_yaxis_transform()))
    ax.add_artist(Line2D(x, y, ls="none", marker=marker, ms=2, mew=width, transform=transform, clip_on=False,
                         color=matplotlib.rcParams[f"{axis}tick.color"]))


COLOR_RANGES = ("data", "unit")  # the config's `report.color_range`
COLORBAR_LABELS = {"data": "CKA\n(colour range from the data\nof the whole matrix)",
                   "unit": "CKA\n(colour range 0 to 1)"}


def color_range(values: np.ndarray, mode: str = "data") -> tuple[float, float]:
    """(vmin, vmax) of the colour scale: with mode "data", the finite data's range rounded out to 0.01 (at
    least 0.02 wide); with "unit", 0-1 (extended below 0 when the data are). The report computes it
    once per CKA matrix, over the whole matrix, and every heatmap of that matrix uses it."""
    if mode not in COLOR_RANGES:
        raise ValueError(f"colour range {mode!r}: expected one of {', '.join(COLOR_RANGES)}")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if mode == "unit":  # CKA is at most 1: a diagonal at 1 + 2e-16 is round-off, drawn at the top colour
        return min(0.0, low), 1.0
    low, high = np.floor(low * 100) / 100, np.ceil(high * 100) / 100
    if high - low < 0.02:
        low, high = low - 0.01, high + 0.01
    return float(low), float(high)


def heatmap(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str,
            ylabel: str = "", xlabel: str = "", separators: Mapping[str, tuple[int, int]] | None = None,
            vrange: tuple[float, float] | None = None, scale: str = "data", gid: str = HEATMAP_GID) -> Figure:
    """CKA heatmap with site-name ticks (see `site_ticks`); `separators` (model -> (start, stop)) draws
    lines between models and names them on top. NaN cells in NAN_COLOR, named in a legend. The image
    carries SVG id `gid` (the report's hover script finds it by that id), the axes `<gid>-axes`.
    vrange: (vmin, vmax) of the colours, the one of the whole matrix these values are part of (default:
    `color_range(values, scale)`); scale: which colour range it is ("data" or "unit"), for the colour bar."""
    values = np.asarray(values, dtype=float)
    width, height = _side(len(cols)) + 1.2, _side(len(rows))
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    vmin, vmax = color_range(values, scale) if vrange is None else vrange
    label = COLORBAR_LABELS[scale]
    cmap = plt.get_cmap(CMAP).with_extremes(bad=NAN_COLOR)
    image = ax.imshow(np.ma.masked_invalid(values), vmin=vmin, vmax=vmax, cmap=cmap, interpolation="none",
                      aspect="auto")
    image.set_gid(gid)
    ax.set_gid(f"{gid}-axes")
    legends = []
    for axis, labels, length in (("y", rows, 0.75 * height), ("x", cols, 0.75 * (width - 1.2))):
        t = site_ticks(labels, length)
        getattr(ax, f"set_{axis}ticks")(t.major, t.labels, fontsize=t.size)
        _minor_marks(ax, axis, t.minor, width=0.5)
        if t.legend and t.legend not in legends:
            legends.append(t.legend)
    ax.tick_params(which="major", length=5)
    plt.setp(ax.get_xticklabels(), rotation=90)
    handles = []
    if separators:
        for start, stop in separators.values():
            for edge in (start - 0.5, stop - 0.5):
                if 0 < edge < len(rows) - 0.5:
                    ax.axhline(edge, color=SEPARATOR_COLOR, lw=1.2)
                if 0 < edge < len(cols) - 0.5:
                    ax.axvline(edge, color=SEPARATOR_COLOR, lw=1.2)
        top = ax.secondary_xaxis("top")
        top.set_ticks([(a + b - 1) / 2 for a, b in separators.values()], list(separators), fontsize=9)
        top.tick_params(length=0)
        handles.append(Line2D([], [], color=SEPARATOR_COLOR, lw=1.5, label="boundary between models"))
    if not np.isfinite(values).all():
        handles.append(Patch(color=NAN_COLOR, label="NaN (undefined: a degenerate site)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower right", fontsize=8, frameon=False)
    if legends:
        fig.text(0.0, 0.0, "\n".join(legends), fontsize=7, ha="left", va="top", transform=fig.transFigure)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    return fig


def _threshold(ax, threshold: float) -> None:
    """A dotted line at `threshold` when it lies inside the data's y range (which it does not widen)."""
    low, high = ax.get_ylim()
    if low <= threshold <= high:
        ax.axhline(threshold, color="grey", lw=0.8, ls=":")
    ax.set_ylim(low, high)


def _site_axis(ax, sites: Sequence[str], length_in: float) -> None:
    t = site_ticks(sites, length_in)
    ax.set_xticks(t.major, t.labels, rotation=90, fontsize=t.size)
    _minor_marks(ax, "x", t.minor, width=matplotlib.rcParams["xtick.minor.width"])


def _band(ax, x, low, high, color) -> None:
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.fill_between(np.asarray(x)[ok], np.asarray(low)[ok], np.asarray(high)[ok], color=color, alpha=0.2, lw=0)


def depth_curves(matched: xr.Dataset, sites: Sequence[str], *, title: str, threshold: float = 0.5) -> Figure:
    """Matched-site CKA against depth, one line per model pair; shaded 95% band from the bootstrap
    (`boot_low`/`boot_high`) or else from the minibatch standard error (+-1.96 stderr); y range from the
    data, the `threshold` line where it falls inside."""
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
    _site_axis(ax, sites, 0.7 * fig.get_figwidth())
    _threshold(ax, threshold)
    ax.set(title=title, ylabel="CKA at matched sites")
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


def by_depth(values: xr.DataArray, *, title: str, ylabel: str, styles: Mapping[str, str] | None = None,
             degenerate: Mapping[str, str] | None = None, chance: float | None = None) -> Figure:
    """Lines per model of a per-site quantity against relative depth (0 = first site, 1 = last).
    `values`: dim site with coords model and relative_depth, optionally a second dim drawn with `styles`.
    `degenerate` (site id -> reason): those sites are drawn as crosses, off the line, and named in the
    legend; `chance`: a dotted line at that level."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    extra = [d for d in values.dims if d != "site"]
    series = [(None, values)] if not extra else [(str(v), values.sel({extra[0]: v})) for v in values[extra[0]].values]
    bad = set(degenerate or {})
    marked = False
    for k, model in enumerate(dict.fromkeys(values.model.values)):
        for name, da in series:
            sub = da.isel(site=np.flatnonzero((da.model == model).values)).sortby("relative_depth")
            ls = (styles or {}).get(name, "-") if name else "-"
            label = f"{model}" + (f" ({name})" if name else "")
            x, y = sub.relative_depth.values, np.asarray(sub.values, dtype=float)
            off = np.isin(sub.site.values.astype(str), list(bad))
            ax.plot(x, np.where(off, np.nan, y), ls=ls, marker="o", ms=2.5, color=f"C{k % 10}", label=label)
            if off.any():
                ax.plot(x[off], y[off], ls="none", marker="x", ms=6, mew=1.5, color=f"C{k % 10}")
                marked = True
    handles, _ = ax.get_legend_handles_labels()
    if marked:
        handles.append(Line2D([], [], ls="none", marker="x", color="black",
                              label="degenerate site (constant features: CKA undefined)"))
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls=":")
        handles.append(Line2D([], [], color="grey", lw=0.8, ls=":", label=f"chance ({chance:.2f})"))
    ax.set(title=title, xlabel="relative depth (first site 0, last site 1)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, ncol=2)
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
    _site_axis(ax, sites, 0.7 * fig.get_figwidth())
    ax.set(title=title, ylabel="CKA at matched sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def crossarch_curves(cross: xr.Dataset, model_a: str, *, title: str, threshold: float = 0.5) -> Figure:
    """Pairs of `model_a` with models of other site names (`crossarch_cka` points). Top: best-match CKA
    (solid) and depth-aligned CKA (dashed) against model_a's relative depth. Bottom: the relative depth of
    the best-matching site in the other model (the diagonal: equal relative depth)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.4), sharex=True, height_ratios=(3, 2), layout="constrained")
    for k, other in enumerate(dict.fromkeys(cross.model_b.values)):
        c = cross.isel(point=np.flatnonzero((cross.model_b == other).values)).sortby("relative_depth")
        x, color = c.relative_depth.values, f"C{k % 10}"
        top.plot(x, c["best_cka"].values, color=color, marker="o", ms=2.5, label=f"{model_a} vs {other}: best match")
        top.plot(x, c["aligned_cka"].values, color=color, ls="--", label=f"{model_a} vs {other}: same relative depth")
        bottom.plot(x, c.best_relative_depth.values, color=color, marker="o", ms=2.5, ls="-", lw=0.8, label=str(other))
    _threshold(top, threshold)
    top.set(title=title, ylabel="CKA")
    top.grid(alpha=0.3)
    top.legend(fontsize=7)
    bottom.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="equal relative depth")
    bottom.set(xlabel=f"relative depth in {model_a} (first site 0, last site 1)",
               ylabel="relative depth of the\nbest-matching site", ylim=(-0.05, 1.05))
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7)
    return fig
