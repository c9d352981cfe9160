"""The compute device: CUDA when present, else the CPU, overridable."""

from __future__ import annotations

import torch

from ..errors import SvdkitError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None) picks CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SvdkitError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SvdkitError(f"device '{device}' asked for, but CUDA is not available here: use --device cpu")
    return dev
