"""Dataset kinds stored in archives: `webdataset` (tar shards) and `cifar10` (pickled batches).

- `webdataset`: `path` is one uncompressed `.tar` shard or a folder of them (`path/split` when a
  split is given; shards in sorted name order). Members `<key>.<ext>` group into samples by key
  (the member name up to the first dot of its base name); a sample holds one image
  (`image_ext`, default the first of jpg/jpeg/png/webp/...) and a label: `<key>.cls` (text) or
  `<key>.json` (field `label_field`). Distinct label values, sorted, are the classes. Dataset keys
  are `<shard file name>/<sample key>`, in shard order then tar order. Images are read by offset,
  without webdataset or open handles.
- `cifar10`: torchvision's `cifar-10-batches-py` folder (or its parent): `data_batch_1..5`
  (split `train`) or `test_batch` (split `test`, the default), class names from `batches.meta`.
  The pickles are read with an unpickler that only rebuilds numpy arrays, never other objects.
  Keys are `<batch file>/<row>`.
"""

from __future__ import annotations

import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.data.kinds.base import IMAGE_EXTENSIONS, check_index, decode_image, describe, index_labels

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_NUMPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


@dataclass(frozen=True)
class _Member:
    shard: Path
    name: str
    offset: int
    size: int


class TarImages:
    """Images stored as members of tar shards."""

    def __init__(self, keys: list[str], members: list[_Member], labels: np.ndarray, class_names: list[str],
                 description: dict[str, Any]) -> None:
        check_index("webdataset", description["path"], keys, labels, class_names)
        self.keys, self.members, self.labels = keys, members, labels
        self.class_names, self.description = class_names, description

    def load(self, i: int) -> Image.Image:
        member = self.members[i]
        with member.shard.open("rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
        return decode_image(data, self.keys[i], f"{member.shard}:{member.name}")


def _split_name(name: str) -> tuple[str, str]:
    """'dir/abc.seg.jpg' -> ('dir/abc', 'seg.jpg')."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label(shard: Path, key: str, files: dict[str, Any], label_field: str) -> Any:
    where = f"webdataset shard {str(shard)!r}, sample {key!r}"
    if "cls" in files:
        text = files["cls"].strip()
        return int(text) if text.lstrip("-").isdigit() else text
    if "json" in files:
        record = json.loads(files["json"])
        if label_field not in record:
            raise ValueError(f"{where}: {key}.json has no field {label_field!r} (fields: {sorted(record)})")
        return record[label_field]
    raise ValueError(f"{where}: no label ({key}.cls or {key}.json)")


def _read_shard(shard: Path, image_ext: str | None, label_field: str) -> list[tuple[str, _Member, Any]]:
    """(sample key, image member, label value) of every sample of one shard, in tar order."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                files = samples.setdefault(key, {})
                if ext in files:
                    raise ValueError(f"webdataset shard {str(shard)!r}: member {info.name!r} appears twice")
                if ext in ("cls", "json"):
                    files[ext] = tar.extractfile(info).read().decode()
                else:
                    files[ext] = _Member(shard, info.name, info.offset_data, info.size)
    except tarfile.ReadError as error:
        raise ValueError(f"webdataset shard {str(shard)!r} is not an uncompressed tar file: {error}") from None
    wanted = (image_ext.lower().lstrip("."),) if image_ext else tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    out = []
    for key, files in samples.items():
        ext = next((e for e in wanted if e in files), None)
        if ext is None:
            raise ValueError(f"webdataset shard {str(shard)!r}, sample {key!r}: no image member "
                             f"(looked for .{', .'.join(wanted)}; found {', '.join(sorted(files))})")
        out.append((key, files[ext], _label(shard, key, files, label_field)))
    return out


def open_webdataset(path: str, split: str | None = None, image_ext: str | None = None,
                    label_field: str = "label") -> TarImages:
    """Tar shards at `path` (a .tar file or a folder of them; `path/split` with a split)."""
    location = Path(path) / split if split else Path(path)
    shards = [location] if location.is_file() else sorted(location.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"webdataset: no .tar shards at {str(location)!r}")
    rows = [(shard, *row) for shard in shards for row in _read_shard(shard, image_ext, label_field)]
    labels, class_names = index_labels([label for *_, label in rows])
    keys = [f"{shard.name}/{key}" for shard, key, _, _ in rows]
    return TarImages(keys, [member for _, _, member, _ in rows], labels, class_names,
                     describe("webdataset", path, split, keys, class_names, n_shards=len(shards),
                              image_ext=image_ext, label_field=label_field))


class _NumpyUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle (a plain dict of arrays and lists) with str keys, loaded safely."""
    try:
        with path.open("rb") as f:
            content = _NumpyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"cifar10: cannot read {str(path)!r}: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"cifar10: {str(path)!r} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


class ArrayImages:
    """Images held as one uint8 array (n, height, width, 3)."""

    def __init__(self, pixels: np.ndarray, keys: list[str], labels: np.ndarray, class_names: list[str],
                 description: dict[str, Any]) -> None:
        check_index(description["kind"], description["path"], keys, labels, class_names)
        self.pixels, self.keys, self.labels = pixels, keys, labels
        self.class_names, self.description = class_names, description

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i], "RGB")


def open_cifar10(path: str, split: str | None = None) -> ArrayImages:
    """CIFAR-10 from torchvision's python batches; split `test` (default) or `train`."""
    split = split or "test"
    if split not in CIFAR_SPLITS:
        raise ValueError(f"cifar10: unknown split {split!r}; splits: {', '.join(CIFAR_SPLITS)}")
    folder = Path(path) / CIFAR_FOLDER if (Path(path) / CIFAR_FOLDER).is_dir() else Path(path)
    missing = [name for name in ["batches.meta", *CIFAR_SPLITS[split]] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10: {str(folder)!r} lacks {', '.join(missing)}")
    class_names = [n.decode() if isinstance(n, bytes) else str(n)
                   for n in read_cifar_pickle(folder / "batches.meta")["label_names"]]
    pixels, labels, keys = [], [], []
    for name in CIFAR_SPLITS[split]:
        batch = read_cifar_pickle(folder / name)
        data = np.asarray(batch.get("data"))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"cifar10: {str(folder / name)!r}: 'data' must be uint8 (n, 3072), "
                             f"got {data.dtype} {data.shape}")
        if len(batch.get("labels", ())) != len(data):
            raise ValueError(f"cifar10: {str(folder / name)!r}: {len(data)} images but "
                             f"{len(batch.get('labels', ()))} labels")
        pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(batch["labels"])
        keys += [f"{name}/{row:05d}" for row in range(len(data))]
    return ArrayImages(np.ascontiguousarray(np.concatenate(pixels)), keys, np.asarray(labels, dtype=np.int64),
                       class_names, describe("cifar10", path, split, keys, class_names))
