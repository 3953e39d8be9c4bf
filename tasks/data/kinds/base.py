"""What every dataset kind shares: the ImageDataset protocol, BadImageError, decoding to RGB,
label indexing and the checks on a dataset's index.

An ImageDataset is an *index* (keys, labels, class names, a JSON-able description) plus
`load(i)`, which reads and decodes image `i` on demand. Indexes are cheap to hold for millions
of images; pixels are only read by `load`. Datasets hold no open file handles, so they pickle
into DataLoader worker processes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class BadImageError(Exception):
    """An image that cannot be used: missing, not an image, truncated, or not convertible to RGB.
    `key` is the dataset key, `reason` says what is wrong, `source` where it was read from."""

    def __init__(self, key: str, reason: str, source: str | None = None) -> None:
        self.key, self.reason, self.source = key, reason, source
        where = f" ({source})" if source and source != key else ""
        super().__init__(f"bad image {key!r}{where}: {reason}")


@runtime_checkable
class ImageDataset(Protocol):
    """A labelled image collection: `keys[i]` names image i, `labels[i]` indexes `class_names`."""

    keys: list[str]
    labels: np.ndarray
    class_names: list[str]
    description: dict[str, Any]

    def load(self, i: int) -> Image.Image:
        """Image i as an RGB PIL image; raises BadImageError."""
        ...


def decode_image(data: bytes | Path, key: str, source: str | None = None) -> Image.Image:
    """Fully decode an encoded image (file path or bytes) into an RGB image; any failure
    (missing file, unknown format, truncated data, unconvertible mode) is a BadImageError.
    Non-RGB modes (L, P, RGBA, CMYK, ...) are converted; an alpha channel is dropped; high-bit-depth
    and float grayscale (I;16, I, F) are scaled to 8 bits by their actual range (`to_8_bits`)."""
    source = source or str(data if isinstance(data, Path) else key)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            if image.mode in HIGH_DEPTH_MODES:
                image = to_8_bits(image)
            return image if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(key, "file not found", source) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise BadImageError(key, f"{type(error).__name__}: {error}", source) from error


def to_8_bits(image: Image.Image) -> Image.Image:
    """A high-bit-depth or float grayscale image as 8-bit grayscale, its actual range [min, max] mapped
    linearly onto [0, 255] (PIL's own conversion clips at 255). A constant image gives all zeros;
    NaN pixels become 0."""
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 0.0)
    scaled = np.zeros_like(values) if high <= low else (np.where(finite, values, low) - low) * (255.0 / (high - low))
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def index_labels(values: Sequence[Any]) -> tuple[np.ndarray, list[str]]:
    """Arbitrary label values (ints or strings) -> (int64 indices into class names, class names):
    the classes are the distinct values in sorted order, named by their text."""
    try:
        classes = sorted(set(values))
    except TypeError as error:
        raise ValueError(f"labels mix incomparable types: {error}") from None
    position = {value: i for i, value in enumerate(classes)}
    return np.fromiter((position[v] for v in values), dtype=np.int64, count=len(values)), [str(c) for c in classes]


def check_index(kind: str, path: str | None, keys: list[str], labels: np.ndarray, class_names: list[str]) -> None:
    """A dataset index must be non-empty, with unique keys and labels that index `class_names`."""
    where = f"dataset {kind!r} at {path!r}" if path else f"dataset {kind!r}"
    if not keys:
        raise ValueError(f"{where}: no images found")
    if len(labels) != len(keys):
        raise ValueError(f"{where}: {len(keys)} keys but {len(labels)} labels")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}: duplicate image keys")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"{where}: labels must lie in 0..{len(class_names) - 1} (the class names), "
                         f"found {int(labels.min())}..{int(labels.max())}")


def describe(kind: str, path: str | Path | None, split: str | None, keys: list[str], class_names: list[str],
             **options: Any) -> dict[str, Any]:
    """The JSON-able description every kind records in samples/ (path made absolute)."""
    return {"kind": kind, "path": str(Path(path).resolve()) if path is not None else None, "split": split,
            "n_images": len(keys), "n_classes": len(class_names), **options}
