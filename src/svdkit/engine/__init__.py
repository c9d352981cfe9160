"""The layer engine: one walk over the decoder layers that owns their hidden states (:mod:`.walk`), and
what it starts from: layer 0's inputs captured for every window, layers moved to the device and back
(:mod:`.capture`). Calibration, factoring, healing and writing plug into it; it imports none of them."""

from .capture import (
    LayerInputs,
    StandIn,
    capture_layer_inputs,
    captured,
    layer_output,
    move_outside_layers,
    on_device,
    outside_device,
)
from .walk import Hidden, LayerSource, Step, Walked, Work, layer_bounds, walk_back, walk_layers

__all__ = [
    "Hidden",
    "LayerInputs",
    "LayerSource",
    "StandIn",
    "Step",
    "Walked",
    "Work",
    "capture_layer_inputs",
    "captured",
    "layer_bounds",
    "layer_output",
    "move_outside_layers",
    "on_device",
    "outside_device",
    "walk_back",
    "walk_layers",
]
