"""The probe protocol's data side: the train/test and validation splits by image, the standardisation
(in memory or streamed row block by row block) and the principal basis a probe is fit in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

VALIDATION_FRACTION = 0.2


def split_by_image(image_index: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over samples: a seeded, class-stratified choice of whole images.

    Every class with at least 2 images puts round(test_fraction * n) of them (at least 1, at most n-1)
    in the test set; all views of an image share its side."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    image_index, labels = np.asarray(image_index), np.asarray(labels)
    images, first = np.unique(image_index, return_index=True)
    image_label = labels[first]
    if np.unique(np.stack([image_index, labels]), axis=1).shape[1] != images.size:
        raise ValueError("samples of one image carry different labels")
    rng = np.random.default_rng(seed)
    test_images = []
    for label in np.unique(image_label):
        members = rng.permutation(images[image_label == label])
        if members.size >= 2:
            k = min(max(int(round(test_fraction * members.size)), 1), members.size - 1)
            test_images.append(members[:k])
    mask = np.isin(image_index, np.concatenate(test_images) if test_images else [])
    if not mask.any() or mask.all():
        raise ValueError(f"cannot split {images.size} images into train and test by class; sample more images")
    return mask


def validation_mask(image_index: np.ndarray, labels: np.ndarray, test_mask: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask over samples: the validation images, a class-stratified `VALIDATION_FRACTION` of the
    training images (never a test row)."""
    train = np.flatnonzero(~test_mask)
    out = np.zeros(test_mask.shape, dtype=bool)
    out[train] = split_by_image(np.asarray(image_index)[train], np.asarray(labels)[train], VALIDATION_FRACTION,
                                seed + 1)
    return out


def row_blocks(n: int, step: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks of `step` rows."""
    for start in range(0, n, step):
        yield start, min(start + step, n)


def standardiser(mean: np.ndarray, var: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) for z = (x - mean) / std. `var`: the training variance computed from centred
    (or shifted) values; `scale`: the features' magnitude (max |x|). A feature is constant (std = inf,
    so z = 0) only when its std is at the rounding level of float64 at that magnitude."""
    std = np.sqrt(np.maximum(var, 0.0))
    return mean, np.where(std > 16 * np.finfo(np.float64).eps * scale, std, np.inf)


def standardise(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """`x` (n, d) standardised with its training rows' mean and std: a float64 copy."""
    z = np.array(x, dtype=np.float64)
    rows = z[train]
    mean = rows.mean(0)
    scale = np.maximum(rows.max(0), -rows.min(0))
    rows -= mean
    mean, std = standardiser(mean, np.einsum("ij,ij->j", rows, rows) / len(rows), scale)
    z -= mean
    z /= std
    return z


def streamed_stats(array: Any, rows: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance (from values shifted by the first block's mean: no cancellation) and max |x| of the
    features over the masked rows, in one pass of row blocks (`standardiser`'s arguments)."""
    n, d = array.shape
    shift, total, total_sq, scale, count = None, np.zeros(d), np.zeros(d), np.zeros(d), 0
    for a, b in row_blocks(n, step):
        block = np.asarray(array[a:b], dtype=np.float64)[rows[a:b]]
        if block.size == 0:
            continue
        shift = block.mean(0) if shift is None else shift
        total += (block - shift).sum(0)
        total_sq += ((block - shift) ** 2).sum(0)
        scale = np.maximum(scale, np.abs(block).max(0))
        count += block.shape[0]
    offset = total / count
    return shift + offset, total_sq / count - offset ** 2, scale


def principal_basis(z: np.ndarray, train: np.ndarray) -> np.ndarray:
    """`z` (n, d) in the principal axes of its training rows, (n, r): an orthonormal basis in which their Gram
    is diagonal (so a diagonal preconditioner of the fit is close to its Hessian), of their span (r <=
    n_train), less the axes of numerically zero training variance (at most max(n_train, d) * eps of the
    largest). Exact for the probe: an L2-penalised linear model's optimal weights lie in that span (for the
    validation path's subset of the rows too), an orthonormal basis keeps the penalty and the gradient's
    norm, and logits z V (V^T W) = z W.

    With fewer training rows R than features (wide sites), the axes come from the training rows' Gram:
    R R^T = U L U^T gives V = R^T U L^(-1/2), so z V = (z R^T) U L^(-1/2): one n x d x n_train product and
    an n_train-sized eigensolver, instead of a QR of the d x n_train matrix and two products with it."""
    rows = z[train]
    tol = max(rows.shape) * np.finfo(np.float64).eps
    if rows.shape[0] < rows.shape[1]:
        products = z @ rows.T
        values, axes = np.linalg.eigh(products[train])
        keep = values > max(tol * values[-1], 0.0)
        if not keep.any():                 # no training variance at all (a constant site): one zero axis
            return np.zeros((z.shape[0], 1))
        return products @ (axes[:, keep] / np.sqrt(values[keep]))
    values, axes = np.linalg.eigh(rows.T @ rows)
    keep = values > tol * values[-1]
    keep[-1] = True
    return z @ axes[:, keep]
