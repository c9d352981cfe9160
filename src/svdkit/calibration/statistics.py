"""Calibration statistics of a linear layer's inputs, collected once and shared by every method.

For a layer y = W x with calibration inputs X (n x T, T tokens), every statistic is a mean over tokens:
- ``gram``: G = X X^T / T (n x n, exactly symmetric), each batch's product in float32 (by row blocks),
  summed in float64; divided by T and symmetrized in place once finished.
- ``mean_abs``: a_j = mean over tokens of |x_j| (ASVD's channel statistic).
A new statistic is one more :class:`Statistic` subclass registered in ``STATISTICS``; methods name the
ones they need and the calibration engine collects only those.

Memory: a Gram matrix is 8 n^2 bytes and is never copied whole: a batch adds its product one row block
at a time, and the mean and the symmetrization happen in place (one block pair at a time), so a
wide input (an MLP's down_proj) costs its Gram matrix plus a block, not three times it.
"""

from __future__ import annotations

import torch

from ..core.distributed import all_reduce_, size
from ..errors import SvdkitError

__all__ = [
    "Statistic",
    "Gram",
    "MeanAbs",
    "STATISTICS",
    "LinearStats",
    "gram_matrix",
    "add_gram_",
    "symmetrize_",
    "all_finite",
]

BLOCK = 1024
"""rows per block of the in-place passes over an n x n matrix"""


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


def _edges(n: int) -> list[int]:
    blocks = max(1, min(8, n // 192))
    return [i * n // blocks for i in range(blocks + 1)]


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x^T x for x (T x n), computing only the upper block triangle and mirroring it.

    With b column blocks this costs (b + 1) / (2 b) of one full product: for n = 1536 on a CPU it
    takes about half the time, which matters since the Gram matrices rival the layer forwards.
    """
    n = x.shape[1]
    g = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    return add_gram_(g, x)


def add_gram_(total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """total += x^T x, block row by block row as :func:`gram_matrix` computes it (each block's product in
    x's dtype, added in total's): no n x n temporary."""
    edges = _edges(x.shape[1])
    if len(edges) == 2:
        return total.add_(x.T @ x)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        row = (x[:, lo:hi].T @ x[:, lo:]).to(total.dtype)
        total[lo:hi, lo:].add_(row)
        total[hi:, lo:hi].add_(row[:, hi - lo :].T)
    return total


def symmetrize_(g: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """g <- (g + g^T) / 2 in place, one block pair at a time (elementwise the same as the whole expression)."""
    n = g.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            a, b = g[i : i + block, j : j + block], g[j : j + block, i : i + block]
            mean = (a + b.T) / 2
            a.copy_(mean)
            b.copy_(mean.T)
    return g


def all_finite(t: torch.Tensor, block: int = BLOCK) -> bool:
    """Whether every entry of `t` is finite, checked a block of rows at a time (no copy of `t`)."""
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    return all(bool(torch.isfinite(r).all()) for r in rows.split(block))


class Gram(Statistic):
    """Mean over tokens of x x^T (n x n, float64, symmetric); the running sum becomes the mean in place."""

    name = "gram"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.total: torch.Tensor | None = None
        self._mean = False

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.n).float()
        if self.total is None:
            self.total = torch.zeros(self.n, self.n, dtype=torch.float64, device=x.device)
        add_gram_(self.total, x)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no calibration tokens reached this layer")
        if not self._mean:
            symmetrize_(self.total.div_(max(self.tokens, 1)))
            self._mean = True
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
            if not all_finite(v):
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
        """G = X X^T / T: the mean of x x^T (float64, symmetric); the very tensor ``self["gram"]``, not a copy."""
        return self["gram"]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self["mean_abs"]

    def __repr__(self) -> str:
        return f"LinearStats({sorted(self.values)}, tokens={self.tokens}{', ' + self.module if self.module else ''})"
