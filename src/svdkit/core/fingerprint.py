"""Cheap fingerprints of a model's weights, for the caches keyed by the model (the sensitivity table, the
text a model writes for its own calibration).

:func:`model_fingerprint` hashes every parameter's (and saved buffer's: a quantized base's codes and
scales) name, shape, dtype and float64 sum, and the first and last rows of the architecture's target
matrices (of every matrix without one), summed on the CPU so that any device gives the same digest.
Equal weights give equal fingerprints; a changed weight almost surely changes one.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .architecture import Architecture

__all__ = ["digest", "model_fingerprint", "saved_buffers"]


def digest(*chunks: bytes) -> str:
    """A 32-hex-digit BLAKE2b digest of the chunks, in order."""
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def saved_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers `model` saves with its weights (its state dict's entries that are no parameter, under
    any name: a tied head is a parameter), e.g. a quantized base's codes; not the rotary tables."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [(name, t) for name, t in model.state_dict().items() if name not in params]


def model_fingerprint(model: nn.Module, arch: Architecture | None = None) -> str:
    """Fingerprint of `model`'s parameters and saved buffers: names, shapes, dtypes and float64 sums, and the
    first and last rows of `arch`'s targets (None: of every matrix)."""
    targets = set(arch.shapes()) if arch is not None else None
    parts = []
    for name, p in [*model.named_parameters(), *saved_buffers(model)]:
        w = p.detach().to("cpu", torch.float64)  # summed on the CPU: a GPU's float64 sum differs in the last bits
        parts.append(f"{name}:{tuple(w.shape)}:{p.dtype}:{float(w.sum())!r}".encode())
        edges = w.dim() == 2 if targets is None else name.removesuffix(".weight") in targets
        if edges:
            parts.append(torch.cat([w[0], w[-1]]).numpy().tobytes())
    return digest(*parts)
