"""Dataset kinds, one module each; every opener returns an `ImageDataset` (`base`)."""

from tasks.data.kinds.archives import open_cifar10, open_webdataset
from tasks.data.kinds.base import IMAGE_EXTENSIONS, BadImageError, ImageDataset
from tasks.data.kinds.digits import HELDOUT_EVERY, Split, digit_images, export_digits, open_digits, split_indices
from tasks.data.kinds.folders import open_imagefolder
from tasks.data.kinds.hf import open_hf
from tasks.data.kinds.synthetic import open_synthetic

__all__ = [
    "HELDOUT_EVERY", "IMAGE_EXTENSIONS", "BadImageError", "ImageDataset", "Split", "digit_images", "export_digits",
    "open_cifar10", "open_digits", "open_hf", "open_imagefolder", "open_synthetic", "open_webdataset", "split_indices",
]
