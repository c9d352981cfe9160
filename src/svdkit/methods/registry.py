"""The method registry: a method is a pure function (W, statistics, rank, config) -> (A, B).

W is the m x n weight in float64, A (k x n) and B (m x k) with W' = B A. The pipeline looks methods
up by name and knows nothing else about them. A method is *nested* when its rank-k factors are the
first k rows of A and columns of B of any higher-rank result (truncated SVDs of a fixed matrix are):
allocators that try many ranks of one matrix then decompose it once and slice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..configs import build_config
from ..errors import SvdkitError
from ..statistics import LinearStats

__all__ = ["Method", "Factors", "register", "get_method", "method_names", "make_config", "factorize"]

Factors = tuple[torch.Tensor, torch.Tensor]
DecomposeFn = Callable[[torch.Tensor, LinearStats | None, int, Any], Factors]


@dataclass(frozen=True)
class Method:
    name: str
    decompose: DecomposeFn
    config_cls: type
    requires: frozenset[str]
    summary: str
    paper: str = ""
    nested: bool = False


_METHODS: dict[str, Method] = {}


def register(
    name: str,
    config_cls: type,
    requires: tuple[str, ...] = (),
    summary: str = "",
    paper: str = "",
    nested: bool = False,
) -> Callable[[DecomposeFn], DecomposeFn]:
    """Decorator: register `fn` as method `name` with its config dataclass and needed statistics."""

    def wrap(fn: DecomposeFn) -> DecomposeFn:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is already registered")
        _METHODS[name] = Method(name, fn, config_cls, frozenset(requires), summary, paper, nested)
        return fn

    return wrap


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise SvdkitError(f"unknown method '{name}'; known methods: {', '.join(method_names())}")
    return _METHODS[name]


def make_config(method: Method, options: Mapping[str, Any] | None = None) -> Any:
    """Build the method's config dataclass from a mapping, with clear errors for unknown keys or values."""
    return build_config(method.config_cls, options, f"method '{method.name}'")


def factorize(
    method: Method, config: Any, weight: torch.Tensor, stats: LinearStats | None, rank: int, device, name: str
) -> Factors:
    """The method's float64 factors (A, B) of `weight` at `rank`, checked; failures name the module."""
    W = weight.detach().to(device=device, dtype=torch.float64)
    try:
        A, B = method.decompose(W, stats, rank, config)
    except (ValueError, RuntimeError, torch.linalg.LinAlgError) as e:
        raise SvdkitError(f"method {method.name} failed on {name}: {e}") from e
    if A.shape != (rank, W.shape[1]) or B.shape != (W.shape[0], rank):
        raise RuntimeError(f"method {method.name} returned factors {tuple(A.shape)}, {tuple(B.shape)} for {name}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise SvdkitError(f"method {method.name} produced non-finite factors for {name}")
    return A, B
