"""Stage 1, sampling: image datasets of every kind (`open_dataset`), seeded class-balanced sampling with
augmentation views (`sample_images`), and one sampled image as the models see it (`sample_image`)."""

from tasks.data.augment import ViewAugmentation
from tasks.data.datasets import KINDS, open_dataset
from tasks.data.kinds import (
                              HELDOUT_EVERY,
                              BadImageError,
                              ImageDataset,
                              Split,
                              digit_images,
                              export_digits,
                              split_indices,
)
from tasks.data.sampling import (
                              ON_BAD_IMAGE,
                              SAMPLE_VARS,
                              draw_images,
                              manifest_fingerprint,
                              sample_image,
                              sample_images,
)

__all__ = [
    "HELDOUT_EVERY", "KINDS", "ON_BAD_IMAGE", "SAMPLE_VARS", "BadImageError", "ImageDataset", "Split",
    "ViewAugmentation", "digit_images", "draw_images", "export_digits", "manifest_fingerprint", "open_dataset",
    "sample_image", "sample_images", "split_indices",
]
