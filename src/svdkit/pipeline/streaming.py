"""Compress a model folder without ever holding the model: layer by layer from its checkpoint into a
sharded output, resumable after a kill.

The model is built on the meta device (:func:`~svdkit.sources.checkpoint.open_checkpoint`). The
embeddings are loaded to capture the first layer's inputs; then each decoder layer, when its turn comes,
is read from the checkpoint (only its tensors, memory-mapped), calibrated, factored, written as its own
safetensors shard, and freed (:class:`StreamedLayers`). Peak memory is one layer (plus the float64 work
of one matrix) and the calibration activations, whatever the depth. The tensors outside the layers go
from the checkpoint straight to the last shard, then config.json, the index and the tokenizer, and the
folder is renamed into place.

Everything lives meanwhile in a folder beside the output (:class:`Partial`): the settings, the finished
shards, and after each layer the hidden states entering the next one. A run killed at any point (kill -9
included), interrupted, or stopped by a full disk, and started again with the same command and
``resume=True`` continues after the last finished layer and writes the very same bytes as an
uninterrupted run; different settings are refused. Any other error removes the folder.

Streaming serves every compression whose statistics come layer by layer: uniform (or fixed) ranks with
input statistics or none, sequential calibration included, and an allocation that summarizes every
matrix first (``v2``). That one gets a first pass over the checkpoint, layer by layer, that keeps only
the summaries (:class:`ReadLayers`; kept in the partial folder once complete, so a resume skips it; a
kill during it repeats it); the ranks are then fixed and the second pass factors and writes. A
healer that works per layer (``--heal block``) heals each layer as soon as it is factored, with the dense model's
hidden states beside (both kept for a resume), so it streams too. A whole-model
stage (SoCo's training), a whole-model healer (``kd``), an allocation that needs every matrix's statistics
at once (``sensitivity``) and gradient statistics need the whole model: :func:`stream_refusal` says why, and
the caller loads the model whole. So does calibration text the model writes itself (``--calib self``):
generating it runs the whole dense model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import distributed
from ..core.architecture import Architecture
from ..core.atomic import is_io_error
from ..core.disk import io_reason
from ..core.lowrank import densify_
from ..core.modeling_svdkit import swap_in
from ..core.owner import group_owns
from ..core.report import Report
from ..engine import LayerSource
from ..errors import NotStreamable, SvdkitError
from ..heal import DenseReference
from ..saved.folder import write_card, write_metadata
from ..saved.format import make_plain
from ..saved.shards import write_index, write_shard
from ..sources.checkpoint import OpenCheckpoint, materialize, open_checkpoint, release
from ..version import __version__
from .options import CompressionOptions
from .partial import PARTIAL, Partial, partial_path
from .plan import CompressionPlan, make_plan
from .stages import CompressionResult, allocate, factor, read_windows, record, summarize

__all__ = [
    "PARTIAL",
    "NotStreamable",
    "Partial",
    "ReadLayers",
    "StreamedLayers",
    "compress_folder",
    "stream_refusal",
    "partial_path",
]


def stream_refusal(plan: CompressionPlan) -> str | None:
    """Why `plan` cannot stream layer by layer from the checkpoint (None: it can)."""
    if plan.needs_windows and plan.options.calibration.uses_self():
        return "calibration text 'self' is written by the dense model, which a generation pass needs whole in memory"
    if plan.method.training is not None:
        return f"method '{plan.options.method}' trains all layers together after factoring them"
    if plan.heals and (why := _heal_refusal(plan)) is not None:
        return why
    if plan.dense_pass:
        what = f"allocation '{plan.options.allocation}'" if plan.allocator.needs_statistics else "gradient statistics"
        return f"{what} needs every matrix's statistics before the first one is factored"
    return None


def _heal_refusal(plan: CompressionPlan) -> str | None:
    """Why the plan's healing cannot stream (None: every healer heals each layer as it is factored)."""
    if distributed.size() > 1:
        return "healing trains each layer on every calibration window, in one process"
    if plan.options.sequential:
        return "healing after sequential calibration starts once every layer is compressed, the model in memory"
    if plan.own_heal_text:
        return "healing on a text of its own (--heal-calib) walks the whole compressed model a second time"
    whole = [h.name for h, _ in plan.options.resolved.heal[len(plan.layer_healers) :]]
    if whole:
        return f"healing '{whole[0]}' trains the whole model against the dense one, both in memory (block streams)"
    return None


class ReadLayers(LayerSource):
    """Each decoder layer read from the checkpoint before it runs and freed once done (a pass that
    writes nothing)."""

    def __init__(self, opened: OpenCheckpoint, arch: Architecture) -> None:
        self.opened, self.arch = opened, arch

    def load(self, index: int, layer: nn.Module) -> None:
        o = self.opened
        materialize(layer, f"{self.arch.layers_path}.{index}.", o.checkpoint, o.dtype)

    def done(self, index: int, layer: nn.Module, hidden, dense, record) -> None:
        release(layer)


class StreamedLayers(ReadLayers):
    """Each decoder layer read from the checkpoint before it runs; once final, written as shard index + 1,
    the hidden states it produced kept for a resume, and its weights freed."""

    def __init__(self, opened: OpenCheckpoint, arch: Architecture, partial: Partial, densify: bool) -> None:
        super().__init__(opened, arch)
        self.partial, self.densify = partial, densify
        self.start = partial.done
        self.count = len(arch.layers) + 1

    def begin(self, hidden, dense):
        return (hidden, dense) if self.start == 0 else self.partial.load_hidden(dense is not None)

    def records(self) -> list[dict[str, Any]]:
        return list(self.partial.records[: self.start])

    def done(self, index: int, layer: nn.Module, hidden, dense, record) -> None:
        if self.densify:
            densify_(layer)
        prefix = f"{self.arch.layers_path}.{index}."
        if distributed.is_main():  # every process holds the same layer; one writes it
            tensors = {prefix + k: v for k, v in layer.state_dict().items()}
            write_shard(self.partial.path, index + 1, self.count, tensors)
        if hidden:
            self.partial.save_hidden(index + 1, hidden, dense)
        distributed.barrier()  # every process's hidden states are kept before the layer counts as done
        if distributed.is_main():
            self.partial.mark_done(index + 1, [*self.partial.records[:index], record])
        release(layer)


def _settings(plan: CompressionPlan, opened: OpenCheckpoint, densify: bool) -> dict[str, Any]:
    """What must be equal for a resumed run to continue this one."""
    options = {
        f.name: getattr(plan.options, f.name)
        for f in dataclasses.fields(plan.options)
        if f.name not in ("progress", "statistics_dir", "calibration", "resolved", "device")
    }
    return {
        "svdkit": __version__,
        "torch": torch.__version__,
        "source": str(opened.checkpoint.folder.resolve()),
        "checkpoint": opened.checkpoint.fingerprint(),
        "dtype": str(opened.dtype),
        "densify": densify,
        "device": plan.device.type,
        "processes": distributed.size(),
        "options": options,
        "calibration": plan.options.calibration.record(),
    }


def compress_folder(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    options: CompressionOptions,
    dtype: str | torch.dtype = "auto",
    resume: bool = False,
    overwrite: bool = False,
    densify: bool = False,
) -> tuple[CompressionResult, nn.Module]:
    """Compress the model in `folder` into the folder `output`, one decoder layer in memory at a time;
    returns the result and the model's skeleton (on the meta device, low-rank layers swapped in).

    `dtype` ("auto": the checkpoint's own) is what the layers run and are written in; with `densify` each
    layer is written as dense W' = B A. `resume` continues the unfinished run a kill left beside
    `output`; without it such a run is refused unless `overwrite`, which starts over. A plan that cannot
    stream (:func:`stream_refusal`) raises :class:`NotStreamable`. `output`'s lock is held throughout
    (:func:`~svdkit.core.owner.group_owns`).
    """
    with group_owns(output):
        return _compress_folder(folder, output, options, dtype, resume, overwrite, densify)


def _compress_folder(folder, output, options: CompressionOptions, dtype, resume: bool, overwrite: bool, densify: bool):
    start = time.perf_counter()
    opened = open_checkpoint(folder, dtype)
    model, tokenizer = opened.model, opened.tokenizer
    plan = make_plan(model, options, tokenizer=tokenizer)
    reason = stream_refusal(plan)
    if reason is not None:
        raise NotStreamable(reason)
    partial = Partial(Path(output), _settings(plan, opened, densify), resume, overwrite)
    distributed.agree(partial.open)
    partial.read_state()
    try:
        result = _run(plan, opened, partial, densify, start)
        if distributed.is_main():
            partial.finish()
        distributed.barrier()
    except KeyboardInterrupt as e:
        partial.close()
        e.note = (
            f"the finished layers are kept in {partial.path}: the same command with --resume continues"
            if partial.path.is_dir()
            else f"{output} was already complete"
        )
        raise
    except Exception as e:
        if distributed.peer_gone(e):  # a peer is gone: what is finished stays for a resume
            partial.close()
            raise
        if not is_io_error(e):
            _discard(partial)
            raise
        partial.close()  # a full disk: what is finished stays for a resume once there is room
        raise SvdkitError(
            f"could not write {output} ({io_reason(e)}); the finished layers are kept in {partial.path}: make room "
            "(or fix the cause), then the same command with --resume continues"
        ) from e
    except BaseException:
        _discard(partial)
        raise
    return result, model


def _discard(partial: Partial) -> None:
    if distributed.is_main():
        partial.discard()


def _run(
    plan: CompressionPlan, opened: OpenCheckpoint, partial: Partial, densify: bool, start: float
) -> CompressionResult:
    model = opened.model
    arch = plan.architecture(model)
    windows = read_windows(plan, opened.tokenizer)
    t = time.perf_counter()
    allocation = allocate(plan, model, None, windows, _summaries(plan, opened, partial, windows))
    timings = {"allocation": time.perf_counter() - t}
    if not densify:  # the layers a killed run finished: low-rank, as the rest will be
        finished = {f"{arch.layers_path}.{i}." for i in range(partial.done)}
        swap_in(model, {n: k for n, k in allocation.ranks.items() if k is not None and _layer_of(n, arch) in finished})
    timings.update(calibration=0.0, decomposition=0.0)
    healing: dict[str, Report] = {}
    if partial.done < len(arch.layers) or plan.heals:  # healing: its report is made from every layer's record
        if windows is not None:
            materialize(model, "", opened.checkpoint, opened.dtype, _input_side(opened))
        try:
            layers = StreamedLayers(opened, arch, partial, densify)
            keep = DenseReference() if plan.heals else None
            factored = factor(plan, model, allocation.ranks, None, windows, layers, keep)
            timings.update(factored.seconds)
            healing = factored.healing
        finally:
            release(model)
    elapsed = time.perf_counter() - start
    result = record(plan, model, allocation, allocation.ranks, None, timings, elapsed, healing)
    if densify:
        make_plain(model)
    if distributed.is_main():
        keys = opened.outside_keys()
        write_shard(partial.path, 0, len(arch.layers) + 1, opened.checkpoint.read(keys, opened.dtype))
        write_metadata(model, opened.tokenizer, partial.path)
        write_card(model, partial.path, result.params)
        write_index(partial.path, len(arch.layers) + 1)
    return result


def _summaries(
    plan: CompressionPlan, opened: OpenCheckpoint, partial: Partial, windows: torch.Tensor | None
) -> dict[str, torch.Tensor] | None:
    """The allocator's summaries: kept by a killed run, or from a pass over the checkpoint (then kept)."""
    if not plan.summary_pass:
        return None
    kept = partial.load_summaries()
    if kept is not None:
        return kept
    model = opened.model
    materialize(model, "", opened.checkpoint, opened.dtype, _input_side(opened))
    try:
        summaries = summarize(plan, model, None, windows, ReadLayers(opened, plan.architecture(model)))
    finally:
        release(model)
    if distributed.is_main():
        partial.save_summaries(summaries)
    distributed.barrier()
    return summaries


def _layer_of(name: str, arch: Architecture) -> str:
    """The decoder-layer prefix (``model.layers.3.``) of a target's full name."""
    index = name.removeprefix(arch.layers_path + ".").split(".", 1)[0]
    return f"{arch.layers_path}.{index}."


def _input_side(opened: OpenCheckpoint) -> list[str]:
    """State-dict names the forward uses before the first decoder layer: everything outside the layers
    but the output head."""
    head = opened.model.get_output_embeddings()
    skip = {n + "." for n, m in opened.model.named_modules() if m is head and head is not None}
    return [k for k in opened.outside_keys() if not any(k.startswith(s) for s in skip)]
