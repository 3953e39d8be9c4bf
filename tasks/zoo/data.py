"""The digits data as training tensors for the model zoo, and GPU-free augmentations on tensors.

The pixels and the train/held-out split are the `digits` dataset kind's (`tasks.data`: `digit_images`,
`split_indices`), so the zoo trains on exactly the images the demo extracts. Tensors hold values in
[0, 1]. The zoo trains on the `train` split; probes fit on it and score on the held-out images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tasks.data import Split, digit_images, split_indices


@dataclass(frozen=True)
class DigitsTensors:
    """Images (n, 3, size, size) float32 in [0, 1], labels (n,) int64, and their load_digits indices."""

    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray


def digits_tensors(split: Split, size: int = 32, limit: int | None = None) -> DigitsTensors:
    """The images of one split as tensors; `limit` keeps the first `limit` of them (in index order)."""
    rgb, labels = digit_images(size)
    index = split_indices(len(labels), split)[:limit]
    images = torch.from_numpy(rgb[index]).permute(0, 3, 1, 2).float().div(255.0).contiguous()
    return DigitsTensors(images, torch.from_numpy(labels[index]), index)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(images - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(images: torch.Tensor, generator: torch.Generator, *, strength: float = 1.0) -> torch.Tensor:
    """A random view of each image (batched, CPU, seeded by `generator`): a random affine crop
    (zoom 0.75..1.15, shift up to 12%, rotation up to 15 degrees; no flips: digits are not mirror
    symmetric), then brightness/contrast jitter and a little Gaussian noise, clamped to [0, 1].
    `strength` scales every range (0 = identity)."""
    n = images.shape[0]
    zoom = torch.exp(_uniform(n, math.log(0.75), math.log(1.15), generator) * strength)
    angle = _uniform(n, -1, 1, generator) * math.radians(15) * strength
    shift = _uniform(2 * n, -0.12, 0.12, generator).view(n, 2) * strength
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = 1 + _uniform(n, -0.4, 0.4, generator).view(n, 1, 1, 1) * strength
    brightness = _uniform(n, -0.2, 0.2, generator).view(n, 1, 1, 1) * strength
    noise = torch.randn(out.shape, generator=generator) * (0.03 * strength)
    return (out * contrast + brightness + noise).clamp(0, 1)
