"""What a configuration says about extraction, checkable without torch (the config schema imports
this alone): the site presets, the reduction names, the preprocessing keys, the kinds of `arch` and
where import-path factories are imported from, the extraction options."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.suggest import did_you_mean

SITE_PRESETS = ("vit-blocks", "vit-sublayers", "resnet-blocks", "resnet-sublayers")
POOL = re.compile(r"^pool([1-9][0-9]*)$")
PREPROCESSING_KEYS = ("input_size", "img_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")
MEMORY_PREFIX = "memory:"


class ReductionError(ValueError):
    """A reduction that cannot apply to a tensor; the message names reduction and shape."""


def check_reduction(reduction: str) -> str:
    """Validate a reduction name (cls, mean, tokens, avgpool, pool<k>, flatten)."""
    if reduction in ("cls", "mean", "tokens", "avgpool", "flatten") or POOL.match(reduction):
        return reduction
    raise ReductionError(f"unknown reduction {reduction!r}; use cls, mean, tokens, avgpool, pool<k> or flatten")


def check_preprocessing(overrides: dict[str, Any]) -> dict[str, Any]:
    """Validate the keys of a model's `preprocessing` (ValueError naming the unknown ones)."""
    unknown = sorted(set(overrides) - set(PREPROCESSING_KEYS))
    if unknown:
        raise ValueError(f"preprocessing: unknown keys {unknown}{did_you_mean(unknown[0], PREPROCESSING_KEYS)} "
                         f"(allowed: {', '.join(PREPROCESSING_KEYS)})")
    return overrides


def is_import_path(arch: str) -> bool:
    """`package.module:factory` (rather than a timm name or a registered in-memory module)."""
    return ":" in arch and not arch.startswith(MEMORY_PREFIX)


def importable(directory: str | Path) -> None:
    """Let import-path factories import modules from `directory`: appended to sys.path, after the installed
    packages (which it never shadows); processes spawned afterwards (LocalCluster workers) inherit it."""
    path = str(Path(directory).resolve())
    if path not in sys.path:
        sys.path.append(path)


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract: batch size, device and autocast, storage dtype and shard size, loader workers."""

    batch_size: int = 64
    device: str = "auto"
    dtype: str = "float32"
    shard_size: int = 512
    autocast: str = "auto"
    loader_workers: int = 0
