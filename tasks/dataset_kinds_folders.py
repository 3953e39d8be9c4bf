"""Dataset kinds stored as image files in class folders: `imagefolder` and `digits`.

- `imagefolder`: `<path>[/<split>]/<class>/**/<image>` (ImageNet-val style). Classes are the
  sorted sub-folder names; images are the files with an image extension (hidden files ignored),
  keyed by their path relative to the root (POSIX separators), in sorted key order.
- `digits`: scikit-learn's handwritten digits exported once (`export_digits`) as an ImageFolder
  of RGB PNGs: `<path>/<digit>/<index>.png`, `index` = position in `load_digits` order, pixels
  from `tasks.zoo_data.digit_images` (the model zoo trains on the same pixels). Splits follow
  `tasks.zoo_data.split_indices`: `train`, `heldout`, `all` (default).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.dataset_kinds_base import IMAGE_EXTENSIONS, check_index, decode_image, describe

DIGITS_MANIFEST = "digits.json"


class FolderImages:
    """Images stored as files under `root`; `keys` are paths relative to it."""

    def __init__(self, root: Path, keys: list[str], labels: np.ndarray, class_names: list[str],
                 description: dict[str, Any]) -> None:
        check_index(description["kind"], str(root), keys, labels, class_names)
        self.root, self.keys, self.labels = root, keys, labels
        self.class_names, self.description = class_names, description

    def load(self, i: int) -> Image.Image:
        return decode_image(self.root / self.keys[i], self.keys[i])


def _image_files(folder: Path) -> list[str]:
    """Image files below `folder` (recursive, following links), relative POSIX paths."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative = Path(directory).relative_to(folder)
        found += [(relative / f).as_posix() for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def scan_folders(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(sorted keys, labels, class names) of an ImageFolder root; an empty class folder is an error."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {str(root)!r}")
    class_names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders")
    labelled = []
    for label, name in enumerate(class_names):
        files = _image_files(root / name)
        if not files:
            raise ValueError(f"image folder {str(root)!r}: class folder {name!r} holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
        labelled += [(f"{name}/{f}", label) for f in files]
    labelled.sort()
    return [k for k, _ in labelled], np.array([label for _, label in labelled], dtype=np.int64), class_names


def open_imagefolder(path: str, split: str | None = None) -> FolderImages:
    """An ImageFolder at `path` (or `path/split`)."""
    root = Path(path) / split if split else Path(path)
    keys, labels, class_names = scan_folders(root)
    return FolderImages(root, keys, labels, class_names, describe("imagefolder", path, split, keys, class_names))


def export_digits(directory: str | Path, size: int = 32) -> Path:
    """Write scikit-learn's digits as an ImageFolder of `size`x`size` RGB PNGs into `directory`
    (idempotent: an existing export of the same size is kept; atomic: written to a temporary
    sibling folder, then renamed into place, so readers never see a partial export)."""
    from tasks.zoo_data import digit_images

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
    from tasks.zoo_data import split_indices

    root = export_digits(path, size)
    keys, labels, class_names = scan_folders(root)
    index = np.array([int(Path(k).stem) for k in keys])
    keep = np.isin(index, split_indices(len(keys), split or "all"))
    keys = [k for k, kept in zip(keys, keep) if kept]
    return FolderImages(root, keys, labels[keep], class_names,
                        describe("digits", path, split, keys, class_names, size=size))
