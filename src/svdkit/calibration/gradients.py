"""Gradient statistics: the Fisher information of every target weight, one decoder layer at a time.

FWSVD needs F_ij = mean over calibration windows of (dL/dW_ij)^2 for the next-token loss L, summed per
output row. Backpropagating through the whole model at once would hold every layer's activations;
instead each window runs forward layer by layer without gradients, keeping only the layer boundaries
(on the CPU: L + 1 tensors of seqlen x hidden, 141 MB for SmolLM2-135M at 2048 tokens), then the head's
gradient is taken and each layer is recomputed with gradients, top to bottom, to pass the gradient down
(gradient checkpointing at layer granularity). Device memory holds one layer, its activations for one
window and the head's logits; the cost is about four forward passes per window.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.architecture import Architecture
from ..engine import (
    StandIn,
    Step,
    capture_layer_inputs,
    layer_bounds,
    move_outside_layers,
    outside_device,
    walk_back,
)

__all__ = ["GRADIENT_COLLECTORS", "GRADIENT_STATISTICS", "collect_fisher", "head_loss", "loss_from_layer"]

GRADIENT_STATISTICS = frozenset({"fisher"})
"""statistics that need a backward pass (per output row of a weight), not input hooks"""


class _Inject(StandIn):
    """Stands in for a decoder layer: the first one returns a given hidden state, the rest pass it on."""

    def __init__(self, inner: nn.Module, hidden: torch.Tensor | None) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_hidden", hidden)

    def forward(self, *args, **kwargs):
        hidden = object.__getattribute__(self, "_hidden")
        return hidden if hidden is not None else (args[0] if args else kwargs["hidden_states"])


def loss_from_layer(
    model: nn.Module, arch: Architecture, ids: torch.Tensor, start: int, hidden: torch.Tensor | None
) -> torch.Tensor:
    """The model's next-token loss on `ids` (batch x seqlen) when decoder layer `start` receives `hidden`.

    Layers before `start` are replaced by stand-ins (the first returns `hidden`, the others pass it on),
    so the model's own code runs everything else: the masks and rotary embeddings it hands the real
    layers, the final norm, the output head, any logit soft-capping, and its loss. With start = 0 this
    is the ordinary forward; with start = len(layers) only the head runs.
    """
    real = list(arch.layers)
    for i in range(start):
        arch.layers[i] = _Inject(real[i], hidden if i == 0 else None)
    try:
        ids = ids.to(next(model.parameters()).device if hidden is None else hidden.device)
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    finally:
        for i in range(start):
            arch.layers[i] = real[i]


def head_loss(model: nn.Module, arch: Architecture, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's next-token loss on `ids` when the last decoder layer outputs `hidden`."""
    return loss_from_layer(model, arch, ids, len(arch.layers), hidden)


def collect_fisher(
    model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Row Fisher information I_i = mean over windows of sum_j (dL/dW_ij)^2 per target, by full name.

    One window at a time (its loss is the mean next-token NLL over the window). Returns float64 CPU
    vectors of length out_features. The model's parameters keep their requires_grad flags.
    """
    outside_home = outside_device(model, arch, device)
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}  # put back as they were, whatever happens
    fisher: dict[str, torch.Tensor] = {}

    def backward(step: Step, grad: torch.Tensor) -> torch.Tensor | None:
        return _backward(step, grad, arch.targets, fisher)

    bar = tqdm(total=len(windows), desc="fisher (gradient pass)", unit="window", disable=not progress)
    try:
        inputs = capture_layer_inputs(model, arch, windows, device, progress)
        for p in flags:
            p.grad = None  # saved above: backward must not accumulate into a user's gradient
            p.requires_grad_(False)
        for w, x0 in enumerate(inputs.hidden):
            bounds = layer_bounds(arch, inputs, x0, device)
            with torch.enable_grad():
                top = bounds[-1].to(device).requires_grad_(True)
                head_loss(model, arch, windows[w][None], top).backward()
                walk_back(
                    arch, inputs, bounds, top.grad, device, lambda step, g: _backward(step, g, arch.targets, fisher)
                )
            bar.update(1)
    finally:
        bar.close()
        for p, flag in flags.items():
            p.grad = grads[p]
            p.requires_grad_(flag)
        move_outside_layers(model, arch.layers_path, outside_home)
    return {name: v / len(inputs.hidden) for name, v in fisher.items()}


def _backward(step: Step, grad: torch.Tensor, targets: list[str], fisher: dict) -> torch.Tensor | None:
    """Recompute the step's layer on its input with gradients, pass `grad` back through it, add each target
    weight's squared row gradients to `fisher`; returns the gradient at the layer's input."""
    layer = step.layer
    weights = {t: layer.get_submodule(t).weight for t in targets}
    for p in weights.values():
        p.requires_grad_(True)
    x = step.hidden[0].to(step.device).requires_grad_(step.index > 0)
    out = layer(x, **step.kwargs)
    (out[0] if isinstance(out, tuple | list) else out).backward(grad)
    for t, p in weights.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        rows = g.double().pow(2).sum(1).cpu()
        name = step.name + t
        fisher[name] = rows if name not in fisher else fisher[name].add_(rows)
        p.grad = None
        p.requires_grad_(False)
    return x.grad


GRADIENT_COLLECTORS = {"fisher": collect_fisher}
"""each gradient statistic's pass: (model, arch, windows, device, progress) -> {full target name: per-row values}"""
