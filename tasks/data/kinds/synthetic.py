"""The `synthetic` dataset kind: procedurally generated labelled images of any size and count,
for scale tests and benchmarks. Nothing is stored: image `i` is generated on demand, a
deterministic function of (`seed`, `i`) (numpy's PCG64 seeded with both; only uniform draws).

Image `i` has label `i % n_classes`: an oriented sine grating whose orientation and hue are set
by the class, with per-image frequency, phase, background and pixel noise.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
from PIL import Image

from tasks.data.kinds.base import check_index, describe


class SyntheticImages:
    """`n` generated `size`x`size` RGB images in `n_classes` classes."""

    def __init__(self, n: int, size: int, n_classes: int, seed: int) -> None:
        for name, value, least in (("n", n, 1), ("size", size, 1), ("n_classes", n_classes, 1), ("seed", seed, 0)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"synthetic dataset: option {name!r} must be an integer >= {least}, got {value!r}")
        self.size, self.seed = size, seed
        self.keys = [f"{i:08d}" for i in range(n)]
        self.labels = np.arange(n, dtype=np.int64) % n_classes
        self.class_names = [f"class_{c}" for c in range(n_classes)]
        self.description: dict[str, Any] = describe("synthetic", None, None, self.keys, self.class_names,
                                                    size=size, seed=seed)
        check_index("synthetic", None, self.keys, self.labels, self.class_names)

    def load(self, i: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, i])
        label, n_classes = int(self.labels[i]), len(self.class_names)
        angle = np.pi * label / n_classes
        frequency, phase = 1.0 + 4.0 * rng.random(), 2 * np.pi * rng.random()
        y, x = np.mgrid[0:self.size, 0:self.size] / self.size
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        hue = np.array(colorsys.hsv_to_rgb(label / n_classes, 0.8, 1.0))
        background = 0.3 * rng.random(3)
        noise = 0.1 * (rng.random((self.size, self.size, 3)) - 0.5)
        pixels = background + 0.65 * wave[..., None] * hue + noise
        return Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8), "RGB")


def open_synthetic(path: str | None = None, split: str | None = None, n: int = 1000, size: int = 32,
                   n_classes: int = 10, seed: int = 0) -> SyntheticImages:
    """Generated images; takes no path and no split."""
    if path is not None or split is not None:
        raise ValueError(f"synthetic dataset takes no path or split (got path={path!r}, split={split!r})")
    return SyntheticImages(n, size, n_classes, seed)
