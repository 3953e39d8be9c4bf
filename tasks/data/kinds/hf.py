"""The `hf` dataset kind: a Hugging Face dataset saved with `save_to_disk`, read with the
`datasets` library (imported only when this kind is opened).

`image_column` must be a `datasets.Image` feature; its stored bytes (or file path) are decoded
here, so a bad image raises BadImageError. `label_column` is a `ClassLabel` (its names are the
classes) or plain values (the distinct values, sorted, are the classes). A saved DatasetDict
needs `split` unless it holds a single split. Keys are the zero-padded row numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.data.kinds.base import BadImageError, check_index, decode_image, describe, index_labels


class HFImages:
    """Rows of a saved Hugging Face dataset (only the image column is kept, undecoded)."""

    def __init__(self, images: Any, image_column: str, keys: list[str], labels: np.ndarray,
                 class_names: list[str], description: dict[str, Any]) -> None:
        check_index("hf", description["path"], keys, labels, class_names)
        self.images, self.image_column, self.keys, self.labels = images, image_column, keys, labels
        self.class_names, self.description = class_names, description

    def load(self, i: int) -> Image.Image:
        key, value = self.keys[i], self.images[i][self.image_column] or {}
        if value.get("bytes"):
            return decode_image(value["bytes"], key, value.get("path") or key)
        if value.get("path"):
            return decode_image(Path(value["path"]), key)
        raise BadImageError(key, "no image stored in this row")


def _select_split(saved: Any, path: str, split: str | None) -> Any:
    import datasets

    if isinstance(saved, datasets.DatasetDict):
        names = list(saved)
        if split is None and len(names) == 1:
            return saved[names[0]]
        if split not in saved:
            raise ValueError(f"hf dataset at {path!r}: choose a split with 'split' "
                             f"(got {split!r}; splits: {', '.join(names)})")
        return saved[split]
    if split is not None:
        raise ValueError(f"hf dataset at {path!r} was saved without splits; drop split={split!r}")
    return saved


def open_hf(path: str, split: str | None = None, image_column: str = "image",
            label_column: str = "label") -> HFImages:
    """A dataset saved with `save_to_disk` at `path`."""
    try:
        import datasets
    except ImportError:
        raise ImportError("dataset kind 'hf' needs the Hugging Face 'datasets' package "
                          "(pip install datasets)") from None
    if not Path(path).exists():
        raise FileNotFoundError(f"hf dataset not found: {path!r}")
    table = _select_split(datasets.load_from_disk(path), path, split)
    features = table.features
    for role, column in (("image_column", image_column), ("label_column", label_column)):
        if column not in features:
            raise ValueError(f"hf dataset at {path!r}: {role} {column!r} is not a column "
                             f"(columns: {', '.join(features)})")
    if not isinstance(features[image_column], datasets.Image):
        raise ValueError(f"hf dataset at {path!r}: image_column {image_column!r} is "
                         f"{type(features[image_column]).__name__}, not an Image feature")
    values = list(table[label_column])
    if isinstance(features[label_column], datasets.ClassLabel):
        labels, class_names = np.asarray(values, dtype=np.int64), list(features[label_column].names)
    else:
        labels, class_names = index_labels(values)
    keys = [f"{i:08d}" for i in range(len(values))]
    images = table.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
    return HFImages(images, image_column, keys, labels, class_names,
                    describe("hf", path, split, keys, class_names, image_column=image_column,
                             label_column=label_column))
