"""Figures kept from the report's last rendering: a figure whose key (a digest of the drawing code, the
matplotlib settings, its drawing function and that function's arguments) is the one recorded with its
files in report/figures/ is read back instead of drawn again. A heatmap's arguments hold its matrix's colour
range (`vrange`, `scale`): a new `report.color_range`, or a change anywhere in the matrix that moves its
range, draws every heatmap of that matrix again. The keys (`figures/keys.json`) are removed
before any figure file is replaced and written again after all of them, so they never describe files that
a rendering left half-written."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from tasks.report.drawing import FigureSpec

KEYS = "figures/keys.json"
FORMATS = ("png", "svg")


def _feed(h: Any, value: Any) -> None:
    """Add `value` to hash `h` by content (xarray's pickles differ from run to run for equal data)."""
    if isinstance(value, xr.DataArray):
        value = value.to_dataset(name="__values__")
    if isinstance(value, xr.Dataset):
        for name in sorted(value.variables, key=str):
            var = value.variables[name]
            _feed(h, (str(name), var.dims, var.values, var.attrs))
        _feed(h, value.attrs)
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype.str}{value.shape}".encode())
        h.update(value.tobytes() if value.dtype.kind not in "OUT" else "\x1f".join(map(str, value.ravel())).encode())
    elif isinstance(value, Mapping):
        for k in sorted(value, key=str):
            _feed(h, (str(k), value[k]))
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif callable(value):
        h.update(f"{value.__module__}.{value.__qualname__}".encode())
    else:
        h.update(repr(value).encode())


def _code() -> str:
    import matplotlib

    from tasks.report import figures

    h = hashlib.sha256(Path(figures.__file__).read_bytes())
    h.update(f"{matplotlib.__version__}{sorted(matplotlib.rcParams.items())}".encode())
    return h.hexdigest()


def figure_keys(specs: Sequence[FigureSpec]) -> list[str]:
    """One key per figure: what its drawing depends on."""
    code, out = _code(), []
    for spec in specs:
        h = hashlib.sha256(code.encode())
        _feed(h, (spec.name, spec.draw, spec.kwargs))
        out.append(h.hexdigest()[:32])
    return out


def kept_figures(fs: Any, base: str, specs: Sequence[FigureSpec],
                 keys: Sequence[str]) -> dict[int, tuple[bytes, bytes]]:
    """(png, svg) by index into `specs`, for the figures whose files under `base` carry their key."""
    try:
        recorded = json.loads(fs.cat_file(f"{base}/{KEYS}"))
    except (FileNotFoundError, ValueError):
        return {}
    out = {}
    for i, spec in enumerate(specs):
        if recorded.get(spec.name) == keys[i]:
            try:
                out[i] = tuple(fs.cat_file(f"{base}/figures/{spec.name}.{fmt}") for fmt in FORMATS)
            except FileNotFoundError:
                continue
    return out


def forget_keys(fs: Any, base: str) -> None:
    if fs.exists(f"{base}/{KEYS}"):
        fs.rm_file(f"{base}/{KEYS}")


def record_keys(fs: Any, base: str, specs: Sequence[FigureSpec], keys: Sequence[str]) -> None:
    fs.pipe_file(f"{base}/{KEYS}", json.dumps({spec.name: key for spec, key in zip(specs, keys)}, indent=1).encode())
