"""The one device resolver: a configured device name ('auto', 'cpu', 'cuda', 'cuda:<k>') to a torch device."""

from __future__ import annotations

import re

import torch

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cpu' and 'cuda[:k]' checked (ValueError names the device)."""
    if not _DEVICE.match(device):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:k]', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)
