"""SimCLR-style augmentation views, reproducible from an integer key.

A view is: random resized crop (torchvision's RandomResizedCrop sampling, back to the input
size), horizontal flip, colour jitter (brightness, contrast, saturation, hue in a random order,
applied with probability `jitter_p`) and optional grayscale. Every random parameter is drawn
from numpy's PCG64 seeded with the key (e.g. `(seed, image_index, view)`) using uniform draws
only, so a view is the same on any machine and in any process; the pixels are then produced by
torchvision.transforms.v2 functional ops on the PIL image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torchvision.transforms.v2.functional as F
from PIL import Image

from storage import json_safe

_JITTER_OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


@dataclass(frozen=True)
class ViewParams:
    """The drawn parameters of one view."""

    crop: tuple[int, int, int, int]            # top, left, height, width
    flip: bool
    jitter: tuple[tuple[int, float], ...]      # (op index into brightness/contrast/saturation/hue, factor), in order
    grayscale: bool


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(rng.random())


def _integer(rng: np.random.Generator, count: int) -> int:
    """Uniform integer in 0..count-1."""
    return min(int(rng.random() * count), count - 1)


@dataclass(frozen=True)
class ViewAugmentation:
    """SimCLR-style view parameters (defaults: SimCLR / MoCo v2 ImageNet settings)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "jitter"):   # lists from JSON attrs -> tuples
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"augmentation crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augmentation crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"augmentation jitter must be 4 values >= 0 (hue <= 0.5), got {self.jitter}")
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augmentation {name} must be a probability, got {getattr(self, name)}")

    def describe(self) -> dict[str, Any]:
        """JSON-able parameters; `ViewAugmentation(**describe())` rebuilds it."""
        return json_safe(asdict(self))

    def _crop(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        area, log_ratio = width * height, (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            target = area * _uniform(rng, *self.crop_scale)
            aspect = math.exp(_uniform(rng, *log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _integer(rng, height - h + 1), _integer(rng, width - w + 1), h, w
        ratio = width / height   # fallback: central crop at the nearest allowed aspect ratio
        if ratio < self.crop_ratio[0]:
            w, h = width, round(width / self.crop_ratio[0])
        elif ratio > self.crop_ratio[1]:
            w, h = round(height * self.crop_ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, key: Sequence[int], width: int, height: int) -> ViewParams:
        """The parameters of the view `key` of a `width`x`height` image."""
        rng = np.random.default_rng([int(k) for k in key])
        crop = self._crop(rng, width, height)
        flip = float(rng.random()) < self.flip_p
        jittered = float(rng.random()) < self.jitter_p
        b, c, s, h = self.jitter
        factors = [_uniform(rng, max(0.0, 1 - b), 1 + b), _uniform(rng, max(0.0, 1 - c), 1 + c),
                   _uniform(rng, max(0.0, 1 - s), 1 + s), _uniform(rng, -h, h)]
        order = np.argsort(rng.random(4), kind="stable")
        grayscale = float(rng.random()) < self.grayscale_p
        jitter = tuple((int(op), factors[op]) for op in order) if jittered else ()
        return ViewParams(crop, flip, jitter, grayscale)

    def __call__(self, image: Image.Image, key: Sequence[int]) -> Image.Image:
        """The augmented view `key` of an RGB image (same size as the input)."""
        params = self.draw(key, *image.size)
        out = F.resized_crop(image, *params.crop, size=[image.height, image.width], antialias=True)
        if params.flip:
            out = F.horizontal_flip(out)
        for op, factor in params.jitter:
            out = _JITTER_OPS[op](out, factor)
        if params.grayscale:
            out = F.rgb_to_grayscale(out, num_output_channels=3)
        return out
