"""The low-rank linear layer y = B (A x) + b and the module swap.

A matrix W (m x n) of rank-k factors W' = B A, A (k x n), B (m x k), stores k (m + n) numbers instead
of m n, so it only saves parameters while k < m n / (m + n) (the break-even rank).

:class:`LowRankLinear` is defined in :mod:`svdkit.core.modeling_svdkit`, the standalone file every
saved folder carries, so that a folder loaded without svdkit builds the very same layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .modeling_svdkit import LowRankLinear

__all__ = ["LowRankLinear", "densify_", "count_parameters"]


def densify_(model: nn.Module) -> int:
    """Replace every LowRankLinear of `model` by an nn.Linear holding W' = B A; returns how many."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, LowRankLinear)]
    for name in names:
        low = model.get_submodule(name)
        dense = nn.Linear(
            low.in_features, low.out_features, bias=low.bias is not None, device=low.A.device, dtype=low.A.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(low.dense_weight())
            if low.bias is not None:
                dense.bias.copy_(low.bias)
        model.set_submodule(name, dense)
    return len(names)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings count once); a model run outside torch (an ONNX export) states
    its own ``parameter_count``."""
    stated = getattr(model, "parameter_count", None)
    return stated if stated is not None else sum(p.numel() for p in model.parameters())
