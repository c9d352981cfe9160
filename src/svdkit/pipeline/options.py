"""What a compression is asked to do, declared once: every option with its default and help text.

:func:`svdkit.compress` takes these as keyword arguments, the ``svdkit compress`` command line builds
its flags from them, and the benchmark grid fills them per cell. Constructing
:class:`CompressionOptions` checks everything that does not need the model (method and allocation
names and options, ratios, the update, the device), so a command fails before any model is loaded;
:func:`~svdkit.pipeline.plan.make_plan` then checks what needs the model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..allocators import Allocator, allocator_names, get_allocator, make_allocation_config
from ..core.device import resolve_device
from ..core.options import UserOptions, boolean, integer, mapping, option, path, string, strings
from ..core.ranks import check_rank_multiple, check_ratio
from ..errors import SvdkitError
from ..heal import parse_heal
from ..methods import Method, get_method, make_config, method_names
from ..saved.kvcache import check_kv_ratio
from ..sources.mixture import SELF, parse_calib, parts_record, spec_counts
from ..sources.text import SOURCES
from .update import UPDATES

__all__ = ["DEFAULT_SAMPLES", "CalibrationSettings", "CompressionOptions", "Resolved"]

DEFAULT_SAMPLES = 32
"""calibration windows when neither the sample count nor the spec's counts say"""


def _source(name: str, v: Any) -> Any:
    """Token ids (an integer tensor) or a calibration spec (:mod:`svdkit.sources.mixture`: names, files, ``self``,
    slices and counts): checked before any model loads."""
    if isinstance(v, torch.Tensor):
        if v.is_floating_point() or v.is_complex() or v.dtype is torch.bool:
            raise ValueError(f"{name} as token ids must be an integer tensor, got {v.dtype}")
        return v
    if not isinstance(v, str | os.PathLike) or not os.fspath(v):
        raise ValueError(f"{name} must be a text file, one of {', '.join(SOURCES)}, self, or token ids, got {v!r}")
    parse_calib(v)
    return v


def _heal_text(name: str, v: Any) -> Any:
    """None (the calibration windows), or the healing text: token ids or a calibration spec."""
    if v is None:
        return v
    if not isinstance(v, str | os.PathLike) or not os.fspath(v):
        return _source(name, v)  # token ids, or a wrong type (the message names the field)
    try:
        return _source(name, v)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _samples(name: str, v: Any) -> Any:
    """None (32, or a mixture's sum of counts: set by :meth:`CalibrationSettings.check`) or a positive integer."""
    return v if v is None else integer(1)(name, v)


@dataclass(frozen=True)
class CalibrationSettings(UserOptions):
    """Where the calibration windows come from (read only when the method or allocation needs them)."""

    WHAT = "calibration"

    source: str | os.PathLike | torch.Tensor = option(
        "demo",
        f"calibration text: SOURCE[[START:END]][:N] parts, comma-separated; SOURCE a text file, one of "
        f"{', '.join(SOURCES)}, or self (text the model writes); [START:END] a token slice to draw from, N the "
        "part's windows, e.g. wikitext2:16,demo:8 (in Python also token ids)",
        _source,
    )
    samples: int = option(
        None, f"calibration windows (default {DEFAULT_SAMPLES}; a mixture: the sum of its parts' N)", _samples
    )
    seqlen: int = option(2048, "tokens per calibration window", integer(2))
    offset: int = option(0, "skip this many tokens first", integer(0))
    seed: int = option(0, "seed of the calibration offsets", integer())

    def check(self) -> None:
        """The sample count: a mixture's sum of counts (a different explicit one is refused), else 32."""
        counts = None if isinstance(self.source, torch.Tensor) else spec_counts(parse_calib(self.source), None)
        total = sum(counts) if counts is not None and None not in counts else None
        if total is not None and self.samples is not None and self.samples != total:
            raise ValueError(
                f"samples is {self.samples}, but the spec '{os.fspath(self.source)}' gives {total} windows in all: "
                "drop --calib-samples / calib_samples or make them agree"
            )
        object.__setattr__(self, "samples", self.samples or total or DEFAULT_SAMPLES)

    def parts(self) -> list[dict[str, Any]]:
        """Each part's source, window count and token range, as the saved record keeps them."""
        if isinstance(self.source, torch.Tensor):
            return [{"source": "token ids", "windows": self.samples, "start": self.offset, "end": None}]
        return parts_record(self.source, self.samples, self.offset)

    def uses_self(self) -> bool:
        """True when a part is text the model writes itself (``self``)."""
        return not isinstance(self.source, torch.Tensor) and any(p.source == SELF for p in parse_calib(self.source))

    def with_text(self, source: str | os.PathLike | torch.Tensor) -> CalibrationSettings:
        """The same windows' settings for another text (its own counts, else this sample count)."""
        try:
            counted = not isinstance(source, torch.Tensor) and spec_counts(parse_calib(source), None) != (None,)
        except ValueError as e:
            raise SvdkitError(f"{self.WHAT}: {e}") from None
        return dataclasses.replace(self, source=source, samples=None if counted else self.samples)

    def record(self) -> dict[str, Any]:
        """The settings as the saved record keeps them (token ids are recorded as such): the spec and its parts."""
        source = "token ids" if isinstance(self.source, torch.Tensor) else os.fspath(self.source)
        return {
            "source": source,
            "samples": self.samples,
            "seqlen": self.seqlen,
            "offset": self.offset,
            "seed": self.seed,
            "parts": self.parts(),
        }


@dataclass(frozen=True)
class Resolved:
    """The options turned into the objects the pipeline runs (set by :meth:`CompressionOptions.check`)."""

    method: Method
    method_config: Any
    allocator: Allocator
    allocation_config: Any
    device: torch.device
    ratio: float
    kv_ratio: float | None
    heal: tuple = ()
    """the healers to run after the method, in order, each with its config: ((Healer, config), ...)"""
    heal_calibration: CalibrationSettings | None = None
    """the healing text's settings (``heal_calib``); None: the healers train on the calibration windows"""

    @property
    def kv_only(self) -> bool:
        """Ratio 0 with a kv_ratio: only k_proj / v_proj are compressed."""
        return self.kv_ratio is not None and self.ratio == 0


def _device(name: str, v: Any) -> Any:
    if v is not None and not isinstance(v, str | torch.device):
        raise ValueError(f"{name} must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


def _calibration(name: str, v: Any) -> Any:
    if not isinstance(v, CalibrationSettings):
        raise ValueError(f"{name} must be a CalibrationSettings, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class CompressionOptions(UserOptions):
    """Everything :func:`svdkit.compress` takes besides the model, the tokenizer and precomputed statistics.

    Frozen: it is checked once, when made; ``dataclasses.replace`` makes a changed copy (checked again).
    """

    method: str = option("svd-llm", "compression method ('svdkit methods' lists them)", string())
    ratio: float = option(0.2, "fraction of each matrix's parameters removed; 0 with a KV-cache ratio: only k/v")
    method_options: Mapping[str, Any] | None = option(None, "method options, e.g. rel_eps=1e-5 or alpha=0.5", mapping())
    allocation: str = option("uniform", "how ranks are spread over the matrices", string())
    allocation_options: Mapping[str, Any] | None = option(
        None, "allocation options, e.g. windows=2, seqlen=256, grid=[0.2,0.4,0.6,0.8], cache=FILE", mapping()
    )
    update: str = option("none", "after truncation, refit each B by least squares on the calibration inputs (lstsq)")
    sequential: bool = option(False, "statistics of each layer from the already-compressed layers before it", boolean())
    kv_ratio: float | None = option(
        None,
        "fix every k_proj/v_proj at the rank that shrinks a latent KV cache by this fraction, e.g. 0.5 (load "
        "with kv_cache='latent' / --kv-cache latent to use it)",
    )
    rank_multiple: int = option(
        8,
        "round the ranks to multiples of this within the same parameter budget, for faster products; "
        "1 keeps the allocation's exact ranks",
    )
    targets: Sequence[str] | None = option(
        None, "compress only projections whose names end with one of these", strings()
    )
    heal: str = option(
        "none",
        "after the method, train the factors back toward the dense model: block (each layer's output), kd "
        "(distillation), or both in order (block,kd)",
        string(),
    )
    heal_options: Mapping[str, Any] | None = option(
        None, "healing options as NAME.KEY, e.g. kd.max_steps=100 or block.lr=1e-4", mapping()
    )
    heal_calib: str | os.PathLike | torch.Tensor | None = option(
        None,
        "the healing text, in the calibration text's grammar (same window length, offset and seed; a single "
        "source without N takes the calibration's sample count); default: the calibration windows",
        _heal_text,
    )
    statistics_dir: str | os.PathLike | None = option(
        None,
        "where the sensitivity allocation and gradient statistics spill every layer's statistics (a temporary "
        "folder inside it, removed afterwards; default: the system's temporary folder)",
        path(),
    )
    device: str | torch.device | None = option("auto", "auto, cpu, cuda or cuda:N", _device)
    progress: bool = option(True, "show progress bars", boolean())
    calibration: CalibrationSettings = dataclasses.field(
        default_factory=CalibrationSettings, metadata={"help": "calibration windows", "check": _calibration}
    )
    resolved: Resolved = dataclasses.field(init=False, repr=False, compare=False)

    def check(self) -> None:
        """Every rule that needs no model, in the order a user meets them; sets :attr:`resolved`."""
        method = get_method(self.method)
        method_config = make_config(method, self.method_options)
        allocator = get_allocator(self.allocation)
        allocation_config = make_allocation_config(allocator, self.allocation_options)
        check_rank_multiple(self.rank_multiple)
        kv_ratio = self.kv_ratio
        if kv_ratio is not None:
            kv_ratio = check_kv_ratio(kv_ratio)
            if method.training is not None:
                raise SvdkitError(f"kv_ratio fixes the k/v ranks, but method '{self.method}' chooses every rank itself")
            if allocator.per_matrix:
                raise SvdkitError(
                    "kv_ratio fixes the k/v ranks after allocation, which would break allocation "
                    f"'{self.allocation}''s budget over all matrices: use the uniform allocation with kv_ratio"
                )
        if allocator.corrects_base and method.base is None:
            based = " or ".join(n for n in method_names() if get_method(n).base is not None)
            raise SvdkitError(
                f"allocation '{self.allocation}' spends a byte budget on corrections to a stored base, which "
                f"method '{self.method}' does not have: use it with method {based}"
            )
        own_ranks = self.allocation == "uniform" or allocator.corrects_base
        if method.ranks is not None and (kv_ratio is not None or not own_ranks):
            budgets = " or ".join(n for n in allocator_names() if get_allocator(n).corrects_base)
            raise SvdkitError(
                f"method '{self.method}' sets every rank itself (its options), so allocation '{self.allocation}' "
                f"or kv_ratio has nothing to choose: drop them (allocation {budgets} spends a byte budget on them)"
            )
        kv_only = kv_ratio is not None and not isinstance(self.ratio, bool) and self.ratio == 0
        if kv_only and self.targets is not None:
            raise SvdkitError("ratio 0 with kv_ratio compresses exactly k_proj/v_proj: do not pass targets")
        ratio = self.ratio if kv_only else check_ratio(self.ratio)
        if self.update not in UPDATES:
            raise SvdkitError(f"unknown update '{self.update}'; known: {', '.join(UPDATES)}")
        heal = tuple(parse_heal(self.heal, self.heal_options))
        if self.heal_calib is not None and not heal:
            raise SvdkitError("heal_calib (--heal-calib) is the healing text: it needs healing (--heal NAMES)")
        text = None if self.heal_calib is None else self.calibration.with_text(self.heal_calib)
        device = resolve_device(self.device)
        resolved = Resolved(method, method_config, allocator, allocation_config, device, ratio, kv_ratio, heal, text)
        object.__setattr__(self, "resolved", resolved)

    @property
    def healing_settings(self) -> CalibrationSettings:
        """The settings of the windows the healers train on: the healing text's (``heal_calib``), else the
        calibration's."""
        return self.resolved.heal_calibration or self.calibration
