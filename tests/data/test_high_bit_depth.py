"""High-bit-depth and float grayscale images are scaled to 8 bits by their actual range, not clipped."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.data.kinds.base import decode_image


def encoded(values: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, values, fmt", [
    ("I;16", np.linspace(1000, 60000, 32 * 32).reshape(32, 32).astype(np.uint16), "PNG"),
    ("I", np.linspace(-70000, 90000, 32 * 32).reshape(32, 32).astype(np.int32), "TIFF"),
    ("F", np.linspace(-0.5, 0.25, 32 * 32).reshape(32, 32).astype(np.float32), "TIFF"),
])
def test_high_bit_depth_images_are_scaled_by_their_range(mode, values, fmt):
    data = encoded(values, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    rgb = np.asarray(decode_image(data, "k"))
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    expected = np.rint((values - values.min()) / (values.max() - values.min()) * 255.0)
    np.testing.assert_array_equal(rgb[..., 0], expected)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    assert (rgb == 255).mean() < 0.01  # PIL's own conversion clips almost every pixel of the I;16 image


def test_a_constant_high_bit_depth_image_is_black():
    rgb = np.asarray(decode_image(encoded(np.full((8, 8), 40000, dtype=np.uint16), "PNG"), "k"))
    assert not rgb.any()
