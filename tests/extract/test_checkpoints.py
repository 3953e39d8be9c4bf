"""Checkpoint remapping: small state dicts written in each source format load exactly."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tasks.extract import CheckpointError, build_model, detect_format, load_checkpoint, read_checkpoint

VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3})
RESNET = ("resnet18", {"layers": (1, 1, 1, 1)})


def source(arch: tuple[str, dict], seed: int = 7) -> dict[str, torch.Tensor]:
    return build_model(arch[0], arch[1], f"random:{seed}").state_dict()


def backbone(state: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(head + ".")}


def assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def load(arch: tuple[str, dict], path, fmt: str = "auto") -> torch.nn.Module:
    return build_model(arch[0], arch[1], str(path), checkpoint_format=fmt)


def test_mae(tmp_path):
    src = backbone(source(VIT), "head")
    torch.save({"model": src | {"mask_token": torch.zeros(1, 1, 48), "decoder_embed.weight": torch.ones(4, 48)}},
               tmp_path / "mae.pth")
    model = load(VIT, tmp_path / "mae.pth")
    assert_loaded(model, src)
    assert model.ckaflow_load["format"] == "mae" and model.ckaflow_load["head_reset"]
    assert model.ckaflow_load["dropped"] == ["decoder_embed.weight", "mask_token"]
    assert isinstance(model.head, torch.nn.Identity) and model.num_classes == 0


@pytest.mark.parametrize("layout", ["release", "flat"])
def test_moco_v3(tmp_path, layout):
    """The release layout (`state_dict` entry of a .pth.tar) and the zoo's (the same keys at the top
    level of a safetensors file) are both detected by `auto`."""
    src = backbone(source(VIT), "head")
    state = {f"module.base_encoder.{k}": v.contiguous() for k, v in src.items()}
    state |= {f"module.momentum_encoder.{k}": v + 1 for k, v in src.items()}
    state |= {"module.base_encoder.head.0.weight": torch.ones(8, 48), "module.predictor.0.weight": torch.ones(8, 8)}
    if layout == "release":
        path = tmp_path / "moco.pth.tar"
        torch.save({"state_dict": state, "epoch": 300, "arch": "vit_small"}, path)
    else:
        path = tmp_path / "moco.safetensors"
        save_file(state, str(path))
    model = load(VIT, path)
    assert_loaded(model, src)
    report = model.ckaflow_load
    assert report["format"] == "moco_v3" and report["head_reset"] and not report["missing"]
    assert "module.predictor.0.weight" in report["dropped"] and "head.0.weight" in report["dropped"]
    assert "module.momentum_encoder.cls_token" in report["dropped"]


@pytest.mark.parametrize("part", ["teacher", "student"])
def test_dino_teacher_default_and_student(tmp_path, part):
    teacher, student = backbone(source(VIT, 1), "head"), backbone(source(VIT, 2), "head")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.items()} | {"head.last_layer.weight": torch.ones(3, 3)},
                "student": {f"module.backbone.{k}": v for k, v in student.items()},
                "epoch": 100, "args": argparse.Namespace(arch="vit_small")}, tmp_path / "dino.pth")
    model = load(VIT, tmp_path / "dino.pth", "dino" if part == "teacher" else "dino_student")
    assert_loaded(model, teacher if part == "teacher" else student)
    assert model.ckaflow_load["head_reset"]


def test_deit_keeps_the_head(tmp_path):
    src = source(VIT)
    torch.save({"model": src, "epoch": 1}, tmp_path / "deit.pth")
    model = load(VIT, tmp_path / "deit.pth")
    assert_loaded(model, src)
    assert model.ckaflow_load["format"] == "deit" and not model.ckaflow_load["head_reset"]


def test_torchvision_resnet(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    src = tv.state_dict()
    torch.save(src, tmp_path / "tv.pth")
    model = load(RESNET, tmp_path / "tv.pth", "torchvision_resnet")
    assert_loaded(model, src)
    image = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(image), tv.eval()(image))  # same function, not only same tensors


@pytest.mark.parametrize("style", ["spijkervet", "sthalles", "ddp"])
def test_simclr_resnet(tmp_path, style):
    src = backbone(source(RESNET), "fc")
    if style == "spijkervet":
        state = {f"encoder.{k}": v for k, v in src.items()} | {"projector.0.weight": torch.ones(4, 512)}
    elif style == "sthalles":
        state = {f"backbone.{k}": v for k, v in src.items()} | {"backbone.fc.0.weight": torch.ones(4, 512),
                                                                 "backbone.fc.2.weight": torch.ones(2, 4)}
    else:
        state = {"state_dict": {f"module.encoder.{k}": v for k, v in src.items()}
                 | {"module.projection_head.0.weight": torch.ones(4, 512)}}
    torch.save(state, tmp_path / "simclr.pth")
    model = load(RESNET, tmp_path / "simclr.pth")
    assert_loaded(model, src)
    assert model.ckaflow_load["format"] == "simclr_resnet" and model.ckaflow_load["head_reset"]
    assert isinstance(model.fc, torch.nn.Identity)


def test_safetensors_plain(tmp_path):
    src = source(VIT)
    save_file(OrderedDict((k, v.contiguous()) for k, v in src.items()), str(tmp_path / "w.safetensors"))
    model = load(VIT, tmp_path / "w.safetensors")
    assert_loaded(model, src)
    assert model.ckaflow_load["format"] == "plain"


def test_foreign_key_fails_listing_it(tmp_path):
    src = backbone(source(VIT), "head") | {"blocks.0.extra.weight": torch.ones(2)}
    torch.save({"model": src}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match=r"foreign keys.*\(1\): \['blocks.0.extra.weight'\]"):
        load(VIT, tmp_path / "foreign.pth")


def test_missing_backbone_weight_and_shape_mismatch_fail(tmp_path):
    src = backbone(source(VIT), "head")
    del src["blocks.1.mlp.fc2.bias"]
    src["pos_embed"] = torch.zeros(1, 3, 48)
    torch.save({"model": src}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load(VIT, tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing from the checkpoint (1): ['blocks.1.mlp.fc2.bias']" in message
    assert "pos_embed: checkpoint (1, 3, 48) vs model (1, 17, 48)" in message
    model = build_model(*VIT, str(tmp_path / "bad.pth"), strict=False)
    assert model.ckaflow_load["missing"] == ["blocks.1.mlp.fc2.bias"]


class Payload:
    """An arbitrary object: unpickling it would run code from the file."""


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "obj": Payload()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        read_checkpoint(tmp_path / "unsafe.pth")


def test_detect_format():
    t = torch.ones(1)
    assert detect_format({"teacher": {}, "student": {}}) == "dino"
    assert detect_format({"state_dict": {"module.base_encoder.x": t}}) == "moco_v3"
    assert detect_format({"module.base_encoder.x": t, "module.predictor.0.weight": t}) == "moco_v3"
    assert detect_format({"base_encoder.x": t}) == "moco_v3"
    assert detect_format({"model": {"mask_token": t}}) == "mae"
    assert detect_format({"model": {"x": t}}) == "deit"
    assert detect_format({"encoder.conv1.weight": t}) == "simclr_resnet"
    assert detect_format({"conv1.weight": t}) == "plain"
    with pytest.raises(CheckpointError, match="unknown checkpoint_format 'mocov3'"):
        load_checkpoint(torch.nn.Linear(1, 1), __file__, "mocov3")
