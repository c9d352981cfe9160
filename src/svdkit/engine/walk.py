"""The layer engine: the one walk over a model's decoder layers, in order, that every per-layer pass uses.

:func:`walk_layers` owns the order of the layers, their hidden states (those of the model as the walk changes
it and, where the work needs them, the dense model's beside), the device moves, the progress bar and the
resume point.
What happens to a layer is plugged in:

- a :class:`LayerSource` says where the layers come from and go to: ``load`` before a layer runs (a
  streamed checkpoint reads its weights), ``done`` once it is final with the hidden states it produced
  (a streamed compression writes its shard and keeps them for a resume), ``start`` and ``begin`` where a
  resumed walk starts; the base class keeps a model in memory as it is;
- the *work*, callables of a :class:`Step`, run in order while the layer is on the compute device with
  its inputs ready: collecting statistics and factoring (:mod:`svdkit.calibration.collect`), block
  healing (:mod:`svdkit.heal.block`), keeping every layer's input (:func:`layer_bounds`).

After the work the layer is final: the next layer's inputs are its outputs on this layer's inputs, unless
the work set them (statistics collected from the dense layer set its outputs before it is factored); where
the walk keeps the dense hidden states, the work sets their next ones (:attr:`Step.next_dense`). Activations
live on the CPU between layers, so memory is one layer plus the activations, whatever the depth; after each
layer the heap's free pages go back to the operating system (:func:`~svdkit.core.memory.trim_heap`), or
glibc's malloc would keep what each layer freed and resident memory would grow with depth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.architecture import Architecture
from ..core.memory import trim_heap
from .capture import LayerInputs, layer_output, on_device

__all__ = ["Hidden", "LayerSource", "Step", "Walked", "Work", "layer_bounds", "walk_back", "walk_layers"]

Hidden = list[torch.Tensor]
"""one hidden state per window (or batch of windows), on the CPU"""


class LayerSource:
    """Where a walk's decoder layers come from and go to; this base keeps them in memory as they are.

    A streamed compression (:mod:`svdkit.pipeline.streaming`) loads each layer's weights from the
    checkpoint when its turn comes (:meth:`load`), writes and frees it once it is done (:meth:`done`),
    and may start at a later layer (:attr:`start`) with the hidden states a killed run kept (:meth:`begin`).
    """

    start: int = 0
    """the first layer the walk runs; the layers before it are finished"""

    def begin(self, hidden: Hidden, dense: Hidden | None) -> tuple[Hidden, Hidden | None]:
        """The hidden states entering layer :attr:`start` (and the dense ones), given layer 0's."""
        return hidden, dense

    def load(self, index: int, layer: nn.Module) -> None:
        """Called before layer `index` runs."""

    def records(self) -> list[dict[str, Any]]:
        """The records of the layers before :attr:`start` (a resumed walk's), in order."""
        return []

    def done(self, index: int, layer: nn.Module, hidden: Hidden, dense: Hidden | None, record: dict[str, Any]) -> None:
        """Called once layer `index` is final, with the hidden states it produced (the next layer's inputs) and
        what the work recorded about it."""


@dataclass(eq=False)
class Step:
    """One decoder layer's turn: what the work sees, and what it may set."""

    index: int
    layer: nn.Module
    """the decoder layer, on the compute device; the work may replace its modules"""
    name: str
    """the layer's module name with a trailing dot (``model.layers.3.``), the prefix of its targets' names"""
    kwargs: dict
    """the keyword arguments the model hands this layer (masks, rotary embeddings), on the device"""
    device: torch.device
    hidden: Hidden | None
    """this layer's inputs in the model as the walk has changed it so far (None: a walk without activations)"""
    dense: Hidden | None = None
    """the dense model's inputs to this layer (a walk that keeps them)"""
    next_hidden: Hidden | None = None
    """the next layer's inputs, where the work computed them (else the final layer's outputs on `hidden`)"""
    next_dense: Hidden | None = None
    """the dense hidden states' next inputs: the work of a walk that keeps them sets them"""
    record: dict[str, Any] = field(default_factory=dict)
    """what the work keeps about this layer (JSON-able, by the work's name): the walk returns every layer's, and
    a resumed walk gets back those of the layers finished before"""
    postfix: dict[str, str] = field(default_factory=dict)
    """shown on the progress bar after the layer"""

    def outputs(self, xs: Hidden, layer: nn.Module | None = None) -> Hidden:
        """The outputs of `layer` (default: this step's, as it is now) for the inputs `xs`, on the CPU."""
        layer = self.layer if layer is None else layer
        return [layer_output(layer, x, self.kwargs, self.device) for x in xs]


Work = Callable[[Step], None]
"""per-layer work: called with each layer's :class:`Step`, in order"""


@dataclass
class Walked:
    """What :func:`walk_layers` returns."""

    hidden: Hidden | None
    """the last layer's outputs"""
    dense: Hidden | None
    """the dense hidden states' (a walk that keeps them)"""
    records: list[dict[str, Any]]
    """every layer's :attr:`Step.record`, in order"""


@torch.no_grad()
def walk_layers(
    arch: Architecture,
    device: torch.device,
    work: Sequence[Work],
    inputs: LayerInputs | None = None,
    hidden: Hidden | None = None,
    keep_dense: bool = False,
    source: LayerSource | None = None,
    progress: bool = True,
    desc: str = "layers",
) -> Walked:
    """Run `work` on every decoder layer in order; the last layer's outputs (and the dense ones), and what
    the work recorded about each layer.

    `inputs` (:func:`~.capture.capture_layer_inputs`) gives every layer's keyword arguments and layer 0's
    inputs (`hidden` replaces them, e.g. one window of them); without it the walk runs no layer (the work
    sees ``step.hidden`` None and the layers stay where they are). `keep_dense` starts the dense hidden states as a
    copy of the first. Gradients are off; work that trains turns them on for itself.
    """
    source = source or LayerSource()
    dense, records = None, source.records()
    if inputs is not None:
        hidden = inputs.hidden if hidden is None else hidden
        hidden, dense = source.begin(hidden, list(hidden) if keep_dense else None)
    bar = tqdm(total=len(arch.layers), desc=desc, unit="layer", disable=not progress)
    bar.update(source.start)
    try:
        for index, layer in enumerate(arch.layers):
            if index < source.start:
                continue
            source.load(index, layer)
            kwargs = inputs.kwargs_on(index, device) if inputs is not None else {}
            step = Step(index, layer, f"{arch.layers_path}.{index}.", kwargs, device, hidden, dense)
            with on_device(layer, device) if inputs is not None else nullcontext():
                for run in work:
                    run(step)
                hidden, dense = _next(step)
            postfix, record, step = step.postfix, step.record, None  # its inputs go before the next layer loads
            records.append(record)
            source.done(index, layer, hidden or [], dense, record)
            trim_heap()
            bar.update(1)
            if postfix:
                bar.set_postfix(postfix)
    finally:
        bar.close()
    return Walked(hidden, dense, records)


def _next(step: Step) -> tuple[Hidden | None, Hidden | None]:
    """The next layer's inputs once the work is done (and the dense ones)."""
    if step.dense is not None and step.next_dense is None:
        raise RuntimeError("a walk that keeps the dense hidden states needs its work to set step.next_dense")
    if step.next_hidden is not None or step.hidden is None:
        return step.next_hidden, step.next_dense
    return step.outputs(step.hidden), step.next_dense


def layer_bounds(arch: Architecture, inputs: LayerInputs, x: torch.Tensor, device: torch.device) -> Hidden:
    """Every decoder layer's input for the hidden state `x` of layer 0, then the last layer's output (CPU).

    `inputs` gives each layer's keyword arguments (from :func:`~.capture.capture_layer_inputs`); each layer
    runs on `device` alone.
    """
    bounds: Hidden = []
    walked = walk_layers(arch, device, [lambda step: bounds.append(step.hidden[0])], inputs, [x], progress=False)
    return bounds + walked.hidden


def walk_back(
    arch: Architecture,
    inputs: LayerInputs,
    bounds: Hidden,
    grad: torch.Tensor,
    device: torch.device,
    work: Callable[[Step, torch.Tensor], torch.Tensor | None],
) -> torch.Tensor | None:
    """The layers from the last to the first, each on `device`: ``work(step, grad)`` gets layer i with its input
    ``bounds[i]`` (:func:`layer_bounds`; ``step.hidden``, one tensor) and the gradient at its output, and returns
    the gradient at its input, which goes to the layer below (backpropagation with the activations recomputed
    layer by layer, :mod:`svdkit.calibration.gradients`). Gradients are the caller's to turn on."""
    for index in reversed(range(len(arch.layers))):
        layer = arch.layers[index]
        with on_device(layer, device):
            kwargs = inputs.kwargs_on(index, device)
            grad = work(Step(index, layer, f"{arch.layers_path}.{index}.", kwargs, device, [bounds[index]]), grad)
    return grad
