"""The low-rank linear layer y = B (A x) + b and the module swap.

A matrix W (m x n) of rank-k factors W' = B A, A (k x n), B (m x k), stores k (m + n) numbers instead
of m n, so it only saves parameters while k < m n / (m + n) (the break-even rank).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LowRankLinear", "densify_", "count_parameters"]


class LowRankLinear(nn.Module):
    """y = B (A x) + bias, with A of shape (rank, in_features) and B of shape (out_features, rank)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        kw = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.B = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankLinear:
        """Build the layer from factors (A: k x n, B: m x k); dtype and device follow A."""
        rank, n = A.shape
        m = B.shape[0]
        if B.shape[1] != rank:
            raise ValueError(f"factor shapes do not chain: A {tuple(A.shape)}, B {tuple(B.shape)}")
        layer = cls(n, m, rank, bias=bias is not None, device=A.device, dtype=A.dtype)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B.to(A))
            if bias is not None:
                layer.bias.copy_(bias.to(A))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """W' = B A (m x n)."""
        return self.B @ self.A

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


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
    """Unique parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())
