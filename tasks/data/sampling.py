"""Seeded sampling of images (optionally class-balanced, optionally with augmentation views),
as the `samples` Dataset that `storage.write_samples` records.

Determinism: one uniform priority per dataset image is drawn from numpy's PCG64 seeded with
`seed` (`Generator.random` only, whose stream numpy keeps stable); images are taken in
ascending priority (stable sort), per class when `per_class` is given. The result depends on
the seed and the dataset index only: the same on any machine, in any process.

Rows: view-major, i.e. all images' view 0 (the plain image, in ascending image index), then
all images' view 1, ...; views >= 1 are `tasks.data.augment.ViewAugmentation` views keyed by
(seed, image_index, view). So the rows of `views=1` are a prefix of the rows of `views=k`.

Bad images: every sampled image is opened (fully decoded) before anything else runs. Policy
`fail` raises the first BadImageError (it names the file); `skip` drops the bad images (no
replacement: the sample shrinks) and records each as {"key", "reason", "path"} in
`attrs["skipped"]`, with `attrs["n_drawn"]` and `attrs["n_images"]` giving the counts.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr
from PIL import Image

import storage
from tasks.data.augment import ViewAugmentation
from tasks.data.kinds import BadImageError, ImageDataset

ON_BAD_IMAGE = ("fail", "skip")
SAMPLE_VARS = ("image_index", "key", "label", "label_name", "view")


def draw_images(labels: np.ndarray, *, n: int | None, per_class: int | None, seed: int) -> np.ndarray:
    """Indices (ascending) of the images drawn: the `n` (default all) of highest priority, or the
    `per_class` of highest priority in every class."""
    order = np.argsort(np.random.default_rng(seed).random(len(labels)), kind="stable")
    if per_class is None:
        return np.sort(order[: len(labels) if n is None else n])
    by_class = np.argsort(labels[order], kind="stable")   # class by class, by priority within a class
    grouped, grouped_labels = order[by_class], labels[order][by_class]
    rank_in_class = np.arange(grouped.size) - np.searchsorted(grouped_labels, grouped_labels)
    return np.sort(grouped[rank_in_class < per_class])


def _check_request(dataset: ImageDataset, n: int | None, per_class: int | None, seed: int, views: int,
                   on_bad_image: str) -> None:
    size = len(dataset.keys)
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(views, int | np.integer) or views < 1:
        raise ValueError(f"views must be an integer >= 1, got {views!r}")
    if n is not None and per_class is not None:
        raise ValueError(f"give either n ({n}) or per_class ({per_class}), not both")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n is not None and n > size:
        raise ValueError(f"n={n} images requested, but the dataset {_name(dataset)} has {size} images")
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        counts = np.bincount(dataset.labels, minlength=len(dataset.class_names))
        for name, count in zip(dataset.class_names, counts):
            if count < per_class:
                raise ValueError(f"per_class={per_class} images requested, but class {name!r} of the dataset "
                                 f"{_name(dataset)} has only {count}")


def _name(dataset: ImageDataset) -> str:
    d = dataset.description
    return f"{d.get('kind')!r}" + (f" at {d['path']!r}" if d.get("path") else "")


def find_bad_images(dataset: ImageDataset, indices: np.ndarray) -> dict[int, BadImageError]:
    """Open every image in `indices` (threads: decoding releases the GIL); the failures by index."""
    def probe(i: int) -> BadImageError | None:
        try:
            dataset.load(i)
        except BadImageError as error:
            return error
        return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(probe, indices.tolist())
        return {int(i): error for i, error in zip(indices, results) if error is not None}


def manifest_fingerprint(samples: xr.Dataset) -> str:
    """The fingerprint (`storage.fingerprint`) of the manifest: the rows, seed, augmentation and dataset
    description (without its path, so a moved dataset keeps its fingerprint)."""
    attrs = samples.attrs
    manifest = {"dataset": {k: v for k, v in attrs["dataset"].items() if k != "path"}, "seed": attrs["seed"],
                "augmentation": attrs.get("augmentation"),
                "rows": {var: samples[var].values.tolist() for var in SAMPLE_VARS}}
    return storage.fingerprint(manifest)


def sample_images(dataset: ImageDataset, *, n: int | None, per_class: int | None, seed: int, views: int = 1,
                  on_bad_image: str = "fail") -> xr.Dataset:
    """Draw the sample (see the module docstring) and return it as a Dataset with dim "sample"."""
    _check_request(dataset, n, per_class, seed, views, on_bad_image)
    drawn = draw_images(dataset.labels, n=n, per_class=per_class, seed=int(seed))
    bad = find_bad_images(dataset, drawn)
    if bad and on_bad_image == "fail":
        raise bad[min(bad)]
    kept = drawn[~np.isin(drawn, list(bad))]
    if not kept.size:
        raise ValueError(f"all {drawn.size} sampled images of the dataset {_name(dataset)} are bad, "
                         f"e.g. {bad[min(bad)]}")
    labels = dataset.labels[kept].astype(np.int64)
    attrs: dict[str, Any] = {
        "dataset": dataset.description, "seed": int(seed), "n": n, "per_class": per_class, "views": int(views),
        "on_bad_image": on_bad_image, "n_drawn": int(drawn.size), "n_images": int(kept.size),
        "skipped": [{"key": e.key, "reason": e.reason, "path": e.source or e.key} for _, e in sorted(bad.items())],
    }
    if views > 1:
        attrs["augmentation"] = ViewAugmentation().describe()
    samples = xr.Dataset(
        {"image_index": ("sample", np.tile(kept.astype(np.int64), views)),
         "key": ("sample", np.array([dataset.keys[i] for i in kept] * views, dtype=str)),
         "label": ("sample", np.tile(labels, views)),
         "label_name": ("sample", np.array([dataset.class_names[c] for c in labels] * views, dtype=str)),
         "view": ("sample", np.repeat(np.arange(views, dtype=np.int64), kept.size))},
        attrs=attrs)
    samples.attrs["fingerprint"] = manifest_fingerprint(samples)
    return samples


def sample_image(dataset: ImageDataset, samples: xr.Dataset, row: int) -> Image.Image:
    """The image of sample row `row`: the plain image for view 0, else its augmented view."""
    index, key = int(samples["image_index"].values[row]), str(samples["key"].values[row])
    if index >= len(dataset.keys) or dataset.keys[index] != key:
        found = dataset.keys[index] if index < len(dataset.keys) else "nothing"
        raise ValueError(f"sample row {row}: the samples record image {index} as {key!r}, but the dataset "
                         f"{_name(dataset)} has {found!r} there: the dataset changed since sampling")
    image = dataset.load(index)
    view = int(samples["view"].values[row])
    if view == 0:
        return image
    return ViewAugmentation(**samples.attrs["augmentation"])(image, (samples.attrs["seed"], index, view))
