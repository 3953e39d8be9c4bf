"""Sites and reductions: every preset site equals a manual float64 re-computation of its tensor."""

from __future__ import annotations

import pytest
import torch

from tasks.extract import SiteError, build_model, list_sites, resolve_sites, tap_sites
from tasks.extract.reductions import ReductionError, as_tensor, reduce, reductions_for

VIT = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3}
RESNET18 = ("resnet18", {"layers": (1, 1, 1, 1)})


def capture(model: torch.nn.Module, spec, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw tensors of every site of `spec` in one forward pass (copied at hook time)."""
    sites = resolve_sites(model, spec, tuple(image.shape[1:]))
    seen: dict[str, torch.Tensor] = {}
    with tap_sites(model, sites, lambda site, t: seen.__setitem__(site.name, t.clone())), torch.no_grad():
        model(image)
    return seen


def randomize_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so bn outputs differ from conv outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("extra", [{}, {"init_values": 0.3, "reg_tokens": 2}], ids=["plain", "layerscale+registers"])
def test_vit_sublayers_match_manual_computation(extra):
    model = build_model("vit_tiny_patch16_224", VIT | extra, "random:0").double()
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = capture(model, "vit-sublayers", image)

    manual = {"patch_embed/output": model.patch_embed(image)}
    x = x0 = model.norm_pre(model._pos_embed(manual["patch_embed/output"]))
    for i, block in enumerate(model.blocks):
        norm1 = block.norm1(x)
        attn = block.attn(norm1)
        resid1 = x + block.ls1(attn)
        norm2 = block.norm2(resid1)
        mlp = block.mlp(norm2)
        x = resid1 + block.ls2(mlp)
        manual |= {f"blocks.{i}/norm1": norm1, f"blocks.{i}/attn": attn, f"blocks.{i}/resid1": resid1,
                   f"blocks.{i}/norm2": norm2, f"blocks.{i}/mlp": mlp, f"blocks.{i}/block": x}
    manual["norm/output"] = model.norm(x)

    assert list(got) == list(manual)
    for name in manual:
        close(got[name], manual[name])
    assert not torch.allclose(got["blocks.0/resid1"], got["blocks.0/block"])
    branch = got["blocks.0/resid1"] - x0  # attn is the attention output before layer scale ls1
    assert torch.allclose(branch, got["blocks.0/attn"]) == (not extra)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_sublayers_match_manual_computation(arch):
    model = build_model(arch, {"layers": (1, 1, 1, 1)}, "random:0").double()
    randomize_batchnorm(model, 1)
    image = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = capture(model, ["resnet-sublayers", "layer*.*:input"], image)

    x = model.maxpool(torch.relu(model.bn1(model.conv1(image))))
    manual = {"stem/output": x}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        block = getattr(model, stage)[0]
        name = f"{stage}.0"
        steps = ["conv1", "bn1", "act1", "conv2", "bn2"] + (["act2", "conv3", "bn3"] if hasattr(block, "conv3") else [])
        close(got[f"{name}/input"], x)  # block input == previous block output
        shortcut = block.downsample(x) if block.downsample is not None else x
        y = x
        for step in steps:
            layer = getattr(block, step)
            y = torch.relu(y) if step.startswith("act") else layer(y)
            manual[f"{name}/{step}"] = y
        x = torch.relu(y + shortcut)
        manual[f"{name}/block"] = x
    for name, value in manual.items():
        close(got[name], value)
    assert (got["layer1.0/bn1"] < 0).any(), "bn1 must be captured before the in-place ReLU"
    assert {n for n in got if n.endswith("/input")} == {f"layer{s}.0/input" for s in range(1, 5)}


def test_reduction_at_hook_time_is_safe_from_inplace_ops():
    model = build_model("resnet18", {"layers": (1, 1, 1, 1)}, "random:0")
    randomize_batchnorm(model, 2)
    image = torch.randn(2, 3, 32, 32)
    raw = capture(model, ["layer1.0.bn1", "layer1.0.bn2"], image)
    sites = resolve_sites(model, ["layer1.0.bn1", "layer1.0.bn2"], (3, 32, 32))
    reduced = {}
    with tap_sites(model, sites, lambda s, t: reduced.__setitem__(s.name, reduce(t, "flatten"))), torch.no_grad():
        model(image)
    for name in raw:
        torch.testing.assert_close(reduced[name], raw[name].flatten(1))
    assert (reduced["layer1.0.bn1/output"] < 0).any()


def test_reductions_definitions():
    x = torch.randn(3, 7, 5)
    torch.testing.assert_close(reduce(x, "cls", 2), x[:, 0])
    torch.testing.assert_close(reduce(x, "mean", 2), x[:, 2:].mean(1))
    torch.testing.assert_close(reduce(x, "tokens", 2), x.reshape(3, 35))
    maps = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    torch.testing.assert_close(reduce(maps, "avgpool"), maps.mean((2, 3)))
    torch.testing.assert_close(reduce(maps, "pool3"), torch.nn.functional.adaptive_avg_pool2d(maps, 3).reshape(2, 36))
    torch.testing.assert_close(reduce(maps, "flatten"), maps.contiguous().reshape(2, -1))
    assert reduce(x.bfloat16(), "mean", 1).dtype == torch.float32
    with pytest.raises(ReductionError, match="'cls' needs a prefix"):
        reduce(x, "cls", 0)
    with pytest.raises(ReductionError, match="needs maps"):
        reduce(x, "avgpool")
    with pytest.raises(ReductionError, match="unknown reduction 'pool0'"):
        reduce(maps, "pool0")
    assert reductions_for((7, 5), 1) == {"cls": 5, "mean": 5, "tokens": 35, "flatten": 35}
    assert reductions_for((4, 6, 6), 0) == {"avgpool": 4, "pool2": 16, "flatten": 144}


def test_tuple_and_dict_outputs():
    t = torch.ones(2, 3)
    assert as_tensor((t, "weights")) is t and as_tensor({"x": t, "meta": 1}) is t
    with pytest.raises(ReductionError, match=r"\['a', 'b'\]"):
        as_tensor({"a": t, "b": t})


def test_prefix_tokens_and_widths_per_site():
    model = build_model("vit_tiny_patch16_224", VIT | {"reg_tokens": 3}, "random:0")
    sites = {s.name: s for s in resolve_sites(model, "vit-sublayers")}
    assert sites["patch_embed/output"].prefix_tokens == 0 and sites["blocks.0/attn"].prefix_tokens == 4
    assert sites["blocks.1/block"].width("tokens") == (64 + 4) * 48
    with pytest.raises(SiteError, match="patch_embed/output.*'cls' needs a prefix"):
        sites["patch_embed/output"].width("cls")


def test_bad_specs_are_named():
    model = build_model("vit_tiny_patch16_224", VIT, "random:0")
    with pytest.raises(SiteError, match=r"'blocks\.\*\.nope:output' matches no module"):
        resolve_sites(model, ["blocks.*.nope:output"])
    with pytest.raises(SiteError, match="'blocks.0.attn.attn_drop/input'.*fired 0 times"):
        resolve_sites(model, ["blocks.0.attn.attn_drop:input"])  # fused attention never calls attn_drop
    with pytest.raises(SiteError, match="preset 'resnet-blocks'"):
        resolve_sites(model, "resnet-blocks")
    with pytest.raises(SiteError, match="tap must be 'output' or 'input'"):
        resolve_sites(model, ["blocks.0:middle"])

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = torch.nn.Linear(4, 4), torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(self.act(x)))

    with pytest.raises(SiteError, match="'act/output'.*fired 2 times"):
        resolve_sites(Twice(), ["act"], (4,))
    assert [s.name for s in resolve_sites(Twice(), ["f?"], (4,))] == ["fc/output"]


def test_glob_star_matches_one_component():
    model = build_model("vit_tiny_patch16_224", VIT, "random:0")
    names = [s.name for s in resolve_sites(model, ["blocks.*:output", "blocks.**.fc2"])]
    assert names == ["blocks.0/output", "blocks.1/output", "blocks.0.mlp.fc2/output", "blocks.1.mlp.fc2/output"]


def test_site_names_and_patterns_select_the_same_tensors():
    model = build_model(*RESNET18, "random:0")

    def names(spec: str | list[str]) -> list[str]:
        return [s.name for s in resolve_sites(model, spec)]

    assert names(["layer1.0.conv1/output"]) == names(["layer1.0.conv1:output"]) == ["layer1.0.conv1/output"]
    assert names(["layer*.0/bn2"]) == [f"layer{i}.0/bn2" for i in range(1, 5)]  # presets' sites, by name
    assert names(["stem/output"]) == ["stem/output"] and resolve_sites(model, ["stem/output"])[0].module == "maxpool"
    assert names("layer[12].0:input") == ["layer1.0/input", "layer2.0/input"]  # a string pattern, not a preset
    assert names(["layer[!12].0"]) == ["layer3.0/output", "layer4.0/output"]


def test_a_pattern_that_matches_nothing_lists_the_closest_names():
    model = build_model("vit_tiny_patch16_224", VIT, "random:0")
    with pytest.raises(SiteError, match=r"'blocks\.\*\.nrom1' matches no module .*; closest: blocks\.\d\.norm1"):
        resolve_sites(model, "blocks.*.nrom1")
    with pytest.raises(SiteError, match=r"'blocks\.0/atn' is the name of no preset's site .*; closest: blocks\.0/attn"):
        resolve_sites(model, ["blocks.0/atn"])
    with pytest.raises(SiteError, match="closest: vit-blocks"):
        resolve_sites(model, ["vit-blocs"])


def test_list_sites_gives_presets_with_widths():
    listing = list_sites("vit_tiny_patch16_224", VIT)
    assert set(listing) == {"vit-blocks", "vit-sublayers", "modules"}
    assert dict(listing["modules"])["blocks.1.attn.qkv:output"] == {"cls": 144, "mean": 144, "tokens": 65 * 144,
                                                                  "flatten": 65 * 144}
    assert listing["vit-blocks"] == [(f"blocks.{i}/block", {"cls": 48, "mean": 48, "tokens": 65 * 48,
                                                            "flatten": 65 * 48}) for i in range(2)]
    assert len(listing["vit-sublayers"]) == 1 + 6 * 2 + 1
    listing = list_sites(*RESNET18)
    assert set(listing) == {"resnet-blocks", "resnet-sublayers", "modules"}
    modules = dict(listing["modules"])
    assert modules["layer4.0:output"] == dict(listing["resnet-blocks"])["layer4.0/block"]
    assert listing["resnet-blocks"][-1] == ("layer4.0/block", {"avgpool": 512, "pool2": 2048, "flatten": 512 * 49})
