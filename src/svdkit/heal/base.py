"""The healing registry: a healer trains the factors of an already compressed model back toward the dense one.

A healer is registered by name (its file name) with a config dataclass; ``run(context, config)`` changes the low-
rank layers' factors in place (never their ranks) and returns its :class:`~svdkit.core.report.Report`. A healer
that works one decoder layer at a time also registers its ``layer`` form (:class:`LayerHealing`): work on the layer
engine's walk with the dense hidden states kept, which the factor stage runs in its own walk, each layer healed as
soon as it is factored (:attr:`svdkit.pipeline.plan.CompressionPlan.layer_healers`), so healing streams from a
checkpoint like compression. The pipeline's heal stage (:func:`svdkit.pipeline.stages.heal`) runs the rest, in the
order given, and knows none of them by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..core.architecture import Architecture
from ..core.options import build_config
from ..core.registry import Registry
from ..core.report import Report
from ..engine import Step
from ..errors import SvdkitError
from .reference import DenseReference

__all__ = ["HEALERS", "HealContext", "Healer", "LayerHealing", "healer_names", "parse_heal", "register"]


@dataclass
class HealContext:
    """What a healer gets: the compressed model, its dense reference, the calibration windows, where to run."""

    model: nn.Module
    arch: Architecture
    dense: DenseReference
    windows: torch.Tensor
    """calibration windows (n x seqlen token ids); the healer holds part of them out itself"""
    device: torch.device
    progress: bool = True


class LayerHealing(Protocol):
    """A healer's work on the layer engine's walk with the dense hidden states (:mod:`svdkit.engine`): called
    with each layer once it is factored, its inputs in the compressed model (``step.hidden``) and in the dense one
    (``step.dense``); sets the dense hidden states' next inputs where the walk has not; records what it did in
    ``step.record``."""

    def __call__(self, step: Step) -> None: ...

    def close(self) -> None:
        """Release what the work holds (a log file), whether or not the walk finished."""

    def report(self, records: list[dict[str, Any]]) -> Report:
        """The healer's report from every layer's record (those of a resumed walk's earlier layers too)."""


@dataclass(frozen=True)
class Healer:
    name: str
    run: Callable[[HealContext, Any], Report]
    config_cls: type
    summary: str
    paper: str = ""
    layer: Callable[[HealContext, Any], LayerHealing] | None = None
    """the per-layer form, for a healer that trains one decoder layer at a time"""
    held: Callable[[float], float] | None = None
    """of a whole-model healer: model-sized copies of the weights it holds beside the compressed model while it
    trains, at a ratio (the memory check before a model is loaded whole)"""


HEALERS: Registry[Healer] = Registry("healing", known="known healings")


def register(
    name: str,
    config_cls: type,
    summary: str,
    paper: str = "",
    layer: Callable[[HealContext, Any], LayerHealing] | None = None,
    held: Callable[[float], float] | None = None,
) -> Callable:
    """Decorator: register `fn(context, config) -> Report` as healer `name` (`layer`: its per-layer form;
    `held`: what a whole-model healer holds, :attr:`Healer.held`)."""

    def wrap(fn: Callable[[HealContext, Any], Report]) -> Callable[[HealContext, Any], Report]:
        HEALERS.add(name, Healer(name, fn, config_cls, summary, paper, layer, held))
        return fn

    return wrap


def healer_names() -> list[str]:
    return HEALERS.names()


def parse_heal(heal: str | None, options: Mapping[str, Any] | None) -> list[tuple[Healer, Any]]:
    """``"block,kd"`` and options keyed ``NAME.KEY`` (``kd.max_steps=100``) -> [(healer, its config), ...] in order.

    ``"none"``, ``""`` and None heal nothing; a healer named twice, an unknown name, an option for a healer
    that does not run, and an unknown or rejected option are SvdkitErrors.
    """
    names = [] if heal in (None, "", "none") else [n.strip() for n in str(heal).split(",")]
    if len(set(names)) != len(names):
        raise SvdkitError(f"heal names a healing twice: {heal!r}")
    healers = [HEALERS.get(n) for n in names]
    per: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in (options or {}).items():
        name, dot, field = str(key).partition(".")
        if not dot or not field:
            raise SvdkitError(f"heal_options keys are NAME.KEY (e.g. kd.lr=1e-5 on the command line), got {key!r}")
        if name not in per:
            raise SvdkitError(
                f"heal_options key {key!r} is for healing '{name}', which this run does not do (heal={heal!r})"
            )
        per[name][field] = value
    return [(h, build_config(h.config_cls, per[h.name], f"healing '{h.name}'")) for h in healers]
