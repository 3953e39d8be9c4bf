"""What a configuration says about extraction, checkable without torch (the config schema imports
this alone): the site presets, the reduction names, the extraction options."""

from __future__ import annotations

import re
from dataclasses import dataclass

SITE_PRESETS = ("vit-blocks", "vit-sublayers", "resnet-blocks", "resnet-sublayers")
POOL = re.compile(r"^pool([1-9][0-9]*)$")


class ReductionError(ValueError):
    """A reduction that cannot apply to a tensor; the message names reduction and shape."""


def check_reduction(reduction: str) -> str:
    """Validate a reduction name (cls, mean, tokens, avgpool, pool<k>, flatten)."""
    if reduction in ("cls", "mean", "tokens", "avgpool", "flatten") or POOL.match(reduction):
        return reduction
    raise ReductionError(f"unknown reduction {reduction!r}; use cls, mean, tokens, avgpool, pool<k> or flatten")


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract: batch size, device and autocast, storage dtype and shard size, loader workers."""

    batch_size: int = 64
    device: str = "auto"
    dtype: str = "float32"
    shard_size: int = 512
    autocast: str = "auto"
    loader_workers: int = 0
