"""Building models: seeded weights, offline pretrained weights, fingerprints, preprocessing."""

from __future__ import annotations

import os
import shutil

import huggingface_hub.constants as hf_constants
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import resolve_data_config
from torchvision.transforms.functional import to_tensor

from tasks.extract import (
    ModelError,
    build_model,
    data_config,
    describe_preprocessing,
    input_size,
    model_fingerprint,
    preprocessing,
)

ARCH, KW = "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(ARCH, KW, "random:1")
    assert torch.equal(torch.rand(3), expected)
    assert same_weights(a, build_model(ARCH, KW, "random:1"))
    assert not same_weights(a, build_model(ARCH, KW, "random:2"))
    assert not a.training


@pytest.mark.parametrize("weights, message", [("random:x", "integer seed"), ("nope.pth", "existing checkpoint file")])
def test_bad_weights_spec(weights, message):
    with pytest.raises(ModelError, match=message):
        build_model(ARCH, KW, weights)


def test_unknown_arch_is_named():
    with pytest.raises(ModelError, match="arch 'vit_nonexistent'"):
        build_model("vit_nonexistent", {}, "random:0")


def test_timm_weights_not_cached_name_tag_and_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # build_model must force offline itself
    with pytest.raises(ModelError) as info:
        build_model("vit_base_patch16_224.mae", {}, "timm")
    message = str(info.value)
    assert "vit_base_patch16_224.mae" in message and str(tmp_path / "hub") in message
    assert "HF_HUB_OFFLINE" not in os.environ and not hf_constants.HF_HUB_OFFLINE  # offline mode restored


def test_timm_weights_load_from_local_cache(monkeypatch, tmp_path):
    """A pretrained tag served from a local cache dir (populated here, offline) loads those weights."""
    src = build_model("resnet18", {}, "random:5")
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(src.state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model = build_model("resnet18.a1_in1k", {}, "timm")
    assert same_weights(model, src)


def test_fingerprint_hashes_file_content(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"x": torch.ones(2)}, a)
    shutil.copy(a, b)
    assert model_fingerprint(ARCH, KW, str(a)) == model_fingerprint(ARCH, KW, str(b))
    torch.save({"x": torch.zeros(2)}, b)
    assert model_fingerprint(ARCH, KW, str(a)) != model_fingerprint(ARCH, KW, str(b))
    assert model_fingerprint(ARCH, KW, str(a)) != model_fingerprint(ARCH, KW, str(a), checkpoint_format="mae")
    assert model_fingerprint(ARCH, KW, "random:0") != model_fingerprint(ARCH, KW | {"depth": 2}, "random:0")
    assert model_fingerprint(ARCH, KW, "random:0") == model_fingerprint(ARCH, dict(reversed(KW.items())), "random:0")


def test_preprocessing_from_model_config_and_overrides():
    model = build_model(ARCH, KW, "random:0")
    assert input_size(model) == (3, 32, 32)
    image = Image.new("RGB", (50, 40), (255, 0, 0))
    x = preprocessing(model)(image)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0], torch.ones(32, 32))  # (1 - 0.5) / 0.5 with the vit mean/std
    y = preprocessing(model, {"mean": (0, 0, 0), "std": (1, 1, 1)})(image)
    torch.testing.assert_close(y[0], torch.ones(32, 32))
    torch.testing.assert_close(y[1], torch.zeros(32, 32))
    assert preprocessing(model, {"input_size": 16})(image).shape == (3, 16, 16)
    with pytest.raises(ModelError, match=r"unknown keys \['size'\]"):
        preprocessing(model, {"size": 3})


class Net(torch.nn.Module):
    """A model without a timm data config."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_timm_models_keep_timms_data_config_however_built():
    expected = resolve_data_config(model=build_model("resnet18", {}, "random:0"))
    for arch in ("resnet18", "timm.models.resnet:resnet18"):
        config = data_config(build_model(arch, {}, "random:0"))
        assert config == expected and expected["input_size"] == (3, 224, 224) and expected["crop_pct"] < 1
        assert describe_preprocessing(config) == ("224x224 px bicubic resize, center crop 0.95, "
                                                  "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)")


def test_a_model_without_timm_data_config_takes_the_images_as_they_are():
    model, image = Net(), Image.new("RGB", (50, 40), (255, 0, 0))
    config = data_config(model, None, (40, 50))
    assert config["input_size"] == (3, 40, 50) and config["resize"] is False
    assert describe_preprocessing(config) == "40x50 px as the images are (no resize or crop), values in [0, 1]"
    torch.testing.assert_close(preprocessing(model, None, (40, 50))(image), to_tensor(image), rtol=0, atol=0)
    with pytest.raises(ModelError, match="must share one size"):
        preprocessing(model, None, (32, 32))(image)
    with pytest.raises(ModelError, match=r"set `preprocessing: \{input_size: N\}`"):
        data_config(model)  # no image size to take
    assert preprocessing(model, {"input_size": 16})(image).shape == (3, 16, 16)  # asked for: resized
    assert "resize" not in data_config(model, {"input_size": 16})
    normalised = preprocessing(model, {"mean": (0.5,) * 3, "std": (0.5,) * 3}, (40, 50))(image)
    torch.testing.assert_close(normalised[0], torch.ones(40, 50))
