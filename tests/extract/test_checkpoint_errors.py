"""Unreadable checkpoints (truncated, garbage, wrong format) give a one-line CheckpointError naming the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tasks.extract import CheckpointError, build_model
from tasks.extract.checkpoints import read_checkpoint


def damaged(tmp_path, kind: str):
    if kind == "truncated.safetensors":
        whole = tmp_path / "whole.safetensors"
        save_file({"w": torch.zeros(64, 64)}, str(whole))
        data = whole.read_bytes()[:20]
    elif kind == "truncated.pth":
        whole = tmp_path / "whole.pth"
        torch.save({"w": torch.zeros(64, 64)}, whole)
        data = whole.read_bytes()[:100]
    else:
        data = b"this is not a checkpoint\n" * 10
    path = tmp_path / kind.replace("truncated", "bad")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", ["truncated.safetensors", "truncated.pth", "garbage.safetensors", "garbage.pth"])
def test_unreadable_checkpoint_is_one_line_naming_the_file(tmp_path, kind):
    path = damaged(tmp_path, kind)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_building_a_model_from_a_truncated_checkpoint_names_the_file(tmp_path):
    path = damaged(tmp_path, "truncated.safetensors")
    with pytest.raises(CheckpointError, match="cannot be read as safetensors: SafetensorError"):
        build_model("resnet10t", {"num_classes": 0}, str(path))
