"""Building models with their weights, fingerprinting them, and their preprocessing.

Architectures (`arch`):
- a timm name (`vit_small_patch16_224`), with a pretrained tag when weights is `timm`;
- an import path `package.module:factory` (any callable returning an `nn.Module`, called with
  `arch_kwargs`);
- `memory:<fingerprint>`: a module registered in this process by `register_module` (notebooks).
An import path's module is looked for in the installed packages (PYTHONPATH too), then in the working
directory and the directories made `importable` (the config file's, by `flows.config.load_config`).

Weights:
- `random:<seed>`: timm's own initialisation under `torch.manual_seed(seed)` (deterministic).
- `timm`: pretrained weights of the tag in `arch` (e.g. `vit_base_patch16_224.mae`), read only
  from the local Hugging Face cache (offline mode forced while loading) or torch hub cache.
- a file path: `.safetensors` / `.pth` / `.pth.tar` / `.pt` / `.bin`, remapped by
  `tasks.extract.checkpoints` (`checkpoint_format`); the load report is kept as `model.ckaflow_load`.
- `module`: an in-memory module's own weights (only with `memory:` archs).
Every model is returned in eval mode on the CPU.

Preprocessing (`data_config`): a model with a timm data config (`pretrained_cfg`: every timm model, however
built) gets timm's; any other model takes the images as they are (no resize or crop, values in [0, 1]).
Overrides (`preprocessing` of the config) apply to both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import copy
import hashlib
import importlib
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hf_constants
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import functional as F

import storage
from tasks.extract.checkpoints import load_checkpoint
from tasks.extract.options import MEMORY_PREFIX, check_preprocessing, importable, is_import_path

_SEEDED_INIT = threading.Lock()

MODULE_WEIGHTS = "module"
AS_THE_IMAGES_ARE = {"interpolation": "bilinear", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "crop_pct": 1.0,
                     "crop_mode": "center"}  # the data config of a model without timm's
GEOMETRY = ("input_size", "img_size", "crop_pct", "crop_mode", "interpolation")  # overrides that resize
_IN_MEMORY: dict[str, torch.nn.Module] = {}


class ModelError(ValueError):
    """A model that cannot be built: unknown arch, bad weights spec, weights not cached."""


def _factory(arch: str) -> Callable[..., torch.nn.Module]:
    module_name, _, attr = arch.partition(":")
    importable(Path.cwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and f"{module_name}.".startswith(f"{error.name}.")
        hint = (f"; it is looked for in the installed packages, the config file's directory and the working "
                f"directory ({Path.cwd()}): put it there or add its directory to PYTHONPATH") if missing else ""
        raise ModelError(f"arch {arch!r}: cannot import module {module_name!r}: {error}{hint}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"arch {arch!r}: module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"arch {arch!r}: {attr!r} is not callable")
    return target


def _create(arch: str, arch_kwargs: dict[str, Any], pretrained: bool = False) -> torch.nn.Module:
    if arch.startswith(MEMORY_PREFIX):
        if arch not in _IN_MEMORY:
            raise ModelError(f"arch {arch!r}: no in-memory module of that fingerprint in this process "
                             "(in-memory modules exist only in the process that registered them)")
        return copy.deepcopy(_IN_MEMORY[arch])
    if is_import_path(arch):
        try:
            model = _factory(arch)(**arch_kwargs)
        except TypeError as error:
            raise ModelError(f"arch {arch!r}: bad arch_kwargs {sorted(arch_kwargs)}: {error}") from None
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"arch {arch!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
        return model
    try:
        return timm.create_model(arch, pretrained=pretrained, **arch_kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error) or "Invalid pretrained tag" in str(error):
            raise ModelError(f"arch {arch!r}: {error}") from None
        raise
    except TypeError as error:
        raise ModelError(f"arch {arch!r}: bad arch_kwargs {sorted(arch_kwargs)}: {error}") from None


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's class and state_dict (names, dtypes, shapes and bytes of every tensor)."""
    digest = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for key, value in module.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def register_module(module: torch.nn.Module) -> str:
    """Make an in-memory module buildable in this process; returns its arch, `memory:<fingerprint>`,
    the fingerprint coming from its state_dict bytes (use it with weights 'module')."""
    if not isinstance(module, torch.nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
    arch = f"{MEMORY_PREFIX}{state_dict_sha256(module)[:16]}"
    _IN_MEMORY[arch] = module
    return arch


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force Hugging Face Hub offline mode (env var and the constant hub reads at call time)."""
    env, const = os.environ.get("HF_HUB_OFFLINE"), hf_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hf_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = const
        if env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env


def _pretrained(arch: str, arch_kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=False)
    except RuntimeError as error:
        raise ModelError(f"weights 'timm': arch {arch!r} has no pretrained weights in timm: {error}") from None
    if cfg.hf_hub_id:
        where = f"Hugging Face hub id {cfg.hf_hub_id!r}, cache dir {hf_constants.HF_HUB_CACHE}"
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(cfg.url)).name
        if not cfg.url or not cached.is_file():
            raise ModelError(f"weights 'timm': pretrained weights for {arch!r} are not cached at {cached}; "
                             "fetch them on a connected machine or give a local checkpoint file")
        where = f"torch hub cache {cached}"
    try:
        with _hf_offline():
            return _create(arch, arch_kwargs, pretrained=True)
    except ModelError:
        raise
    except Exception as error:  # hub raises LocalEntryNotFoundError/OfflineModeIsEnabled/OSError variants
        raise ModelError(f"weights 'timm': pretrained weights for {arch!r} are not in the local cache "
                         f"({where}); download them on a connected machine (e.g. `hf download "
                         f"{cfg.hf_hub_id or cfg.url}`) or give a local checkpoint file "
                         f"[{type(error).__name__}: {error}]") from None


def build_model(arch: str, arch_kwargs: dict[str, Any], weights: str, *,
                checkpoint_format: str = "auto", strict: bool = True) -> torch.nn.Module:
    """A model in eval mode with the given weights (see module docstring)."""
    arch_kwargs = dict(arch_kwargs or {})
    if arch.startswith(MEMORY_PREFIX) != (weights == MODULE_WEIGHTS):
        raise ModelError(f"arch {arch!r} with weights {weights!r}: weights '{MODULE_WEIGHTS}' go with in-memory "
                         "modules (and only with them)")
    if weights == MODULE_WEIGHTS:
        model = _create(arch, arch_kwargs)
    elif weights.startswith("random:"):
        seed = weights.removeprefix("random:")
        if not seed.lstrip("-").isdigit():
            raise ModelError(f"weights {weights!r}: random weights need an integer seed, e.g. 'random:0'")
        with _SEEDED_INIT, torch.random.fork_rng(devices=[]):  # the global RNG: one thread at a time
            torch.manual_seed(int(seed))
            model = _create(arch, arch_kwargs)
    elif weights == "timm":
        if is_import_path(arch):
            raise ModelError(f"arch {arch!r}: weights 'timm' need a timm name; give 'random:<seed>' or a checkpoint file")
        model = _pretrained(arch, arch_kwargs)
    else:
        if not Path(weights).is_file():
            raise ModelError(f"weights {weights!r}: not 'random:<seed>', 'timm', or an existing checkpoint file")
        model = _create(arch, arch_kwargs)
        model.ckaflow_load = dataclasses.asdict(load_checkpoint(model, weights, checkpoint_format, strict=strict))
    return model.eval()


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file (memoised on path, size and mtime)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def model_fingerprint(arch: str, arch_kwargs: dict[str, Any], weights: str, *, checkpoint_format: str = "auto") -> str:
    """Identity of a model's computation: arch, kwargs, weights (content hash for files), timm version;
    for import-path factories also the factory module's source, for in-memory modules their state_dict
    bytes (which `memory:<fingerprint>` already names)."""
    is_file = not (weights in ("timm", MODULE_WEIGHTS) or weights.startswith("random:"))
    record = {"arch": arch, "arch_kwargs": arch_kwargs or {}, "timm": timm.__version__,
              "weights": f"sha256:{file_sha256(weights)}" if is_file else weights,
              "checkpoint_format": checkpoint_format if is_file else None}
    if is_import_path(arch):
        record["factory_source"] = _factory_source_sha256(arch)
    return storage.fingerprint(record)


def _factory_source_sha256(arch: str) -> str | None:
    try:
        source = inspect.getsourcefile(importlib.import_module(arch.partition(":")[0]))
    except (ImportError, TypeError):
        return None
    return file_sha256(source) if source else None


def has_timm_config(model: torch.nn.Module) -> bool:
    """Whether the model carries a timm data config (`pretrained_cfg`), as every timm model does."""
    return bool(getattr(model, "pretrained_cfg", None))


def data_config(model: torch.nn.Module, overrides: dict[str, Any] | None = None,
                image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """The data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of a model, with
    `overrides` applied: timm's, where models built with a non-default `img_size` use that size; for a model
    without one, the images as they are (`AS_THE_IMAGES_ARE`, at `image_size`, (H, W) of the images), marked
    `resize: False` unless an override of the size or crop asks for timm's resize and centre crop."""
    overrides = dict(overrides or {})
    try:
        check_preprocessing(overrides)
    except ValueError as error:
        raise ModelError(str(error)) from None
    if isinstance(overrides.get("input_size"), int):
        overrides["input_size"] = (3, overrides["input_size"], overrides["input_size"])
    if not has_timm_config(model):
        as_they_are = not set(GEOMETRY) & set(overrides)
        if not {"input_size", "img_size"} & set(overrides):  # the images' own size
            if image_size is None:
                raise ModelError(f"{type(model).__name__} has no timm data config, so it takes the images as they "
                                 "are, and their size is not known here: set `preprocessing: {input_size: N}`")
            overrides["input_size"] = (3, *image_size)
        config = resolve_data_config(args={**AS_THE_IMAGES_ARE, **overrides})
        return {**config, "resize": False} if as_they_are else config
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size and "input_size" not in overrides and "img_size" not in overrides:
        overrides["input_size"] = (3, *img_size)
    return resolve_data_config(args=overrides, model=model)


def input_size(model: torch.nn.Module, overrides: dict[str, Any] | None = None,
               image_size: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the model's preprocessed input."""
    return tuple(data_config(model, overrides, image_size)["input_size"])  # type: ignore[return-value]


class _AsTheImagesAre:
    """To tensor (values in [0, 1]) and normalise, without resize or crop; an image of another size than the
    data config's is refused (a batch holds one size)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.size, self.mean, self.std = tuple(config["input_size"][1:]), config["mean"], config["std"]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if (image.height, image.width) != self.size:
            raise ModelError(f"an image of {image.height}x{image.width} px among images of "
                             f"{self.size[0]}x{self.size[1]}: a model without a timm data config takes the images as "
                             "they are, so they must share one size; set `preprocessing: {input_size: N}` to resize them")
        return F.normalize(F.to_tensor(image), self.mean, self.std)


def preprocessing(model: torch.nn.Module, overrides: dict[str, Any] | None = None,
                  image_size: tuple[int, int] | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Eval transform from the model's data config: resize, centre crop, to tensor, normalise (timm's), or,
    for images taken as they are, to tensor and normalise."""
    config = data_config(model, overrides, image_size)
    if config.get("resize") is False:
        return _AsTheImagesAre(config)
    return create_transform(**config, is_training=False)


def describe_preprocessing(config: dict[str, Any]) -> str:
    """A data config in one phrase for the log: input size, resize and crop, mean and std."""
    _, height, width = config["input_size"]
    if config.get("resize") is False:
        how = "as the images are (no resize or crop)"
    else:
        how = f"{config['interpolation']} resize, {config['crop_mode']} crop {config['crop_pct']:g}"
    mean, std = (", ".join(f"{v:.3g}" for v in config[key]) for key in ("mean", "std"))
    return f"{height}x{width} px {how}, " + ("values in [0, 1]" if (mean, std) == ("0, 0, 0", "1, 1, 1")
                                             else f"mean ({mean}), std ({std})")
