"""The method registry: a method is a pure function (W, statistics, rank, config) -> (A, B).

W is the m x n weight in float64, A (k x n) and B (m x k) with W' = B A. The pipeline looks methods
up by name and knows nothing else about them. A method is *nested* when its rank-k factors are the
first k rows of A and columns of B of any higher-rank result (truncated SVDs of a fixed matrix are):
allocators that try many ranks of one matrix then decompose it once and slice.

A method may add a whole-model *training* (:class:`MethodTraining`): the pipeline then factors every target
at the training's start ranks and hands the model to it, which fixes the final ranks itself (SoCo
learns which singular components to keep under the allocation's parameter budget).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..calibration.statistics import LinearStats, all_finite
from ..core.options import build_config
from ..core.registry import Registry
from ..errors import SvdkitError

__all__ = [
    "METHODS",
    "Method",
    "MethodTraining",
    "StoredBase",
    "Factors",
    "Compact",
    "Quantized",
    "register",
    "get_method",
    "method_names",
    "make_config",
    "factorize",
]

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Quantized:
    """A block-quantized matrix under a method's factors, W' = Q + B A (``qlr``): int8 codes (m x n) and scales
    (m x blocks), Q = scales * codes in blocks of `block` inputs (:mod:`svdkit.methods.blockquant`)."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    block: int


class Compact(NamedTuple):
    """A method's result: the factors, and the quantized base under them where the method makes one."""

    A: torch.Tensor
    B: torch.Tensor
    quantized: Quantized | None = None


DecomposeFn = Callable[[torch.Tensor, LinearStats | None, int, Any], Factors | Compact]
RanksFn = Callable[[Mapping[str, tuple[int, int]], Any], dict[str, int]]


@dataclass(frozen=True)
class MethodTraining:
    """A method's whole-model training, run once every target has been factored.

    ``start_ranks(shapes, config)`` gives the rank each target is factored at (name -> rank);
    ``run(model, context, budget, config)`` gets the model with those low-rank layers, the
    :class:`~svdkit.allocators.base.AllocationContext` (with calibration windows) and the allocation's
    ranks at the target ratio (`budget`: name -> rank or None), rewrites the low-rank layers and
    returns (final ranks by name, its :class:`~svdkit.core.report.Report`). It may raise :class:`SvdkitError`.
    ``check(config, samples, seqlen)``, when given, runs when the plan is made: it raises
    :class:`SvdkitError` when `samples` calibration windows of `seqlen` tokens cannot serve the training.
    """

    start_ranks: Callable[[Mapping[str, tuple[int, int]], Any], dict[str, int]]
    run: Callable[..., tuple[dict[str, int], dict]]
    check: Callable[[Any, int, int], None] | None = None


@dataclass(frozen=True)
class StoredBase:
    """What a method whose pair corrects a stored base (qlr: W ~ Q + B A) tells an allocation that spends bytes.

    ``spectrum(W, stats, config)``: the singular values the pair's rank truncates (of the base's residual,
    whitened), largest first, so that the output error left at rank k is the sum of their squares beyond k;
    ``nbytes(m, n, config)``: the bytes an m x n matrix's base is stored in.
    """

    spectrum: Callable[[torch.Tensor, LinearStats, Any], torch.Tensor]
    nbytes: Callable[[int, int, Any], int]


@dataclass(frozen=True)
class Method:
    name: str
    decompose: DecomposeFn
    config_cls: type
    requires: frozenset[str]
    summary: str
    paper: str = ""
    nested: bool = False
    training: MethodTraining | None = None
    ranks: RanksFn | None = None
    """a method that sets each target's rank itself (qlr: its correction's rank): (shapes, config) -> ranks;
    no allocation runs (but one that spends a byte budget on a stored base's correction), and the parameter
    ratio does not apply"""
    base: StoredBase | None = None
    """a method whose pair corrects a stored base (qlr): what a byte budget's allocation needs of it"""


METHODS: Registry[Method] = Registry("method", known="known methods")


def register(
    name: str,
    config_cls: type,
    requires: tuple[str, ...] = (),
    summary: str = "",
    paper: str = "",
    nested: bool = False,
    training: MethodTraining | None = None,
    ranks: RanksFn | None = None,
    base: StoredBase | None = None,
) -> Callable[[DecomposeFn], DecomposeFn]:
    """Decorator: register `fn` as method `name` with its config dataclass and needed statistics."""

    def wrap(fn: DecomposeFn) -> DecomposeFn:
        method = Method(name, fn, config_cls, frozenset(requires), summary, paper, nested, training, ranks, base)
        METHODS.add(name, method)
        return fn

    return wrap


def method_names() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> Method:
    return METHODS.get(name)


def make_config(method: Method, options: Mapping[str, Any] | None = None) -> Any:
    """Build the method's config dataclass from a mapping, with clear errors for unknown keys or values."""
    return build_config(method.config_cls, options, f"method '{method.name}'")


def factorize(
    method: Method, config: Any, weight: torch.Tensor, stats: LinearStats | None, rank: int, device, name: str
) -> Compact:
    """The method's float64 factors (A, B) of `weight` at `rank` (and its quantized base, if it makes one),
    checked; failures name the module."""
    W = weight.detach().to(device=device, dtype=torch.float64)
    try:
        out = Compact(*method.decompose(W, stats, rank, config))
    except (ValueError, RuntimeError, torch.linalg.LinAlgError) as e:
        raise SvdkitError(f"method {method.name} failed on {name}: {e}") from e
    A, B, quantized = out
    if A.shape != (rank, W.shape[1]) or B.shape != (W.shape[0], rank):
        raise RuntimeError(f"method {method.name} returned factors {tuple(A.shape)}, {tuple(B.shape)} for {name}")
    if quantized is not None and quantized.codes.shape != W.shape:
        shape = tuple(quantized.codes.shape)
        raise RuntimeError(f"method {method.name} returned a quantized part of shape {shape} for {name}")
    if not (all_finite(A) and all_finite(B) and (quantized is None or all_finite(quantized.scales))):
        raise SvdkitError(f"method {method.name} produced non-finite factors for {name}")
    return out
