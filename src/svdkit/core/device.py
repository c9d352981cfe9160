"""The compute device: CUDA when present, else the CPU, overridable."""

from __future__ import annotations

import os

import torch

from ..errors import SvdkitError

__all__ = ["DTYPES", "available_memory", "model_device", "resolve_device", "resolve_dtype"]


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


def model_device(model) -> torch.device:
    """Where `model` runs: its ``device`` (a transformers model, an ONNX export), else its first parameter's."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


DTYPES = ("auto", "bfloat16", "float16", "float32")
"""the dtypes a model can be loaded and compressed in; auto keeps the checkpoint's own"""


def resolve_dtype(dtype: str | torch.dtype | None = "auto") -> torch.dtype | str:
    """A torch dtype from a name in :data:`DTYPES` (or a torch dtype); 'auto' (or None) stays 'auto'."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = str(dtype)
    if name not in DTYPES:
        raise SvdkitError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def available_memory() -> int | None:
    """Bytes of memory the system can give a process now (MemAvailable on Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
