"""Cheap fingerprints of a model's weights, for the caches keyed by the model (the sensitivity table, the
text a model writes for its own calibration).

:func:`model_fingerprint` hashes every parameter's name, shape, dtype and float64 sum, and the first and
last rows of the architecture's target matrices (of every matrix without one), summed on the CPU so that
any device gives the same digest. Equal weights give equal fingerprints; a changed weight almost surely changes one.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .architecture import Architecture

__all__ = ["digest", "model_fingerprint"]


def digest(*chunks: bytes) -> str:
    """A 32-hex-digit BLAKE2b digest of the chunks, in order."""
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def model_fingerprint(model: nn.Module, arch: Architecture | None = None) -> str:
    """Fingerprint of `model`'s parameters: names, shapes, dtypes and float64 sums, and the first and last rows
    of `arch`'s targets (None: of every matrix)."""
    targets = set(arch.shapes()) if arch is not None else None
    parts = []
    for name, p in model.named_parameters():
        w = p.detach().to("cpu", torch.float64)  # summed on the CPU: a GPU's float64 sum differs in the last bits
        parts.append(f"{name}:{tuple(w.shape)}:{p.dtype}:{float(w.sum())!r}".encode())
        edges = w.dim() == 2 if targets is None else name.removesuffix(".weight") in targets
        if edges:
            parts.append(torch.cat([w[0], w[-1]]).numpy().tobytes())
    return digest(*parts)
