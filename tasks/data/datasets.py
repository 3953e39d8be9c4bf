"""Image datasets: one `open_dataset` entry point over every supported kind.

Kinds (each in its own module, `tasks/data/kinds/*.py`): `imagefolder` (folders), `digits`, `webdataset`, `cifar10` (archives), `hf` (Hugging Face `save_to_disk`),
`synthetic` (generated). Every kind returns an `ImageDataset`: keys, labels, class names, a
JSON-able description, and `load(i)` -> RGB PIL image (raises `BadImageError`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from tasks.data.kinds import (
    ImageDataset,
    open_cifar10,
    open_digits,
    open_hf,
    open_imagefolder,
    open_synthetic,
    open_webdataset,
)

KINDS: dict[str, Callable[..., ImageDataset]] = {
    "imagefolder": open_imagefolder, "digits": open_digits, "webdataset": open_webdataset,
    "cifar10": open_cifar10, "hf": open_hf, "synthetic": open_synthetic,
}


def _options_of(opener: Callable[..., ImageDataset]) -> list[str]:
    return [p for p in inspect.signature(opener).parameters if p not in ("path", "split")]


def open_dataset(kind: str, path: str | None, split: str | None = None, **options: Any) -> ImageDataset:
    """Open a dataset of `kind` at `path`; `options` are kind-specific (see each kind's module)."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; kinds: {', '.join(KINDS)}")
    opener = KINDS[kind]
    unknown = sorted(set(options) - set(_options_of(opener)))
    if unknown:
        raise ValueError(f"dataset kind {kind!r}: unknown option(s) {', '.join(unknown)}; "
                         f"options: {', '.join(_options_of(opener)) or 'none'}")
    if path is None and kind != "synthetic":
        raise ValueError(f"dataset kind {kind!r} needs a path")
    return opener(str(path) if path is not None else None, split, **options)
