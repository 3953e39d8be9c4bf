"""The `digits` dataset kind: scikit-learn's handwritten digits, the offline demo data.

Exported once (`export_digits`) as an ImageFolder of RGB PNGs: `<path>/<digit>/<index>.png`,
`index` = position in `load_digits` order. Pixels: grey levels 0..16 scaled to 0..255 (rounded to
uint8), bilinear-resized with PIL to `size` x `size`, replicated to 3 channels (`digit_images`; the
model zoo trains on the same pixels). Splits (`split_indices`): image `i` is held out when
`i % HELDOUT_EVERY == 0` (360 of 1797 images, every class represented); `train` is the rest, `all`
the default.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from tasks.data.kinds.base import describe
from tasks.data.kinds.folders import FolderImages, scan_folders

DIGITS_MANIFEST = "digits.json"
HELDOUT_EVERY = 5
Split = Literal["train", "heldout", "all"]


def digit_images(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 RGB arrays (n, size, size, 3) and their labels (n,)."""
    from sklearn.datasets import load_digits  # on first use: opening any dataset costs no scikit-learn import

    digits = load_digits()
    grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rgb = [np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR).convert("RGB"))
           for g in grey]
    return np.stack(rgb), digits.target.astype(np.int64)


def split_indices(n: int, split: Split) -> np.ndarray:
    """Indices of the images of `split` among `n` images (held out: index % HELDOUT_EVERY == 0)."""
    index = np.arange(n)
    if split == "all":
        return index
    if split == "heldout":
        return index[index % HELDOUT_EVERY == 0]
    if split == "train":
        return index[index % HELDOUT_EVERY != 0]
    raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")


def export_digits(directory: str | Path, size: int = 32) -> Path:
    """Write scikit-learn's digits as an ImageFolder of `size`x`size` RGB PNGs into `directory`
    (idempotent: an existing export of the same size is kept; atomic: written to a temporary
    sibling folder, then renamed into place, so readers never see a partial export)."""
    target = Path(directory)
    if not (target / DIGITS_MANIFEST).is_file():
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(f"cannot export digits to {str(target)!r}: it exists and is not a digits export "
                             f"(no {DIGITS_MANIFEST})")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            images, labels = digit_images(size)
            for label in np.unique(labels):
                (staging / str(label)).mkdir()
            for index, (image, label) in enumerate(zip(images, labels)):
                Image.fromarray(image).save(staging / str(label) / f"{index:04d}.png")
            manifest = {"source": "sklearn.datasets.load_digits", "size": size, "n_images": len(labels)}
            (staging / DIGITS_MANIFEST).write_text(json.dumps(manifest))
            try:
                staging.rename(target)
            except OSError:
                if not (target / DIGITS_MANIFEST).is_file():  # not a concurrent exporter winning the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    exported = json.loads((target / DIGITS_MANIFEST).read_text())
    if exported.get("size") != size:
        raise ValueError(f"digits in {str(target)!r} were exported at size {exported.get('size')}, "
                         f"not {size}: use another directory")
    return target


def open_digits(path: str, split: str | None = None, size: int = 32) -> FolderImages:
    """The digits demo set, exported to `path` on first use; `split`: train, heldout or all."""
    root = export_digits(path, size)
    keys, labels, class_names = scan_folders(root)
    index = np.array([int(Path(k).stem) for k in keys])
    keep = np.isin(index, split_indices(len(keys), split or "all"))
    keys = [k for k, kept in zip(keys, keep) if kept]
    return FolderImages(root, keys, labels[keep], class_names,
                        describe("digits", path, split, keys, class_names, size=size))
