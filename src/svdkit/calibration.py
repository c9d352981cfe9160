"""Layer-by-layer calibration: statistics of every target linear's inputs, one decoder layer at a time.

The inputs of decoder layer 0 are captured for all calibration windows (the rest of the model is
stopped there), then each layer in turn is moved to the compute device, run on every window with hooks
on its target linears, and moved back. Activations live on the CPU between layers, so device memory
holds one layer plus one window, whatever the model's size (as in llm-compressor's sequential pipeline).

Linears fed the very same tensor (q/k/v, gate/up) share one accumulator, so each Gram matrix is
computed once. :func:`iterate_layers` yields each layer with its finished statistics; the caller may
replace modules in that layer before the generator resumes. By default the next layer's inputs are the
dense layer's outputs; with ``sequential=True`` they are recomputed through the modified layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .models import Architecture
from .statistics import STATISTICS, LinearStats, Statistic

__all__ = ["LayerStats", "capture_layer_inputs", "collect_statistics", "iterate_layers", "move_outside_layers"]


@dataclass
class LayerStats:
    """What :func:`iterate_layers` yields: a decoder layer and its targets' statistics."""

    index: int
    layer: nn.Module
    stats: dict[str, LinearStats]
    """target name relative to the layer (e.g. 'self_attn.q_proj') -> statistics"""


class _Captured(Exception):
    pass


def move_outside_layers(model: nn.Module, layers_path: str, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the decoder layers to `device`."""
    prefix = layers_path + "."
    for name, mod in model.named_modules():
        if name == layers_path or name.startswith(prefix):
            continue
        for p in mod._parameters.values():
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for key, b in list(mod._buffers.items()):
            if b is not None and b.device != device:
                mod._buffers[key] = b.to(device)


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, arch: Architecture, windows: torch.Tensor, device: torch.device, progress: bool = True
) -> tuple[list[torch.Tensor], dict]:
    """Run the model up to decoder layer 0 for each window; return its inputs (on the CPU) and kwargs."""
    move_outside_layers(model, arch.layers_path, device)
    hidden: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(x.detach().cpu())
        if not kwargs_seen:
            kwargs_seen.update(kwargs)
        raise _Captured

    handle = arch.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in tqdm(windows, desc="capturing inputs", unit="window", disable=not progress, leave=False):
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    kwargs_seen["use_cache"] = False
    return hidden, kwargs_seen


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class _Collector:
    """Hooks on one layer's target linears that feed each distinct input once into shared statistics."""

    def __init__(self, layer: nn.Module, targets: list[str], needs: Iterable[str]) -> None:
        self.layer, self.targets, self.needs = layer, targets, sorted(needs)
        self.owner: dict[str, str] = {}  # target -> the target whose accumulator it shares
        self.acc: dict[str, dict[str, Statistic]] = {}
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [layer.get_submodule(t).register_forward_pre_hook(self._hook(t)) for t in targets]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.owner:  # first window: find which targets read the same tensor
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                first, _ = self._seen.setdefault(key, (name, x))  # holding x keeps its address unique
                self.owner[name] = first
                if first == name:
                    self.acc[name] = {s: STATISTICS[s](x.shape[-1]) for s in self.needs}
            if self.owner[name] == name:
                for stat in self.acc[name].values():
                    stat.update(x.detach())

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def finish(self, prefix: str = "") -> dict[str, LinearStats]:
        """Finished statistics per target; targets that read the same input share one values dict."""
        values = {owner: {s: a.value() for s, a in acc.items()} for owner, acc in self.acc.items()}
        out = {}
        for t in self.targets:
            acc = self.acc[self.owner[t]]
            tokens = next(iter(acc.values())).tokens if acc else 0
            out[t] = LinearStats(values[self.owner[t]], tokens, module=prefix + t)
        return out


@torch.no_grad()
def iterate_layers(
    model: nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    needs: Iterable[str],
    device: torch.device,
    sequential: bool = False,
    progress: bool = True,
) -> Iterator[LayerStats]:
    """Yield every decoder layer (on `device`) with its targets' statistics, in order.

    The caller may swap modules inside ``item.layer`` before asking for the next item. The layer
    goes back to its original device afterwards.
    """
    prefix = arch.layers_path + "."
    outside_home = next((p.device for n, p in model.named_parameters() if not n.startswith(prefix)), device)
    hidden, kwargs = capture_layer_inputs(model, arch, windows, device, progress)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    bar = tqdm(total=len(arch.layers), desc="calibrating layers", unit="layer", disable=not progress)
    try:
        for index, layer in enumerate(arch.layers):
            home = next(layer.parameters()).device
            layer.to(device)
            collector = _Collector(layer, arch.targets, needs)
            outputs = []
            try:
                for x in hidden:
                    y = _layer_output(layer(x.to(device), **kwargs))
                    if not sequential:
                        outputs.append(y.cpu())
            finally:
                collector.remove()
            stats = collector.finish(f"{arch.layers_path}.{index}.")
            item = LayerStats(index, layer, stats)
            yield item
            if sequential:
                outputs = [_layer_output(item.layer(x.to(device), **kwargs)).cpu() for x in hidden]
            hidden = outputs
            layer.to(home)
            bar.update(1)
    finally:
        bar.close()
        move_outside_layers(model, arch.layers_path, outside_home)


def collect_statistics(
    model: nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    needs: Iterable[str],
    device: torch.device,
    progress: bool = True,
) -> dict[str, LinearStats]:
    """Every target's statistics from the dense model, by full module name, kept in CPU memory.

    Costs one n x n float64 Gram matrix per distinct input (shared by q/k/v and by gate/up): for
    SmolLM2-135M about 27 MB per layer. Lets several compressions (methods, ratios) reuse one pass.
    """
    out: dict[str, LinearStats] = {}
    for item in iterate_layers(model, arch, windows, needs, device, sequential=False, progress=progress):
        for name, st in item.stats.items():
            out[f"{arch.layers_path}.{item.index}.{name}"] = st
    return out
