"""The `imagefolder` dataset kind: `<path>[/<split>]/<class>/**/<image>` (ImageNet-val style).

Classes are the sorted sub-folder names; images are the files with an image extension (hidden files
ignored), keyed by their path relative to the root (POSIX separators), in sorted key order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.data.kinds.base import IMAGE_EXTENSIONS, check_index, decode_image, describe


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
