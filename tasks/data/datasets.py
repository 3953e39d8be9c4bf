"""Image datasets: one `open_dataset` entry point over every supported kind.

Kinds (each in its own module, `tasks/data/kinds/*.py`): `imagefolder` (folders), `digits`, `webdataset`, `cifar10` (archives), `hf` (Hugging Face `save_to_disk`),
`synthetic` (generated). Every kind returns an `ImageDataset`: keys, labels, class names, a
JSON-able description, and `load(i)` -> RGB PIL image (raises `BadImageError`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.data.kinds import ImageDataset

KINDS = ("imagefolder", "digits", "webdataset", "cifar10", "hf", "synthetic")  # opener: kinds.open_<kind>
DEFAULT_DIGITS_PATH = "runs/data/digits"  # where the digits are exported when no path is given


def _opener(kind: str) -> Callable[..., ImageDataset]:
    """The opener of a kind, imported with the kind modules only when a dataset is opened (the config
    schema checks the names alone)."""
    return getattr(importlib.import_module("tasks.data.kinds"), f"open_{kind}")


def _options_of(opener: Callable[..., ImageDataset]) -> list[str]:
    return [p for p in inspect.signature(opener).parameters if p not in ("path", "split")]


def open_dataset(kind: str, path: str | None, split: str | None = None, **options: Any) -> ImageDataset:
    """Open a dataset of `kind` at `path` (digits: default `DEFAULT_DIGITS_PATH`); `options` are kind-specific
    (see each kind's module)."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; kinds: {', '.join(KINDS)}")
    opener = _opener(kind)
    unknown = sorted(set(options) - set(_options_of(opener)))
    if unknown:
        raise ValueError(f"dataset kind {kind!r}: unknown option(s) {', '.join(unknown)}; "
                         f"options: {', '.join(_options_of(opener)) or 'none'}")
    if path is None and kind == "digits":
        path = DEFAULT_DIGITS_PATH
    if path is None and kind != "synthetic":
        raise ValueError(f"dataset kind {kind!r} needs a path")
    return opener(str(path) if path is not None else None, split, **options)
