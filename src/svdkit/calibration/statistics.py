"""Calibration statistics of a linear layer's inputs, collected once and shared by every method.

For a layer y = W x with calibration inputs X (n x T, T tokens):
- ``gram``: G = X X^T (n x n), each batch's product in float32, summed in float64.
- ``mean_abs``: a_j = mean over tokens of |x_j| (ASVD's channel statistic).
A new statistic is one more :class:`Statistic` subclass registered in ``STATISTICS``; methods name the
ones they need and the calibration engine collects only those.
"""

from __future__ import annotations

import torch

from ..core.distributed import all_reduce_, size
from ..errors import SvdkitError

__all__ = ["Statistic", "Gram", "MeanAbs", "STATISTICS", "LinearStats", "gram_matrix"]


class Statistic:
    """Accumulates one statistic of a layer's input over calibration tokens."""

    name = ""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tokens = 0
        self.total: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs, shape (..., n)."""
        raise NotImplementedError

    def value(self) -> torch.Tensor:
        """The finished statistic, float64 on the CPU."""
        raise NotImplementedError

    def reduce(self) -> None:
        """Sum the running total and token count over the processes of a torch.distributed run (no-op in one)."""
        if size() == 1:
            return
        if self.total is None:
            raise SvdkitError("a process received no calibration tokens for a layer: give more windows")
        all_reduce_(self.total)
        self.tokens = int(all_reduce_(torch.tensor([self.tokens], dtype=torch.int64, device=self.total.device)))


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x^T x for x (T x n), computing only the upper block triangle and mirroring it.

    With b column blocks this costs (b + 1) / (2 b) of one full product: for n = 1536 on a CPU it
    takes about half the time, which matters since the Gram matrices rival the layer forwards.
    """
    n = x.shape[1]
    blocks = max(1, min(8, n // 192))
    if blocks == 1:
        return x.T @ x
    edges = [i * n // blocks for i in range(blocks + 1)]
    g = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        row = x[:, lo:hi].T @ x[:, lo:]
        g[lo:hi, lo:] = row
        g[hi:, lo:hi] = row[:, hi - lo :].T
    return g


class Gram(Statistic):
    """Sum over tokens of x x^T (n x n, float64)."""

    name = "gram"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.total: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.n).float()
        g = gram_matrix(x).double()
        self.total = g if self.total is None else self.total.add_(g)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.total.cpu()


class MeanAbs(Statistic):
    """Mean over tokens of |x_j| per input channel (n, float64)."""

    name = "mean_abs"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.total: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.n)
        s = x.abs().sum(0, dtype=torch.float64)
        self.total = s if self.total is None else self.total.add_(s)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no calibration tokens reached this layer")
        return (self.total / self.tokens).cpu()


STATISTICS: dict[str, type[Statistic]] = {cls.name: cls for cls in (Gram, MeanAbs)}


class LinearStats:
    """The finished statistics of one target linear layer's inputs (read-only mapping by name)."""

    def __init__(self, values: dict[str, torch.Tensor], tokens: int, module: str = "") -> None:
        self.values = values
        self.tokens = tokens
        self.module = module
        for name, v in values.items():
            if not bool(torch.isfinite(v).all()):
                where = f" of {module}" if module else ""
                raise SvdkitError(
                    f"calibration statistic '{name}'{where} holds NaN or Inf: the model's activations "
                    "overflow on the calibration text (try float32, or check the model loads correctly)"
                )

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.values:
            raise KeyError(f"statistic '{name}' was not collected (have: {sorted(self.values)})")
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    @property
    def gram_mean(self) -> torch.Tensor:
        """G / T: the mean of x x^T (scale-free, float64); ``self["gram"]`` is the sum G."""
        return self["gram"] / max(self.tokens, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self["mean_abs"]

    def __repr__(self) -> str:
        return f"LinearStats({sorted(self.values)}, tokens={self.tokens}{', ' + self.module if self.module else ''})"
