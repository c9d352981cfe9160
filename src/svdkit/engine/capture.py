"""What the layer engine (:mod:`.walk`) starts from and moves: the inputs of decoder layer 0 and every
layer's keyword arguments, captured once for all windows; layers moved to the compute device and back.

The inputs of decoder layer 0 are captured for all windows, together with the keyword arguments (masks,
rotary embeddings) the model hands each layer, with stand-ins in place of the layers so no real layer runs
and later windows stop at layer 0 (:func:`capture_layer_inputs`). Activations live on the CPU between
layers, so device memory holds one layer plus one window, whatever the model's size (as in
llm-compressor's sequential pipeline).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.architecture import Architecture
from ..core.compat import CACHE_NAMES
from ..errors import SvdkitError

__all__ = [
    "LayerInputs",
    "StandIn",
    "capture_layer_inputs",
    "captured",
    "layer_output",
    "move_outside_layers",
    "on_device",
    "outside_device",
]


class LayerInputs(NamedTuple):
    """What :func:`capture_layer_inputs` returns: layer 0's input per window, every layer's keyword arguments."""

    hidden: list[torch.Tensor]
    """the input hidden states of decoder layer 0, one per window, on the CPU"""
    kwargs: list[dict]
    """the keyword arguments the model hands each decoder layer (masks, rotary embeddings, ...)"""

    def kwargs_on(self, index: int, device: torch.device) -> dict:
        """Layer `index`'s keyword arguments with their tensors on `device`."""
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.kwargs[index].items()}


class _Captured(Exception):
    pass


class StandIn(nn.Module):
    """Base of the modules that stand in for a decoder layer: attribute reads that the stand-in does not
    answer (e.g. a model's loop asking a layer for its ``attention_type``) fall through to the real layer."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)


class _Recorder(StandIn):
    """Stands in for a decoder layer while inputs are captured: records the call, returns its input.

    Models such as Gemma3 or Qwen2 with sliding windows hand each layer its own mask and rotary
    embeddings, so every layer's keyword arguments are recorded (from the first window; they depend
    only on the window length). The forward stops after the last layer's recorder, so nothing after the
    decoder layers (final norm, head) runs: their weights need not be loaded. Attribute reads fall
    through to the real layer.
    """

    def __init__(self, inner: nn.Module, index: int, state: dict, last: bool) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_last", last)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        state = self._state
        if self._index == 0:
            state["hidden"].append(x.detach().cpu())
        if self._index not in state["kwargs"]:
            kept = {k: v for k, v in kwargs.items() if k not in (*CACHE_NAMES, "past_key_value")}
            state["kwargs"][self._index] = {**kept, "use_cache": False}
        if (self._index == 0 and state["done_first"]) or self._last:
            raise _Captured
        return x


def move_outside_layers(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder layers to `device`."""
    prefix = layers_path + "."
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(prefix):
            continue
        for p in mod._parameters.values():
            if p is not None and p.device != device and not p.is_meta:  # meta: not loaded (a streamed model)
                p.data = p.data.to(device)
        for key, b in list(mod._buffers.items()):
            if b is not None and b.device != device and not b.is_meta:
                mod._buffers[key] = b.to(device)


def outside_device(model: nn.Module, arch: Architecture, default: torch.device) -> torch.device:
    """Where the parameters outside the decoder layers (embeddings, head) are now; `default` if none."""
    prefix = arch.layers_path + "."
    found = (p.device for n, p in model.named_parameters() if not n.startswith(prefix) and not p.is_meta)
    return next(found, default)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device, progress: bool = True
) -> LayerInputs:
    """Inputs of decoder layer 0 for each window (on the CPU), and every layer's keyword arguments.

    The decoder layers are replaced by recorders: the first window runs through all of them (identity
    layers, so no real layer runs), later windows stop at layer 0. A 1-D window is one sequence; a 2-D
    block of windows runs as one batch. The parts outside the layers are left on `device`; only those
    the model runs before its first decoder layer (the embeddings) need real weights.
    """
    move_outside_layers(model, arch.layers_path, device)
    state: dict = {"hidden": [], "kwargs": {}, "done_first": False}
    real = list(arch.layers)
    for i, layer in enumerate(real):
        arch.layers[i] = _Recorder(layer, i, state, i == len(real) - 1)
    try:
        for ids in tqdm(windows, desc="capturing inputs", unit="window", disable=not progress, leave=False):
            try:
                model(input_ids=(ids if ids.dim() == 2 else ids[None]).to(device), use_cache=False)
            except _Captured:
                pass
            state["done_first"] = True
    finally:
        for i, layer in enumerate(real):
            arch.layers[i] = layer
    missing = [i for i in range(len(real)) if i not in state["kwargs"]]
    if missing:
        raise SvdkitError(f"decoder layers {missing} were never called by the model's forward: unsupported")
    return LayerInputs(state["hidden"], [state["kwargs"][i] for i in range(len(real))])


@contextmanager
def on_device(layer: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Move a decoder layer to `device` for the block, and back to where it was, even on error."""
    home = next(layer.parameters()).device
    layer.to(device)
    try:
        yield layer
    finally:
        layer.to(home)


def layer_output(
    layer: nn.Module, x: torch.Tensor, kwargs: dict, device: torch.device, keep: bool = False
) -> torch.Tensor:
    """The layer's output hidden state for input `x`, computed on `device`, returned on the CPU (`keep`: left
    on `device`, in the autograd graph when gradients are on)."""
    out = layer(x.to(device), **kwargs)
    out = out[0] if isinstance(out, tuple | list) else out
    return out if keep else out.cpu()


@contextmanager
def captured(
    model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device, progress: bool = True
) -> Iterator[LayerInputs]:
    """Layer 0's inputs for `windows` (:func:`capture_layer_inputs`); the parts outside the decoder layers stay
    on `device` for the block and go back where they were afterwards, even on error."""
    home = outside_device(model, arch, device)
    try:
        yield capture_layer_inputs(model, arch, windows, device, progress)
    finally:
        move_outside_layers(model, arch.layers_path, home)
