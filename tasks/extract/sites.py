"""Sites: the tensors tapped inside a model, named `<layer>/<sublayer>`.

Presets (timm models):

- `vit-blocks`: `blocks.<i>/block`, the output of every transformer block.
- `vit-sublayers`: `patch_embed/output` (patch embeddings: before the class token and the
  position embedding), then for every pre-norm block (`x = x + ls1(attn(norm1(x)));
  x = x + ls2(mlp(norm2(x)))`, timm `vision_transformer.Block`):
  `norm1` (output of norm1), `attn` (output of the attention module: it includes the output
  projection, and comes before the layer scale ls1, which is the identity unless the arch
  sets `init_values`; drop-path is the identity in eval), `resid1` (the stream after the first
  residual add, tapped as the input of norm2), `norm2`, `mlp` (output of the MLP, before ls2),
  `block` (block output); finally `norm/output` (the final norm, when it is not the identity).
- `resnet-blocks`: `layer<s>.<b>/block`, the output of every residual block (after add + act).
- `resnet-sublayers`: `stem/output` (after conv1, bn1, act1, maxpool), then per block the
  conv-branch steps in forward order: BasicBlock `conv1 bn1 act1 conv2 bn2`, Bottleneck
  `conv1 bn1 act1 conv2 bn2 act2 conv3 bn3` (module outputs; bn2/bn3 before the residual add),
  and `block`.

Patterns: `<glob>[:output|:input]` on module names from `model.named_modules()`; `*` matches
one dotted component, `**` any number; `?` one character, `[...]` one of a set (`[!...]`: not of it).
The site is `<module>/<tap>`, e.g. `blocks.*.attn:output` gives `blocks.0.attn/output`, ... An input
tap is the first positional argument of the module's forward.

Site names: `<glob>/<sublayer>` selects the sites of the presets that apply by name (`layer1.*/bn2`,
`blocks.3/attn`); when no preset site has such a name, `<glob>/output` and `<glob>/input` read as
`<glob>:output` and `<glob>:input`. So every name `ckaflow sites` prints (`list_sites`) is a valid
entry of a config's `sites`.

Every site is checked by one dry forward pass: it must fire exactly once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import Block

from tasks.extract.models import build_model, input_size
from tasks.extract.options import SITE_PRESETS
from tasks.extract.reductions import ReductionError, as_tensor, feature_width, reduce, reductions_for  # noqa: F401  (reduce: public API)
from tasks.suggest import closest

VIT_SUBLAYERS = (("norm1", "norm1", "output"), ("attn", "attn", "output"), ("resid1", "norm2", "input"),
                 ("norm2", "norm2", "output"), ("mlp", "mlp", "output"))
RESNET_STEPS = {BasicBlock: ("conv1", "bn1", "act1", "conv2", "bn2"),
                Bottleneck: ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3")}
Tap = Literal["output", "input"]
TAPS = ("output", "input")
BRACKET = re.compile(r"\[!?[^\]]+\]")  # a glob's `[...]` or `[!...]`
LISTING_IMAGE_SIZE = (224, 224)  # `list_sites` of a model that takes the images as they are, unless told


class SiteError(ValueError):
    """A site spec that does not resolve, or a site that does not fire exactly once."""


@dataclass(frozen=True)
class Site:
    """One tapped tensor: `name` = `<layer>/<sublayer>`, taken at `tap` of module `module`.

    `prefix_tokens`: leading non-patch tokens (class/register) of a token tensor at this site.
    `shape`: per-sample shape seen in the dry forward pass (filled by `resolve_sites`)."""

    name: str
    module: str
    tap: Tap
    prefix_tokens: int = 0
    shape: tuple[int, ...] = ()

    def width(self, reduction: str) -> int:
        """Feature width under `reduction`; SiteError when it does not apply to this site."""
        try:
            return feature_width(self.shape, reduction, self.prefix_tokens)
        except ReductionError as error:
            raise SiteError(f"site {self.name!r}: {error}") from None


def _glob_token(token: str) -> str:
    if BRACKET.fullmatch(token):
        negate = token.startswith("[!") and len(token) > 3
        chars = token[1 + negate:-1].replace("\\", "\\\\")
        return "[" + ("^" if negate else "\\" * chars.startswith("^")) + chars + "]"
    return {"**": ".*", "*": r"[^./]*", "?": r"[^./]"}.get(token, re.escape(token))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("".join(map(_glob_token, re.split(rf"(\*\*|\*|\?|{BRACKET.pattern})", pattern))) + r"\Z")


def _prefix_tokens(model: torch.nn.Module, module: str) -> int:
    if module == "patch_embed" or module.startswith("patch_embed."):
        return 0
    return int(getattr(model, "num_prefix_tokens", 0))


def _blocks(model: torch.nn.Module, kinds: tuple[type, ...], preset: str) -> list[tuple[str, torch.nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    if not found:
        names = ", ".join(k.__module__ + "." + k.__name__ for k in kinds)
        raise SiteError(f"preset {preset!r}: {type(model).__name__} has no {names} modules; "
                        f"use glob patterns such as 'blocks.*:output'")
    if any("/" in n for n, _ in found):
        raise SiteError(f"preset {preset!r}: module names contain '/'")
    return found


def _preset(model: torch.nn.Module, preset: str) -> list[Site]:
    npt = int(getattr(model, "num_prefix_tokens", 0))
    modules = dict(model.named_modules())
    if preset in ("vit-blocks", "vit-sublayers"):
        blocks = _blocks(model, (Block,), preset)
        if preset == "vit-blocks":
            return [Site(f"{n}/block", n, "output", npt) for n, _ in blocks]
        sites = [Site("patch_embed/output", "patch_embed", "output", 0)] if "patch_embed" in modules else []
        for n, _ in blocks:
            sites += [Site(f"{n}/{sub}", f"{n}.{child}", tap, npt) for sub, child, tap in VIT_SUBLAYERS]
            sites.append(Site(f"{n}/block", n, "output", npt))
        if not isinstance(modules.get("norm", torch.nn.Identity()), torch.nn.Identity):
            sites.append(Site("norm/output", "norm", "output", npt))
        return sites
    if preset in ("resnet-blocks", "resnet-sublayers"):
        blocks = _blocks(model, tuple(RESNET_STEPS), preset)
        if preset == "resnet-blocks":
            return [Site(f"{n}/block", n, "output") for n, _ in blocks]
        sites = [Site("stem/output", "maxpool", "output")] if "maxpool" in modules else []
        for n, block in blocks:
            sites += [Site(f"{n}/{step}", f"{n}.{step}", "output") for step in RESNET_STEPS[type(block)]]
            sites.append(Site(f"{n}/block", n, "output"))
        return sites
    raise SiteError(f"unknown site preset {preset!r}; presets: {', '.join(SITE_PRESETS)}")


def _nearest(word: str, choices: list[str]) -> str:
    near = closest(word, choices, n=5, cutoff=0.5)
    return f"; closest: {', '.join(near)} (`ckaflow sites ARCH` lists them all)" if near else ""


def _pattern(model: torch.nn.Module, spec: str, preset_sites: list[Site]) -> list[Site]:
    """The sites of one pattern or site name (module docstring); `preset_sites`: those of every preset that applies."""
    if "/" in spec:
        regex = _glob_regex(spec)
        named = [s for s in preset_sites if regex.match(s.name)]
        if named:
            return named
        glob, _, tap = spec.rpartition("/")
        if tap not in TAPS:
            raise SiteError(f"site {spec!r} is the name of no preset's site of {type(model).__name__}"
                            + _nearest(spec, [s.name for s in preset_sites]))
    else:
        glob, _, tap = spec.partition(":")
        tap = tap or "output"
        if tap not in TAPS:
            raise SiteError(f"site pattern {spec!r}: tap must be 'output' or 'input', got {tap!r}")
    regex = _glob_regex(glob)
    modules = [n for n, _ in model.named_modules() if n]
    names = [n for n in modules if regex.match(n)]
    if not names:
        raise SiteError(f"site pattern {spec!r} matches no module of {type(model).__name__}"
                        + _nearest(glob, [*SITE_PRESETS, *modules]))
    return [Site(f"{n}/{tap}", n, tap, _prefix_tokens(model, n)) for n in names]  # type: ignore[arg-type]


def _presets(model: torch.nn.Module) -> dict[str, list[Site]]:
    """The sites of every preset that applies to the model, by preset."""
    presets = {}
    for preset in SITE_PRESETS:
        try:
            presets[preset] = _preset(model, preset)
        except SiteError:  # the preset does not apply to this architecture
            continue
    return presets


@contextlib.contextmanager
def tap_sites(model: torch.nn.Module, sites: list[Site],
              callback: Callable[[Site, torch.Tensor], None]) -> Iterator[None]:
    """Install hooks calling `callback(site, tensor)` whenever a site fires; removed on exit."""
    modules = dict(model.named_modules())
    handles = []

    def output_hook(site: Site) -> Callable:
        return lambda module, args, output: callback(site, as_tensor(output))

    def input_hook(site: Site) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if not args:
                raise SiteError(f"site {site.name!r}: module {site.module!r} got no positional input to tap")
            callback(site, as_tensor(args[0]))
        return hook

    try:
        for site in sites:
            if site.module not in modules:
                raise SiteError(f"site {site.name!r}: no module named {site.module!r}")
            module = modules[site.module]
            if site.tap == "output":
                handles.append(module.register_forward_hook(output_hook(site)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(site)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _fired_shapes(model: torch.nn.Module, sites: list[Site], size: tuple[int, int, int]) -> dict[str, list[tuple[int, ...]]]:
    """Per site, the per-sample shape of every time it fired in one forward pass of a zero image."""
    shapes: dict[str, list[tuple[int, ...]]] = {s.name: [] for s in sites}
    param = next(model.parameters())
    with tap_sites(model, sites, lambda site, t: shapes[site.name].append(tuple(t.shape[1:]))), torch.inference_mode():
        try:
            model(torch.zeros((1, *size), device=param.device, dtype=param.dtype))
        except SiteError:
            raise
        except (RuntimeError, ValueError, TypeError) as error:
            raise SiteError(f"the forward pass of a {'x'.join(map(str, size))} input failed ({error}); if the model "
                            "takes another input size, set `preprocessing: {input_size: N}`") from error
    return shapes


def _dry_run(model: torch.nn.Module, sites: list[Site], size: tuple[int, int, int]) -> list[Site]:
    shapes = _fired_shapes(model, sites, size)
    wrong = [f"{s.name!r} (module {s.module!r}, {s.tap}) fired {len(shapes[s.name])} times" for s in sites
             if len(shapes[s.name]) != 1]
    if wrong:
        raise SiteError("every site must fire exactly once per forward pass (a module called twice, "
                        "or never, cannot be tapped): " + "; ".join(wrong))
    return [Site(s.name, s.module, s.tap, s.prefix_tokens, shapes[s.name][0]) for s in sites]


def resolve_sites(model: torch.nn.Module, spec: str | list[str],
                  size: tuple[int, int, int] | None = None) -> list[Site]:
    """Sites of a preset name or a list of presets/patterns, validated by one dry forward pass
    on an input of `size` (C, H, W; default: the model's input size)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise SiteError("empty site spec")
    sites: dict[str, Site] = {}
    preset_sites = [s for found in _presets(model).values() for s in found] if any("/" in i for i in items) else []
    for item in items:
        for site in _preset(model, item) if item in SITE_PRESETS else _pattern(model, item, preset_sites):
            sites.setdefault(site.name, site)
    return _dry_run(model, list(sites.values()), size or input_size(model))


def list_sites(arch: str, arch_kwargs: dict, input_size_px: int | None = None
               ) -> dict[str, list[tuple[str, dict[str, int]]]]:
    """For `ckaflow sites ARCH`: every preset that applies, its sites and their width per reduction;
    under "modules", as `<module>:output`, every named module whose output fires exactly once (what glob
    patterns tap). Every name is a valid `sites` entry. Widths at the model's input size, or at
    `input_size_px` (a model that takes the images as they are: `LISTING_IMAGE_SIZE` unless given)."""
    model = build_model(arch, arch_kwargs, "random:0")
    size = input_size(model, {"input_size": input_size_px} if input_size_px else None, LISTING_IMAGE_SIZE)
    listing = {}
    for preset, candidates in _presets(model).items():
        sites = _dry_run(model, candidates, size)
        listing[preset] = [(s.name, reductions_for(s.shape, s.prefix_tokens)) for s in sites]
    modules = [Site(f"{n}/output", n, "output", _prefix_tokens(model, n)) for n, _ in model.named_modules() if n]
    shapes = _fired_shapes(model, modules, size)
    listing["modules"] = [(f"{s.module}:output", reductions_for(shapes[s.name][0], s.prefix_tokens))
                          for s in modules if len(shapes[s.name]) == 1]
    return listing
