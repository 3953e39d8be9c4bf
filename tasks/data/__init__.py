"""Stage 1, sampling: image datasets of every kind (`open_dataset`), seeded class-balanced sampling with
augmentation views (`sample_images`), and one sampled image as the models see it (`sample_image`).
Names are imported on first use (`storage.lazy`): the kind names (`KINDS`) cost no image library."""

from storage.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "augment": ("ViewAugmentation",),
    "datasets": ("KINDS", "open_dataset"),
    "kinds": ("HELDOUT_EVERY", "BadImageError", "ImageDataset", "Split", "digit_images", "export_digits",
              "split_indices"),
    "sampling": ("ON_BAD_IMAGE", "SAMPLE_VARS", "draw_images", "manifest_fingerprint", "sample_image",
                 "sample_images"),
})
