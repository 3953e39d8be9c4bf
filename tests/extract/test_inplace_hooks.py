"""In-place ops after a site: what extraction captures never changes after the hook fired.

timm's ResNet BasicBlock ends `x = bn2(conv2(...)); x += shortcut; x = act2(x)` with an in-place ReLU, so a
hook that keeps a reference to bn2's output (or a view of it, such as `output.flatten(1)` of an NCHW
tensor) later reads the
block output instead. ckaflow reduces at hook time into memory of its own; these tests check it on exactly
that pattern, against references computed independently (out of place), through the real code paths:
`tap_sites` + `reduce` as extraction hooks them, and `extract_model` end to end into a store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import storage
from tasks.data import open_dataset, sample_image, sample_images
from tasks.extract import (
    ExtractOptions,
    ModelSpec,
    build_model,
    extract_model,
    preprocessing,
    reduce,
    register_module,
    resolve_sites,
    tap_sites,
)

RESNET = ("resnet18", {"zero_init_last": False, "num_classes": 0})   # bn2 weights 1, not timm's zeros
RESNET_INPUT = {"input_size": 48, "crop_pct": 1.0}


class InplaceBlock(nn.Module):
    """conv -> bn (the site) -> `x += shortcut` -> ReLU(inplace=True): timm's BasicBlock tail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.shortcut, self.act = nn.Conv2d(3, 6, 1), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.bn(self.conv(x))
        x += shortcut
        return self.act(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = InplaceBlock(), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def small_net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():   # BN statistics that make bn's output differ from conv's, negative in places
        net.block.bn.running_mean.uniform_(-0.5, 0.5)
        net.block.bn.running_var.uniform_(0.5, 1.5)
        net.block.bn.weight.uniform_(0.5, 2.0)
        net.block.bn.bias.uniform_(-1.0, 1.0)
    return net


def out_of_place(net: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bn output, block output) of `net` on x, the residual added out of place."""
    with torch.no_grad():
        bn = net.block.bn(net.block.conv(x))
        return bn, torch.relu(bn + net.block.shortcut(x))


def referencing_hook_sees(model: nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    """What a hook that keeps a reference to the output (`output.detach()`) holds once the forward is done."""
    kept = {}
    handle = dict(model.named_modules())[module].register_forward_hook(
        lambda m, args, output: kept.__setitem__("x", output.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return kept["x"].flatten(1)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("reduction", ["flatten", "avgpool", "pool2"])
def test_hooked_reduction_keeps_the_value_before_the_inplace_add(memory_format, reduction):
    net = small_net().to(memory_format=memory_format)
    x = torch.randn(5, 3, 8, 8).contiguous(memory_format=memory_format)
    bn, block = out_of_place(net, x)
    # the pattern is live: a hook holding bn's output ends up with the block output
    torch.testing.assert_close(referencing_hook_sees(net, "block.bn", x), block.flatten(1))

    sites = resolve_sites(net, ["block.bn:output", "block:output"], (3, 8, 8))
    got = {}
    with tap_sites(net, sites, lambda s, t: got.__setitem__(s.name, reduce(t, reduction))), torch.inference_mode():
        net(x)
    torch.testing.assert_close(got["block.bn/output"], reduce(bn, reduction))
    torch.testing.assert_close(got["block/output"], reduce(block, reduction))
    assert not torch.allclose(got["block.bn/output"], got["block/output"])
    if reduction == "flatten":
        assert (got["block.bn/output"] < 0).any()   # before the ReLU: the block output has no negative value


def extract(tmp_path, spec: ModelSpec, dataset, samples) -> dict[str, np.ndarray]:
    root = storage.open_store(str(tmp_path / "store"))
    storage.write_samples(root, samples)
    extract_model(root, spec, dataset=dataset, samples=samples,
                  options=ExtractOptions(batch_size=4, device="cpu", shard_size=8))
    return {site: np.asarray(array[:]) for site, array in storage.activation_arrays(root, spec.name).items()}


def test_extract_model_stores_bn_before_the_inplace_add(tmp_path):
    net = small_net()
    dataset = open_dataset("synthetic", None, n=8, size=12, n_classes=2)
    samples = sample_images(dataset, n=8, per_class=None, seed=0)
    got = extract(tmp_path, ModelSpec("net", register_module(net), "module", ["block.bn:output", "block:output"],
                                      "flatten"), dataset, samples)
    transform = preprocessing(small_net(), None, (12, 12))
    x = torch.stack([transform(sample_image(dataset, samples, row)) for row in range(8)])
    bn, block = out_of_place(small_net(), x)
    np.testing.assert_allclose(got["block.bn/output"], bn.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["block/output"], block.flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["block.bn/output"], got["block/output"])
    assert (got["block.bn/output"] < 0).any()


def resnet_reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """bn2 and block outputs of every BasicBlock of a timm resnet, recomputed module by module, the residual
    added out of place."""
    out = {}
    with torch.no_grad():
        h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for index, block in enumerate(getattr(model, stage)):
                shortcut = block.downsample(h) if block.downsample is not None else h
                y = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(h)))))
                h = torch.relu(y + shortcut)
                out[f"{stage}.{index}/bn2"], out[f"{stage}.{index}/block"] = y.clone(), h.clone()
    return out


def test_timm_resnet18_bn2_sites_are_not_the_block_output(tmp_path):
    dataset = open_dataset("synthetic", None, n=8, size=48, n_classes=2)
    samples = sample_images(dataset, n=8, per_class=None, seed=0)
    spec = ModelSpec("r", RESNET[0], "random:0", ["layer*.*/bn2", "layer*.*/block"], "flatten",
                     arch_kwargs=RESNET[1], preprocessing=RESNET_INPUT)
    got = extract(tmp_path, spec, dataset, samples)

    model = build_model(RESNET[0], RESNET[1], "random:0")
    transform = preprocessing(model, RESNET_INPUT)
    x = torch.stack([transform(sample_image(dataset, samples, row)) for row in range(8)])
    expected = resnet_reference(model, x)
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert sorted(got) == sorted(f"{b}/{part}" for b in blocks for part in ("bn2", "block"))
    for block in blocks:
        bn2, out = got[f"{block}/bn2"], got[f"{block}/block"]
        np.testing.assert_allclose(bn2, expected[f"{block}/bn2"].flatten(1).numpy(), rtol=1e-4, atol=1e-5, err_msg=block)
        np.testing.assert_allclose(out, expected[f"{block}/block"].flatten(1).numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=block)
        assert not np.allclose(bn2, out), block
        assert (bn2 < 0).any() and not (out < 0).any(), block
    # the pattern is live in timm's block: a hook holding bn2's output reads the block output afterwards
    torch.testing.assert_close(referencing_hook_sees(model, "layer1.0.bn2", x), expected["layer1.0/block"].flatten(1))
