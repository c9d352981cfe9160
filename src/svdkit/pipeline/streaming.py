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
healer that works per layer (``--heal block``) heals each layer as soon as it is factored, on a second
stream of hidden states (the dense model's; both kept for a resume), so it streams too. A whole-model
stage (SoCo's training), a whole-model healer (``kd``), an allocation that needs every matrix's statistics
at once (``sensitivity``) and gradient statistics need the whole model: :func:`stream_refusal` says why, and
the caller loads the model whole. So does calibration text the model writes itself (``--calib self``):
generating it runs the whole dense model.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import distributed
from ..core.architecture import Architecture
from ..core.disk import io_reason
from ..core.lowrank import densify_
from ..engine import LayerSource
from ..errors import NotStreamable, SvdkitError
from ..heal import DenseReference
from ..saved.folder import install, is_io_error, write_card, write_metadata
from ..saved.format import make_plain
from ..saved.modeling_svdkit import swap_in
from ..saved.shards import write_index, write_shard
from ..sources.checkpoint import OpenCheckpoint, materialize, open_checkpoint, release
from ..version import __version__
from .options import CompressionOptions
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

PARTIAL = ".svdkit-partial"
"""suffix of the folder beside the output where a streamed run keeps its finished layers"""
SUMMARIES = "summaries.safetensors"
"""the allocator's summaries of every matrix, in the partial folder"""


def partial_path(output: Path) -> Path:
    """Where a streamed compression into `output` keeps its finished work: ``.NAME.svdkit-partial`` beside it."""
    return output.parent / f".{output.name}{PARTIAL}"


def stream_refusal(plan: CompressionPlan) -> str | None:
    """Why `plan` cannot stream layer by layer from the checkpoint (None: it can)."""
    if plan.needs_windows and plan.options.calibration.uses_self():
        return "calibration text 'self' is written by the dense model, which a generation pass needs whole in memory"
    if plan.method.stage is not None:
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


class Partial:
    """The folder beside the output where a streamed compression keeps its settings, finished shards and
    the hidden states entering the next layer; locked while a process works in it."""

    def __init__(self, output: Path, settings: dict[str, Any], resume: bool, overwrite: bool) -> None:
        self.output, self.path = output, partial_path(output)
        self.settings = json.loads(json.dumps(settings, default=str))
        self.resume, self.overwrite = resume, overwrite
        self.done = 0
        self.records: list[dict[str, Any]] = []
        """what the walk's work recorded about each finished layer"""
        self._lock = None

    def open(self) -> Partial:
        """Create the folder, or check and lock the one a killed run left (with resume)."""
        if self.path.is_dir() and not self.resume:
            if not self.overwrite:
                raise SvdkitError(
                    f"an unfinished compression into {self.output} is kept in {self.path}: add --resume to continue "
                    "it (same command), or --overwrite to start over"
                )
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / "lock", "a")  # noqa: SIM115 - held until close
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock.close()
            raise SvdkitError(f"another svdkit process is compressing into {self.path}: wait for it") from e
        self._check_settings()
        return self

    def read_state(self) -> Partial:
        """Read how many layers are finished and their records (every process, after :meth:`open` on rank 0)."""
        state = self.path / "state.json"
        kept = json.loads(state.read_text()) if state.is_file() else {}
        self.done, self.records = kept.get("layers_done", 0), kept.get("records", [])
        return self

    def _check_settings(self) -> None:
        path = self.path / "settings.json"
        if path.is_file():
            kept = json.loads(path.read_text())
            changed = sorted(k for k in set(kept) | set(self.settings) if kept.get(k) != self.settings.get(k))
            if changed:
                raise SvdkitError(
                    f"--resume: the unfinished run in {self.path} was started with other settings "
                    f"({', '.join(changed)} differ): run the same command as before, or pass --overwrite without "
                    "--resume to start over"
                )
            return
        for stale in self.path.iterdir():  # files of a run whose settings never got written
            if stale.name != "lock":
                stale.unlink()
        _write_atomic(path, json.dumps(self.settings, indent=2, sort_keys=True))

    def save_hidden(self, index: int, hidden: list[torch.Tensor], dense: list[torch.Tensor] | None) -> None:
        """Keep the hidden states entering layer `index` (and the dense stream's)."""
        tensors = {f"hidden.{i}": h.contiguous() for i, h in enumerate(hidden)}
        tensors.update({f"dense.{i}": h.contiguous() for i, h in enumerate(dense or [])})
        path = self.path / f"hidden-{index}-{distributed.rank()}.safetensors"  # each process its own windows
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)

    def load_hidden(self, two_streams: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The hidden states entering the first unfinished layer."""
        tensors = load_file(str(self.path / f"hidden-{self.done}-{distributed.rank()}.safetensors"))
        hidden = [tensors[f"hidden.{i}"] for i in range(sum(k.startswith("hidden.") for k in tensors))]
        dense = [tensors[f"dense.{i}"] for i in range(sum(k.startswith("dense.") for k in tensors))]
        return hidden, (dense if two_streams else None)

    def save_summaries(self, summaries: dict[str, torch.Tensor]) -> None:
        """Keep the allocator's finished summaries (tensors by target name)."""
        path = self.path / SUMMARIES
        partial = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in summaries.items()}, str(partial))
        os.replace(partial, path)

    def load_summaries(self) -> dict[str, torch.Tensor] | None:
        """The summaries a killed run finished, or None."""
        path = self.path / SUMMARIES
        return load_file(str(path)) if path.is_file() else None

    def mark_done(self, layers: int, records: list[dict[str, Any]]) -> None:
        """Record that the first `layers` layers are written (with their records); drop the hidden states no
        longer needed."""
        _write_atomic(self.path / "state.json", json.dumps({"layers_done": layers, "records": records}))
        self.done, self.records = layers, records
        for old in self.path.glob("hidden-*.safetensors"):
            if not old.name.startswith(f"hidden-{layers}-"):
                old.unlink()

    def finish(self) -> None:
        """Drop the resume files and rename the folder into the output's place."""
        for name in ("settings.json", "state.json", SUMMARIES, "lock"):
            (self.path / name).unlink(missing_ok=True)
        for old in [*self.path.glob("hidden-*"), *self.path.glob("*.partial")]:  # a killed write's leftovers
            old.unlink()
        self.close()
        install(self.path, self.output)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text + "\n")
    os.replace(partial, path)


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
    stream (:func:`stream_refusal`) raises :class:`NotStreamable`.
    """
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
        e.note = f"the finished layers are kept in {partial.path}: the same command with --resume continues"
        raise
    except Exception as e:
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
    healing: dict[str, dict] = {}
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
    result = record(plan, model, allocation, allocation.ranks, {}, timings, elapsed, healing)
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
