"""A model without a timm data config takes the images as they are, end to end: extraction feeds it the
images at their own size with values in [0, 1] and records that preprocessing."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.functional import to_tensor

import storage
from tasks.data import open_dataset, sample_image, sample_images
from tasks.extract import ExtractOptions, ModelSpec, extract_model, register_module


def test_extraction_feeds_the_images_as_they_are(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    dataset = open_dataset("synthetic", None, n=12, size=16, n_classes=2)
    samples = sample_images(dataset, n=12, per_class=None, seed=0)
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, samples)
    spec = ModelSpec("net", register_module(net), "module", ["0"], "flatten")
    summary = extract_model(root, spec, dataset=dataset, samples=samples,
                            options=ExtractOptions(batch_size=4, device="cpu", shard_size=8))
    assert summary["preprocessing"]["input_size"] == (3, 16, 16) and summary["preprocessing"]["resize"] is False
    assert storage.model_attrs(root, "net")["preprocessing"]["resize"] is False
    with torch.no_grad():
        expected = torch.stack([net[0](to_tensor(sample_image(dataset, samples, row))).flatten() for row in range(12)])
    stored = np.asarray(storage.activation_arrays(root, "net")["0/output"][:])
    np.testing.assert_allclose(stored, expected.numpy(), rtol=1e-5, atol=1e-6)
