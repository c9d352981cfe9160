"""The compression plan: made once from the options and the model, before any module is touched.

It holds what every stage needs to know: the method and allocation with their configs, the targets
and their shapes, the statistics to collect, how calibration runs (one :class:`CalibrationMode`), and
the ranks fixed in advance (the k/v ranks of a latent KV cache). Making it runs every check that needs
the model, the given statistics or the tokenizer, so a compression that starts also gets past its
checks.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..allocators import Allocator
from ..calibration.gradients import GRADIENT_STATISTICS
from ..calibration.statistics import LinearStats
from ..core.architecture import Architecture, find_architecture
from ..core.lowrank import LowRankLinear, count_parameters
from ..core.options import check_context, context_length
from ..errors import SvdkitError
from ..methods import Method
from ..saved.format import base_classes
from ..saved.kvcache import KV_TARGETS, kv_ranks
from .options import CalibrationSettings, CompressionOptions
from .update import UPDATES

__all__ = ["CalibrationMode", "CompressionPlan", "make_plan", "replan", "statistics_needed"]


class CalibrationMode(enum.Enum):
    """How the statistics the method, the allocation and the update need are obtained."""

    NONE = "none"
    """nothing needs statistics"""
    PRECOMPUTED = "precomputed"
    """the caller passed them"""
    LAYERWISE = "layerwise"
    """layer by layer from the dense model, each layer factored as soon as its statistics are ready
    (after a summary pass when the allocation summarizes every matrix first)"""
    COLLECT = "collect"
    """every matrix's statistics first (spilled to disk), since ranks or gradients need them all"""
    SEQUENTIAL = "sequential"
    """layer by layer from the already-compressed layers (after a dense or summary pass when the
    allocation needs every matrix first)"""


def statistics_needed(method: Method, allocator: Allocator, update: str, sequential: bool) -> frozenset[str]:
    """The statistics a method, an allocation and an update read (``cross`` for the sequential update)."""
    needs = set(method.requires | allocator.requires)
    refit = UPDATES[update]
    if refit is not None:
        needs |= refit.requires | (refit.sequential_requires if sequential else frozenset())
    return frozenset(needs)


def _mode(needs: frozenset[str], allocator: Allocator, precomputed: bool, sequential: bool) -> CalibrationMode:
    if not needs:
        return CalibrationMode.NONE
    if precomputed:
        return CalibrationMode.PRECOMPUTED
    if sequential:
        return CalibrationMode.SEQUENTIAL
    if (allocator.needs_statistics and allocator.summarize is None) or needs & GRADIENT_STATISTICS:
        return CalibrationMode.COLLECT
    return CalibrationMode.LAYERWISE


@dataclass(frozen=True)
class ModelFacts:
    """What the plan reads from the dense model: where the targets are, how big it is, its context."""

    layers_path: str
    targets: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    params: int
    context: int | None = None
    """the longest sequence the model takes (max_position_embeddings), None where it declares none"""


@dataclass(frozen=True)
class CompressionPlan:
    """Options checked against one model; every stage reads it, none changes it."""

    options: CompressionOptions
    facts: ModelFacts
    needs: frozenset[str]
    mode: CalibrationMode
    fixed_ranks: dict[str, int]
    """ranks set before allocation (the k/v ranks of a latent KV cache); kept exact"""
    statistics: Mapping[str, LinearStats] | None = None
    """precomputed statistics, by full module name"""
    needs_windows: bool = False
    has_tokenizer: bool = False
    """whether the plan was made with a tokenizer (calibration text can then be read)"""

    @property
    def method(self) -> Method:
        return self.options.resolved.method

    @property
    def method_config(self) -> Any:
        return self.options.resolved.method_config

    @property
    def allocator(self) -> Allocator:
        return self.options.resolved.allocator

    @property
    def device(self) -> torch.device:
        return self.options.resolved.device

    @property
    def ratio(self) -> float:
        return self.options.resolved.ratio

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return self.facts.shapes

    @property
    def heals(self) -> bool:
        """True when a healing stage trains the factors toward the dense model after the method."""
        return bool(self.options.resolved.heal)

    @property
    def layerwise(self) -> bool:
        """True when the factor stage calibrates as it goes (statistics per layer, never all at once)."""
        return self.mode in (CalibrationMode.LAYERWISE, CalibrationMode.SEQUENTIAL)

    @property
    def dense_pass(self) -> bool:
        """True when every matrix's statistics are collected from the dense model before allocation."""
        return self.mode is CalibrationMode.COLLECT or (
            self.mode is CalibrationMode.SEQUENTIAL
            and self.allocator.needs_statistics
            and self.allocator.summarize is None
        )

    @property
    def summary_pass(self) -> bool:
        """True when a calibration pass over the dense model summarizes every matrix for the allocator
        (keeping no statistics) before the factoring pass."""
        return self.allocator.summarize is not None and self.layerwise

    def architecture(self, model: nn.Module) -> Architecture:
        """The targets of this plan in `model` (the model it was made for, or a copy of it)."""
        return find_architecture(model, list(self.facts.targets))

    @property
    def layer_healers(self) -> list[tuple[Any, Any]]:
        """The healers (with their configs) that run in the factor stage's own walk, each layer healed as soon as
        it is factored: the leading healers that work per layer, where nothing between factoring and healing
        needs the whole model. Not with a method's whole-model training (it comes between), sequential calibration
        (its statistics would see the healed layers) or a healing text of its own (other windows)."""
        if not self.heals or self.options.sequential or self.method.training is not None or self.own_heal_text:
            return []
        healers = list(self.options.resolved.heal)
        first_whole = next((i for i, (h, _) in enumerate(healers) if h.layer is None), len(healers))
        return healers[:first_whole]

    @property
    def own_heal_text(self) -> bool:
        """True when the healers train on windows of their own text (``heal_calib``), not the calibration's."""
        return self.heals and self.options.resolved.heal_calibration is not None

    def calibration_record(self) -> dict[str, Any] | None:
        """How the windows and statistics were made, as the saved record keeps it."""
        record = {**self.options.calibration.record(), "sequential": self.options.sequential}
        record = record if self.needs_windows else None
        if self.mode is CalibrationMode.PRECOMPUTED:
            tokens = next(iter(self.statistics.values())).tokens
            record = {"statistics": "precomputed", "tokens": tokens, **(record or {})}
        return record


def make_plan(
    model: nn.Module,
    options: CompressionOptions,
    statistics: Mapping[str, LinearStats] | None = None,
    tokenizer: Any = None,
) -> CompressionPlan:
    """Check `options` against `model` (and the precomputed `statistics`, the `tokenizer`) and plan the run."""
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise SvdkitError("this model is already compressed by svdkit: start from the dense model")
    base_classes(model)  # the result must be savable
    resolved = options.resolved
    arch = find_architecture(model, KV_TARGETS if resolved.kv_only else options.targets)
    facts = ModelFacts(
        arch.layers_path, tuple(arch.targets), arch.shapes(), count_parameters(model), context_length(model)
    )
    return _plan(options, facts, statistics, tokenizer is not None)


def replan(plan: CompressionPlan, **changes: Any) -> CompressionPlan:
    """The plan with some options changed (e.g. another ratio or method options), for the same model.

    The targets stay the plan's: a change of `targets`, or to or from compressing only k/v (ratio 0
    with a kv_ratio), needs the model, so it needs a new plan (:func:`make_plan`).
    """
    options = dataclasses.replace(plan.options, **changes)
    if options.targets != plan.options.targets or options.resolved.kv_only != plan.options.resolved.kv_only:
        raise SvdkitError(
            "replan keeps the plan's targets: for other targets, or to compress only k/v, make a new plan with "
            "make_plan(model, options)"
        )
    return _plan(options, plan.facts, plan.statistics, plan.has_tokenizer)


def _plan(
    options: CompressionOptions,
    facts: ModelFacts,
    statistics: Mapping[str, LinearStats] | None,
    has_tokenizer: bool,
) -> CompressionPlan:
    resolved = options.resolved
    fixed = kv_ranks(facts.shapes, resolved.kv_ratio) if resolved.kv_ratio is not None else {}
    if resolved.kv_ratio is not None and not fixed:
        raise SvdkitError(f"kv_ratio needs k_proj/v_proj among the targets, but the targets are {list(facts.targets)}")
    if resolved.allocator.check is not None:
        config = resolved.allocation_config
        resolved.allocator.check(facts.shapes, config, resolved.method, resolved.method_config, options.rank_multiple)
    needs = statistics_needed(resolved.method, resolved.allocator, options.update, options.sequential)
    if needs and statistics is not None:
        _check_statistics(options, facts, statistics, needs)
    mode = _mode(needs, resolved.allocator, statistics is not None, options.sequential)
    if options.sequential and (mode is not CalibrationMode.SEQUENTIAL or needs & GRADIENT_STATISTICS):
        raise SvdkitError(
            "sequential mode computes each layer's statistics after the layers before it are compressed: it "
            "needs input statistics (a method that uses them, or an update), no gradient statistics and no "
            f"precomputed statistics (here: method '{options.method}', allocation '{options.allocation}', "
            f"update '{options.update}')"
        )
    windows = mode not in (CalibrationMode.NONE, CalibrationMode.PRECOMPUTED)
    windows = windows or resolved.allocator.needs_windows or resolved.method.training is not None
    windows = windows or (bool(resolved.heal) and resolved.heal_calibration is None)  # healing on these windows
    for settings in (options.calibration if windows else None, resolved.heal_calibration):
        if settings is not None:
            _check_text(options, settings, has_tokenizer)
    if windows:
        _check_windows(options, facts)
    if resolved.heal_calibration is not None:
        check_context(resolved.heal_calibration.seqlen, facts.context, "healing windows", "--calib-seqlen")
    return CompressionPlan(options, facts, needs, mode, fixed, statistics if needs else None, windows, has_tokenizer)


def _check_text(options: CompressionOptions, settings: CalibrationSettings, has_tokenizer: bool) -> None:
    """Text (not token ids) needs a tokenizer; healing holds out part of its windows, so needs two."""
    if not has_tokenizer and not isinstance(settings.source, torch.Tensor):
        raise SvdkitError(
            f"method '{options.method}' with allocation '{options.allocation}'"
            f"{' and healing' if options.resolved.heal else ''} needs calibration text: pass a tokenizer or token ids"
        )
    if options.resolved.heal and settings is options.healing_settings and settings.samples < 2:
        raise SvdkitError(
            "healing holds out part of the calibration windows to guard against overfitting: give at least 2 "
            "(--calib-samples, or N in --heal-calib)"
        )


def _check_windows(options: CompressionOptions, facts: ModelFacts) -> None:
    """The calibration windows fit the model's context and serve the method's training."""
    calibration = options.calibration
    check_context(calibration.seqlen, facts.context, "calibration windows", "--calib-seqlen / calib_seqlen")
    stage = options.resolved.method.training
    if stage is not None and stage.check is not None:
        stage.check(options.resolved.method_config, calibration.samples, calibration.seqlen)


def _check_statistics(options, facts: ModelFacts, statistics: Mapping[str, LinearStats], needs) -> None:
    missing = [n for n in facts.shapes if n not in statistics]
    if missing:
        raise SvdkitError(f"the given statistics lack {len(missing)} target(s), e.g. {missing[0]}")
    lacking = sorted(needs - set(statistics[next(iter(facts.shapes))].values))
    if lacking:
        raise SvdkitError(
            f"method '{options.method}' with allocation '{options.allocation}' and update '{options.update}' needs "
            f"statistics {lacking}, which the given ones lack"
        )
