"""Dataset kinds on tiny locally made data: index (keys, labels, classes), pixels, errors."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.data import BadImageError, ImageDataset, digit_images, export_digits, open_dataset, split_indices


def pixels(seed: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def assert_dataset(dataset: ImageDataset, keys: list[str], labels: list[int], class_names: list[str]) -> None:
    assert isinstance(dataset, ImageDataset)
    assert dataset.keys == keys and dataset.class_names == class_names
    assert dataset.labels.dtype == np.int64 and dataset.labels.tolist() == labels
    json.dumps(dataset.description)
    assert dataset.description["n_images"] == len(keys) and dataset.description["n_classes"] == len(class_names)


# imagefolder ----------------------------------------------------------------------------------

def test_imagefolder_index_and_pixels(tmp_path):
    root = tmp_path / "val"
    write(root / "dog" / "b.png", encoded(pixels(0)))
    write(root / "dog" / "nested" / "a.PNG", encoded(pixels(1)))
    write(root / "cat" / "z.png", encoded(pixels(2)))
    write(root / "cat" / "notes.txt", b"not an image, ignored by extension")
    write(root / "cat" / ".hidden.png", b"ignored")
    write(root / ".cache" / "x.png", encoded(pixels(3)))
    dataset = open_dataset("imagefolder", str(tmp_path), split="val")
    assert_dataset(dataset, ["cat/z.png", "dog/b.png", "dog/nested/a.PNG"], [0, 1, 1], ["cat", "dog"])
    assert dataset.description["split"] == "val" and dataset.description["path"] == str(tmp_path.resolve())
    for i, seed in enumerate([2, 0, 1]):
        image = dataset.load(i)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels(seed))


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_dataset("imagefolder", str(tmp_path / "nowhere"))
    write(tmp_path / "a" / "1.png", encoded(pixels(0)))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="'empty_class' holds no image files"):
        open_dataset("imagefolder", str(tmp_path))


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "TIFF"),
                                       ("RGB", "JPEG")])  # I;16, I, F: tests/data/test_high_bit_depth.py
def test_other_modes_are_converted_to_rgb(tmp_path, mode, fmt):
    source = pixels(4, (8, 8))
    write(tmp_path / "c" / f"image.{fmt.lower()}", encoded(source, fmt, mode))
    image = open_dataset("imagefolder", str(tmp_path)).load(0)
    expected = Image.fromarray(source).convert(mode).convert("RGB")
    assert image.mode == "RGB" and image.size == (8, 8)
    if fmt != "JPEG":  # lossless formats: exactly PIL's conversion
        assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("content, reason", [(encoded(pixels(5, (64, 64)))[:200], "truncated"),
                                             (b"hello, not a png", "cannot identify")])
def test_bad_images_raise_with_the_file_path(tmp_path, content, reason):
    path = write(tmp_path / "c" / "bad.png", content)
    dataset = open_dataset("imagefolder", str(tmp_path))
    with pytest.raises(BadImageError, match=reason) as caught:
        dataset.load(0)
    assert caught.value.key == "c/bad.png" and str(path) in str(caught.value)


def test_vanished_file_is_a_bad_image(tmp_path):
    path = write(tmp_path / "c" / "gone.png", encoded(pixels(0)))
    dataset = open_dataset("imagefolder", str(tmp_path))
    path.unlink()
    with pytest.raises(BadImageError, match="file not found"):
        dataset.load(0)


# digits ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return export_digits(tmp_path_factory.mktemp("d") / "digits", size=12)


def test_digits_export_matches_the_zoo_pixels(digits_dir):
    dataset = open_dataset("digits", str(digits_dir), size=12)
    rgb, labels = digit_images(12)
    assert len(dataset.keys) == len(labels) == 1797 and dataset.class_names == [str(d) for d in range(10)]
    for i in (0, 500, 1796):
        index = int(Path(dataset.keys[i]).stem)
        assert dataset.labels[i] == labels[index] and dataset.keys[i].startswith(f"{labels[index]}/")
        assert np.array_equal(np.asarray(dataset.load(i)), rgb[index])
    heldout = open_dataset("digits", str(digits_dir), split="heldout", size=12)
    assert sorted(int(Path(k).stem) for k in heldout.keys) == split_indices(1797, "heldout").tolist()


def test_digits_export_is_idempotent(digits_dir):
    before = {p: p.stat().st_mtime_ns for p in digits_dir.rglob("*")}
    assert export_digits(digits_dir, size=12) == digits_dir
    assert {p: p.stat().st_mtime_ns for p in digits_dir.rglob("*")} == before
    assert [p.name for p in digits_dir.parent.iterdir()] == ["digits"]  # no staging folder left
    with pytest.raises(ValueError, match="exported at size 12, not 32"):
        export_digits(digits_dir, size=32)


def test_digits_export_is_atomic(tmp_path, monkeypatch):
    saved = []

    def failing_save(self, path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 100:
            raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_digits(tmp_path / "digits", size=8)
    assert list(tmp_path.iterdir()) == []  # neither a partial export nor the staging folder


def test_digits_refuses_a_foreign_folder(tmp_path):
    write(tmp_path / "digits" / "mine.txt", b"x")
    with pytest.raises(ValueError, match="not a digits export"):
        open_dataset("digits", str(tmp_path / "digits"))


# synthetic ------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_labelled():
    a = open_dataset("synthetic", None, n=12, size=20, n_classes=3, seed=7)
    assert_dataset(a, [f"{i:08d}" for i in range(12)], [i % 3 for i in range(12)], ["class_0", "class_1", "class_2"])
    b = open_dataset("synthetic", None, n=12, size=20, n_classes=3, seed=7)
    other = open_dataset("synthetic", None, n=12, size=20, n_classes=3, seed=8)
    first = np.asarray(a.load(5))
    assert first.shape == (20, 20, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(b.load(5)))
    assert not np.array_equal(first, np.asarray(other.load(5)))
    assert not np.array_equal(first, np.asarray(a.load(4)))


def test_synthetic_rejects_bad_options():
    with pytest.raises(ValueError, match="'size' must be an integer >= 1"):
        open_dataset("synthetic", None, size=0)
    with pytest.raises(ValueError, match="no path or split"):
        open_dataset("synthetic", "/data")


# webdataset -----------------------------------------------------------------------------------

def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_with_cls_and_json_labels(tmp_path):
    write_tar(tmp_path / "train" / "shard-000001.tar", {
        "s2.jpg.json": b"{}",  # not a label file: extension 'jpg.json'
        "s2.png": encoded(pixels(2)), "s2.json": json.dumps({"label": 7}).encode(),
    })
    write_tar(tmp_path / "train" / "shard-000000.tar", {
        "d/s0.png": encoded(pixels(0)), "d/s0.cls": b"7\n",
        "s1.seg.png": b"ignored extension", "s1.png": encoded(pixels(1)), "s1.cls": b"3",
    })
    dataset = open_dataset("webdataset", str(tmp_path), split="train")
    assert_dataset(dataset, ["shard-000000.tar/d/s0", "shard-000000.tar/s1", "shard-000001.tar/s2"],
                   [1, 0, 1], ["3", "7"])
    for i in range(3):
        assert np.array_equal(np.asarray(dataset.load(i)), pixels(i))
    single = open_dataset("webdataset", str(tmp_path / "train" / "shard-000001.tar"))
    assert single.keys == ["shard-000001.tar/s2"]


def test_webdataset_bad_image_and_index_errors(tmp_path):
    shard = write_tar(tmp_path / "a.tar", {"x.png": encoded(pixels(0, (40, 40)))[:100], "x.cls": b"0"})
    with pytest.raises(BadImageError, match="truncated") as caught:
        open_dataset("webdataset", str(tmp_path)).load(0)
    assert f"{shard}:x.png" in str(caught.value)
    write_tar(tmp_path / "b.tar", {"y.png": encoded(pixels(0))})
    with pytest.raises(ValueError, match=r"sample 'y': no label \(y.cls or y.json\)"):
        open_dataset("webdataset", str(tmp_path / "b.tar"))
    write_tar(tmp_path / "c.tar", {"z.json": b'{"cls": 1}', "z.png": encoded(pixels(0))})
    with pytest.raises(ValueError, match="no field 'label'"):
        open_dataset("webdataset", str(tmp_path / "c.tar"))
    assert open_dataset("webdataset", str(tmp_path / "c.tar"), label_field="cls").labels.tolist() == [0]
    with tarfile.open(tmp_path / "d.tar", "w:gz") as tar:
        tar.add(shard, "inner.tar")
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        open_dataset("webdataset", str(tmp_path / "d.tar"))


# cifar10 --------------------------------------------------------------------------------------

def write_cifar(folder: Path, batches: dict[str, tuple[np.ndarray, list[int]]]) -> None:
    """Batches in torchvision's cifar-10-batches-py layout: pickled dicts with bytes keys."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {b"label_names": [b"airplane", b"automobile", b"bird"], b"num_cases_per_batch": 4}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    for name, (images, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                 b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
              for name in ["test_batch", *(f"data_batch_{i}" for i in range(1, 6))]}
    write_cifar(tmp_path / "cifar-10-batches-py",
                {name: (array, [i % 3 for i in range(3)]) for name, array in images.items()})
    test = open_dataset("cifar10", str(tmp_path))
    assert_dataset(test, ["test_batch/00000", "test_batch/00001", "test_batch/00002"], [0, 1, 2],
                   ["airplane", "automobile", "bird"])
    assert np.array_equal(np.asarray(test.load(2)), images["test_batch"][2])
    train = open_dataset("cifar10", str(tmp_path / "cifar-10-batches-py"), split="train")
    assert len(train.keys) == 15 and train.keys[3] == "data_batch_2/00000"
    assert np.array_equal(np.asarray(train.load(14)), images["data_batch_5"][2])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        open_dataset("cifar10", str(tmp_path), split="val")


def test_cifar10_never_unpickles_objects(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_cifar(tmp_path, {})
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"data": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load posix.system"):
        open_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


def test_cifar10_reports_missing_batches(tmp_path):
    write_cifar(tmp_path, {"test_batch": (np.zeros((1, 32, 32, 3), np.uint8), [0])})
    with pytest.raises(FileNotFoundError, match="lacks data_batch_1, data_batch_2"):
        open_dataset("cifar10", str(tmp_path), split="train")


# hf -------------------------------------------------------------------------------------------

def test_hf_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["no", "yes"]),
                                  "tag": datasets.Value("string")})
    rows = {"img": [Image.fromarray(pixels(i)) for i in range(3)], "y": [1, 0, 1], "tag": ["b", "a", "b"]}
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "dd"))
    dataset = open_dataset("hf", str(tmp_path / "dd"), split="train", image_column="img", label_column="y")
    assert_dataset(dataset, ["00000000", "00000001", "00000002"], [1, 0, 1], ["no", "yes"])
    assert np.array_equal(np.asarray(dataset.load(1)), pixels(1))
    by_tag = open_dataset("hf", str(tmp_path / "dd"), split="train", image_column="img", label_column="tag")
    assert by_tag.labels.tolist() == [1, 0, 1] and by_tag.class_names == ["a", "b"]
    with pytest.raises(ValueError, match="choose a split.*splits: train, test"):
        open_dataset("hf", str(tmp_path / "dd"), image_column="img", label_column="y")
    with pytest.raises(ValueError, match="image_column 'image' is not a column"):
        open_dataset("hf", str(tmp_path / "dd"), split="test")
    with pytest.raises(ValueError, match="'tag' is Value, not an Image"):
        open_dataset("hf", str(tmp_path / "dd"), split="test", image_column="tag", label_column="y")


def test_hf_bad_image_bytes(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": b"garbage", "path": "x.png"}], "label": [4]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "d"))
    dataset = open_dataset("hf", str(tmp_path / "d"))
    assert dataset.class_names == ["4"]
    with pytest.raises(BadImageError, match="'00000000' \\(x.png\\): UnidentifiedImageError"):
        dataset.load(0)


# open_dataset ---------------------------------------------------------------------------------

def test_open_dataset_errors_name_kind_and_options(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind 'lmdb'; kinds: imagefolder, digits"):
        open_dataset("lmdb", str(tmp_path))
    with pytest.raises(ValueError, match="'synthetic': unknown option\\(s\\) image_size; options: n, size"):
        open_dataset("synthetic", None, image_size=32)
    with pytest.raises(ValueError, match="dataset kind 'cifar10' needs a path"):
        open_dataset("cifar10", None)
