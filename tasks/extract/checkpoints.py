"""Reading checkpoint files and remapping their keys onto timm models.

Formats (`checkpoint_format`), each turning a file into a backbone state dict in timm names:

- `plain`: a state dict already in timm names (a leading `module.` on every key is stripped).
- `mae`: MAE (`{"model": ...}`); the decoder (`decoder_*`) and `mask_token` are dropped.
- `deit`: DeiT / supervised (`{"model": ...}`).
- `moco_v3`: MoCo v3 (`{"state_dict": ...}`, or the same keys flat, as in a safetensors file):
  keeps `module.base_encoder.*` (prefix stripped),
  drops the momentum encoder, the predictor and the projection head (`head.*` / `fc.*`).
- `dino`, `dino_student`: DINO (`{"teacher": ..., "student": ...}`): keeps `backbone.*` of the
  teacher (default) or the student, drops the DINO head.
- `torchvision_resnet`: torchvision ResNet names (`conv1`, `bn1`, `layer<s>.<b>.conv<i>`,
  `downsample.0/1`, `fc`) equal timm's ResNet names, so keys pass unchanged.
- `simclr_resnet`: SimCLR ResNets: strips `module.` / `encoder.` / `backbone.` / `model.`
  prefixes and drops projection heads (`projector.*`, `projection_head.*`, `projection.*`,
  `head.*`, `g.*`, and MLP heads inside `fc` such as `fc.0.weight`).
- `auto`: picks one of the above from the file's structure.

Loading is strict: every model weight must be matched, shape for shape, and every checkpoint key
must land in the model. The one exception: a checkpoint without any classifier-head weights
(self-supervised) resets the model's head to the identity (`num_classes=0`), and says so.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
FORMATS = ("auto", "plain", "mae", "deit", "moco_v3", "dino", "dino_student", "torchvision_resnet", "simclr_resnet")
_SIMCLR_PREFIXES = ("module.", "encoder.", "backbone.", "model.")
_SIMCLR_SIGNS = re.compile(r"^(encoder|backbone|model|projector|projection_head|projection)\.")
_SIMCLR_HEADS = re.compile(r"^(projector|projection_head|projection|head|g)\.|^fc\.\d+\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; names the file and keys."""


@dataclass
class LoadReport:
    """What loading a checkpoint did: the format used, keys dropped by the remapping, keys
    missing/unexpected/mismatched in the model, and whether the classifier head was reset."""

    path: str
    format: str
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    head_reset: bool = False


def _first_line(error: BaseException) -> str:
    """An exception as one line: its type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw contents of a .safetensors or .pth/.pth.tar/.pt/.bin file, loaded without
    unpickling arbitrary objects (torch.load weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {str(path)!r}")
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:  # truncated, garbage, unreadable
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read as safetensors: "
                                  f"{_first_line(error)}") from None
    if not path.name.endswith((".pth", ".pth.tar", ".pt", ".bin")):
        raise CheckpointError(f"checkpoint {str(path)!r}: expected .safetensors, .pth, .pth.tar, .pt or .bin")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True): "
                              f"{_first_line(error)}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(raw).__name__}, not a dict")
    return raw


def _tensors(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _unwrap(raw: dict[str, Any], *keys: str) -> dict[str, torch.Tensor]:
    for key in keys:
        if key in raw:
            return _tensors(raw[key], f"checkpoint entry {key!r}")
    return _tensors(raw, "checkpoint")


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_format(fmt: str) -> str:
    """Validate a checkpoint_format name."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint_format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def _bare(key: str) -> str:
    while key.startswith(_SIMCLR_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def detect_format(raw: dict[str, Any]) -> str:
    """Guess the checkpoint format from its structure."""
    if "teacher" in raw:
        return "dino"
    if isinstance(raw.get("model"), dict):
        return "mae" if any(k.startswith("decoder") or k == "mask_token" for k in raw["model"]) else "deit"
    state = _unwrap(raw, "state_dict")
    if any(k.removeprefix("module.").startswith("base_encoder.") for k in state):
        return "moco_v3"
    if any(_SIMCLR_SIGNS.match(k.removeprefix("module.")) for k in state):
        return "simclr_resnet"
    return "plain"


def remap(raw: dict[str, Any], fmt: str = "auto") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(backbone state dict in timm names, format used, checkpoint keys dropped on purpose)."""
    fmt = detect_format(raw) if check_format(fmt) == "auto" else fmt
    dropped: list[str] = []

    def keep(state: dict[str, torch.Tensor], drop: Any) -> dict[str, torch.Tensor]:
        dropped.extend(k for k in state if drop(k))
        return {k: v for k, v in state.items() if not drop(k)}

    if fmt in ("plain", "deit", "torchvision_resnet"):
        state = _strip(_unwrap(raw, "model", "state_dict"), "module.")
    elif fmt == "mae":
        state = keep(_unwrap(raw, "model"), lambda k: k.startswith("decoder") or k == "mask_token")
    elif fmt == "moco_v3":
        state = _unwrap(raw, "state_dict")
        prefix = "module.base_encoder." if any(k.startswith("module.base_encoder.") for k in state) else "base_encoder."
        state = keep(state, lambda k: not k.startswith(prefix))
        state = keep({k[len(prefix):]: v for k, v in state.items()}, lambda k: k.startswith(("head.", "fc.")))
    elif fmt in ("dino", "dino_student"):
        part = "teacher" if fmt == "dino" else "student"
        if part not in raw:
            raise CheckpointError(f"DINO checkpoint has no {part!r} entry (entries: {sorted(raw)})")
        state = _strip(_tensors(raw[part], f"checkpoint entry {part!r}"), "module.")
        state = keep(state, lambda k: not k.startswith("backbone."))
        state = {k[len("backbone."):]: v for k, v in state.items()}
    else:  # simclr_resnet
        state = keep(_unwrap(raw, "state_dict", "model"), lambda k: _SIMCLR_HEADS.match(_bare(k)) is not None)
        state = {_bare(k): v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"checkpoint (format {fmt!r}) holds no backbone tensors")
    return state, fmt, sorted(dropped)


def _head_keys(model: torch.nn.Module, keys: list[str]) -> list[str]:
    heads = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    heads = (heads,) if isinstance(heads, str) else tuple(heads or ())
    return [k for k in keys if any(k.startswith(h + ".") for h in heads)]


def load_checkpoint(model: torch.nn.Module, path: str | Path, fmt: str = "auto", *, strict: bool = True) -> LoadReport:
    """Load a checkpoint file into `model` (in place) and report exactly what matched."""
    check_format(fmt)
    state, used, dropped = remap(read_checkpoint(path), fmt)
    target = model.state_dict()
    report = LoadReport(str(path), used, dropped)
    report.unexpected = sorted(k for k in state if k not in target)
    report.mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                               for k, v in state.items() if k in target and v.shape != target[k].shape)
    missing = sorted(k for k in target if k not in state and not k.endswith("num_batches_tracked"))
    head_missing = _head_keys(model, missing)
    if head_missing and head_missing == _head_keys(model, sorted(target)):
        model.reset_classifier(0)
        report.head_reset = True
        missing = [k for k in missing if k not in head_missing]
        log.warning("checkpoint %s has no classifier head: head reset to identity (num_classes=0)", path)
    report.missing = missing
    problems = [f"{label} ({len(keys)}): {keys}" for label, keys in
                (("foreign keys, in the checkpoint but not in the model", report.unexpected),
                 ("model weights missing from the checkpoint", report.missing),
                 ("shape mismatches", report.mismatched)) if keys]
    if problems and strict:
        raise CheckpointError(f"checkpoint {str(path)!r} (format {used!r}) does not match "
                              f"{type(model).__name__}:\n  " + "\n  ".join(problems))
    if problems:
        log.warning("checkpoint %s loaded non-strictly: %s", path, "; ".join(problems))
    bad = set(report.unexpected) | {m.split(":")[0] for m in report.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return report
