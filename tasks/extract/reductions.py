"""Reductions: how one tapped tensor becomes one feature vector per image.

| name      | input                        | output (batch, features)                                  |
|-----------|------------------------------|-----------------------------------------------------------|
| `cls`     | tokens (B, N, C)             | the first prefix token (class token), C                   |
| `mean`    | tokens (B, N, C)             | mean over patch tokens, prefix tokens excluded, C         |
| `tokens`  | tokens (B, N, C)             | every token (prefix included) flattened, N*C              |
| `avgpool` | maps (B, C, H, W)            | global average over H, W, C                               |
| `pool<k>` | maps (B, C, H, W)            | adaptive average to k x k, flattened channel-major, C*k*k |
| `flatten` | any (B, ...)                 | everything after the batch dim flattened (logical order)  |

Tuple/list outputs reduce their first element (e.g. attention modules that also return
weights); dict outputs must hold exactly one tensor. The result is always float32 and never
shares memory with the input, so in-place ops later in the forward cannot alter it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tasks.extract.options import POOL, ReductionError, check_reduction

TOKEN_REDUCTIONS = ("cls", "mean", "tokens")


def as_tensor(output: Any) -> torch.Tensor:
    """The tensor a module output stands for: itself, the first element of a tuple/list,
    or the only tensor of a dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Sequence) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping):
        tensors = {k: v for k, v in output.items() if isinstance(v, torch.Tensor)}
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ReductionError(f"dict output with tensors {sorted(map(str, tensors))}: expected exactly one")
    raise ReductionError(f"module output of type {type(output).__name__} holds no tensor")


def reduce(tensor: torch.Tensor, reduction: str, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Reduce a (batch, ...) activation to float32 (batch, features) that owns its memory."""
    check_reduction(reduction)
    x = tensor.float()
    shape = tuple(tensor.shape)
    if reduction in TOKEN_REDUCTIONS and x.ndim != 3:
        raise ReductionError(f"reduction {reduction!r} needs tokens (batch, tokens, channels); got shape {shape}")
    if (reduction == "avgpool" or POOL.match(reduction)) and x.ndim != 4:
        raise ReductionError(f"reduction {reduction!r} needs maps (batch, channels, h, w); got shape {shape}")
    if reduction == "cls":
        if num_prefix_tokens < 1:
            raise ReductionError(f"reduction 'cls' needs a prefix (class) token; this tensor (shape {shape}) has none")
        out = x[:, 0]
    elif reduction == "mean":
        if x.shape[1] <= num_prefix_tokens:
            raise ReductionError(f"reduction 'mean': shape {shape} has no tokens after {num_prefix_tokens} prefix tokens")
        out = x[:, num_prefix_tokens:].mean(dim=1)
    elif reduction == "avgpool":
        out = x.mean(dim=(2, 3))
    elif match := POOL.match(reduction):
        out = F.adaptive_avg_pool2d(x, int(match.group(1))).flatten(1)
    else:  # tokens, flatten
        out = x.reshape(x.shape[0], -1)
    if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        out = out.clone()
    return out.contiguous()


def feature_width(shape: tuple[int, ...], reduction: str, num_prefix_tokens: int = 0) -> int:
    """Feature width of `reduction` on a per-sample `shape`; ReductionError if it does not apply."""
    return reduce(torch.zeros((1, *shape)), reduction, num_prefix_tokens).shape[1]


def reductions_for(shape: tuple[int, ...], num_prefix_tokens: int = 0) -> dict[str, int]:
    """Reductions (pool<k> shown as pool2) that apply to a per-sample `shape`, with their widths."""
    widths = {}
    for reduction in ("cls", "mean", "tokens", "avgpool", "pool2", "flatten"):
        with contextlib.suppress(ReductionError):
            widths[reduction] = feature_width(shape, reduction, num_prefix_tokens)
    return widths
