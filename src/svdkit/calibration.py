"""Layer-by-layer calibration: statistics of every target linear's inputs, one decoder layer at a time.

The inputs of decoder layer 0 are captured for all calibration windows, together with the keyword
arguments (masks, rotary embeddings) the model hands each layer, with stand-ins in place of the layers
so no real layer runs and later windows stop at layer 0. Then each layer in turn is moved to the
compute device, run on every window with hooks on its target linears, and moved back. Activations
live on the CPU between layers, so device memory holds one layer plus one window, whatever the
model's size (as in llm-compressor's sequential pipeline).

Linears fed the very same tensor (q/k/v, gate/up) share one accumulator, so each Gram matrix is
computed once. :func:`iterate_layers` yields each layer with its finished statistics; the caller may
replace modules in that layer before the generator resumes. By default the next layer's inputs are the
dense layer's outputs; with ``sequential=True`` every input (within a layer too) is recomputed through
the modules modified so far.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .compat import CACHE_NAMES
from .errors import SvdkitError
from .models import Architecture
from .statistics import STATISTICS, LinearStats, Statistic
from .store import StatisticsStore

CROSS = "cross"
"""dense inputs against compressed inputs, sum x_dense x^T (two-stream sequential calibration only)"""

__all__ = [
    "CROSS",
    "LayerStats",
    "StandIn",
    "capture_layer_inputs",
    "collect_statistics",
    "iterate_layers",
    "move_outside_layers",
]


@dataclass
class LayerStats:
    """What :func:`iterate_layers` yields: a decoder layer and its targets' statistics."""

    index: int
    layer: nn.Module
    stats: dict[str, LinearStats]
    """target name relative to the layer (e.g. 'self_attn.q_proj') -> statistics"""


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
    only on the window length). Attribute reads fall through to the real layer.
    """

    def __init__(self, inner: nn.Module, index: int, state: dict) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_state", state)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        state = self._state
        if self._index == 0:
            state["hidden"].append(x.detach().cpu())
        if self._index not in state["kwargs"]:
            kept = {k: v for k, v in kwargs.items() if k not in (*CACHE_NAMES, "past_key_value")}
            state["kwargs"][self._index] = {**kept, "use_cache": False}
        if self._index == 0 and state["done_first"]:
            raise _Captured
        return x


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
) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs of decoder layer 0 for each window (on the CPU), and every layer's keyword arguments.

    The decoder layers are replaced by recorders: the first window runs through all of them (identity
    layers, so no real layer runs), later windows stop at layer 0.
    """
    move_outside_layers(model, arch.layers_path, device)
    state: dict = {"hidden": [], "kwargs": {}, "done_first": False}
    real = list(arch.layers)
    for i, layer in enumerate(real):
        arch.layers[i] = _Recorder(layer, i, state)
    try:
        for ids in tqdm(windows, desc="capturing inputs", unit="window", disable=not progress, leave=False):
            try:  # a 1-D window is one sequence; a 2-D block of windows runs as one batch
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
    return state["hidden"], [state["kwargs"][i] for i in range(len(real))]


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class _Cross(Statistic):
    """Sum over tokens of x_dense x^T (n x n, float64): the dense layer's inputs against the compressed
    model's inputs for the same tokens (sequential calibration; see :mod:`svdkit.update`)."""

    name = CROSS

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.total: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None  # the current window's dense inputs, set before update

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.n).float()
        c = (self.dense.reshape(-1, self.n).float().T @ x).double()
        self.total = c if self.total is None else self.total.add_(c)
        self.tokens += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.total.cpu()


_ACCUMULATORS: dict[str, type[Statistic]] = {**STATISTICS, CROSS: _Cross}


class _Stop(Exception):
    """Raised by a staged collector's hook once the layer's forward has passed the input it collects."""


class _Collector:
    """Hooks on one layer's target linears that feed each distinct input once into shared statistics.

    Staged (sequential calibration): only the first distinct input the forward reaches among the hooked
    targets is collected (the ``group``: q/k/v, or o, or gate/up, or down), and the forward stops at
    the next one. With ``record=True`` the hooks only keep each group input (the dense stream); a
    collector whose ``dense`` is such a recorder also accumulates the cross statistic against it.
    """

    def __init__(
        self, layer: nn.Module, targets: list[str], needs: Iterable[str], staged: bool = False, record: bool = False
    ) -> None:
        self.layer, self.targets, self.needs = layer, list(targets), sorted(needs)
        self.staged, self.record = staged, record
        self.owner: dict[str, str] = {}  # target -> the target whose accumulator it shares
        self.acc: dict[str, dict[str, Statistic]] = {}
        self.group: str | None = None
        self.inputs: dict[str, torch.Tensor] = {}  # record: the current window's input per owner
        self.dense: _Collector | None = None
        self._seen: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [layer.get_submodule(t).register_forward_pre_hook(self._hook(t)) for t in targets]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if name not in self.owner:  # first window: find which targets read the same tensor
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                first, _ = self._seen.setdefault(key, (name, x))  # holding x keeps its address unique
                self.owner[name] = first
                if self.group is None:
                    self.group = first
                if first == name and not self.record and (not self.staged or first == self.group):
                    self.acc[name] = {s: _ACCUMULATORS[s](x.shape[-1]) for s in self.needs}
            owner = self.owner[name]
            if self.staged and owner != self.group:
                raise _Stop
            if owner == name:
                if self.record:
                    self.inputs[name] = x.detach()
                    return
                if self.dense is not None:
                    self.acc[name][CROSS].dense = self.dense.inputs[name]
                for stat in self.acc[name].values():
                    stat.update(x.detach())

        return hook

    def run(self, layer: nn.Module, x: torch.Tensor, kwargs: dict, device: torch.device) -> torch.Tensor | None:
        """The layer's output for `x` (on the CPU), or None where a staged collector stopped the forward."""
        try:
            return _layer_output(layer(x.to(device), **kwargs)).cpu()
        except _Stop:
            return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def finish(self, prefix: str = "") -> dict[str, LinearStats]:
        """Finished statistics per collected target; targets that read the same input share one values dict."""
        values = {owner: {s: a.value() for s, a in acc.items()} for owner, acc in self.acc.items()}
        out = {}
        for t in self.targets:
            if t not in self.owner:
                if self.staged and self.group is not None:
                    continue  # a later stage's target
                raise SvdkitError(
                    f"{prefix}{t} received no input during calibration (an unused or routed projection): "
                    "leave it out with targets=[...]"
                )
            owner = self.owner[t]
            if owner not in self.acc:
                continue  # read a later stage's input
            acc = self.acc[owner]
            tokens = next(iter(acc.values())).tokens if acc else 0
            out[t] = LinearStats(values[owner], tokens, module=prefix + t)
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

    The caller may swap modules inside ``item.layer`` before asking for the next item. The layer goes
    back to its original device afterwards. By default each layer is yielded once, with every target's
    statistics from the dense inputs.

    ``sequential=True`` yields each layer once per distinct input, in the order the forward reaches
    them (q/k/v, then o, then gate/up, then down), each time with only those targets' statistics,
    computed through the layer as the caller has modified it so far (intra-layer sequential, as GPTQ's
    "true sequential"): o_proj's statistics see the compressed q/k/v. Each stage reruns the layer up to
    the input it needs; the next layer's inputs are the fully modified layer's outputs. With ``"cross"``
    in `needs` a second stream of hidden states runs through a dense copy of each layer alongside, and
    each target also gets C = sum x_dense x^T (the least-squares update's cross statistic); this
    doubles the activations held and adds one dense forward per stage.
    """
    needs = set(needs)
    two_streams = CROSS in needs
    if two_streams and not sequential:
        raise SvdkitError("the cross statistic compares dense and compressed inputs: it needs sequential=True")
    prefix = arch.layers_path + "."
    outside_home = next((p.device for n, p in model.named_parameters() if not n.startswith(prefix)), device)
    hidden, layer_kwargs = capture_layer_inputs(model, arch, windows, device, progress)
    dense_hidden = list(hidden) if two_streams else None
    bar = tqdm(total=len(arch.layers), desc="calibrating layers", unit="layer", disable=not progress)
    try:
        for index, layer in enumerate(arch.layers):
            kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in layer_kwargs[index].items()}
            name = f"{arch.layers_path}.{index}."
            home = next(layer.parameters()).device
            layer.to(device)
            try:
                if not sequential:
                    collector = _Collector(layer, arch.targets, needs)
                    try:
                        outputs = [collector.run(layer, x, kwargs, device) for x in hidden]
                    finally:
                        collector.remove()
                    yield LayerStats(index, layer, collector.finish(name))
                    hidden = outputs
                else:
                    yield from _stages(layer, index, name, arch.targets, needs, hidden, dense_hidden, kwargs, device)
                    hidden = [_layer_output(layer(x.to(device), **kwargs)).cpu() for x in hidden]
            finally:
                layer.to(home)
            bar.update(1)
    finally:
        bar.close()
        move_outside_layers(model, arch.layers_path, outside_home)


def _stages(layer, index, name, targets, needs, hidden, dense_hidden, kwargs, device) -> Iterator[LayerStats]:
    """Sequential mode's stages for one layer; advances `dense_hidden` in place through a dense copy."""
    dense_layer = copy.deepcopy(layer) if dense_hidden is not None else None
    pending = list(targets)
    while pending:
        collector = _Collector(layer, pending, needs, staged=True)
        recorder = _Collector(dense_layer, pending, (), staged=True, record=True) if dense_layer else None
        collector.dense = recorder
        try:
            for w, x in enumerate(hidden):
                if recorder is not None:
                    recorder.run(dense_layer, dense_hidden[w], kwargs, device)
                collector.run(layer, x, kwargs, device)
        finally:
            collector.remove()
            if recorder is not None:
                recorder.remove()
        stats = collector.finish(name)
        yield LayerStats(index, layer, stats)
        pending = [t for t in pending if t not in stats]
    if dense_layer is not None:
        dense_hidden[:] = [_layer_output(dense_layer(x.to(device), **kwargs)).cpu() for x in dense_hidden]


def collect_statistics(
    model: nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    needs: Iterable[str],
    device: torch.device,
    progress: bool = True,
    store: StatisticsStore | None = None,
) -> Mapping[str, LinearStats]:
    """Every target's statistics from the dense model, by full module name.

    Input statistics (see :data:`~svdkit.statistics.STATISTICS`) come from one layer-by-layer pass;
    gradient statistics (``fisher``, see :mod:`svdkit.gradients`) from a backward pass. Costs one n x n
    float64 Gram matrix per distinct input (shared by q/k/v and by gate/up): for SmolLM2-135M about
    27 MB per layer, held in CPU memory (a dict is returned), or written layer by layer into `store`
    (a :class:`~svdkit.store.StatisticsStore`, returned) so memory holds one layer. Lets several
    compressions (methods, ratios, allocations) reuse one pass.
    """
    from .gradients import GRADIENT_STATISTICS, collect_fisher

    needs = set(needs)
    unknown = sorted(needs - set(STATISTICS) - GRADIENT_STATISTICS)
    if unknown:
        raise SvdkitError(f"unknown statistic(s) {unknown}; known: {sorted(set(STATISTICS) | GRADIENT_STATISTICS)}")
    out: dict[str, LinearStats] = {}
    hooks = needs - GRADIENT_STATISTICS
    if hooks:
        for item in iterate_layers(model, arch, windows, hooks, device, sequential=False, progress=progress):
            named = {f"{arch.layers_path}.{item.index}.{name}": st for name, st in item.stats.items()}
            if store is not None:
                store.put_layer(item.index, named)
            else:
                out.update(named)
    if "fisher" in needs:
        fisher = collect_fisher(model, arch, windows, device, progress)
        tokens = windows.numel()
        if store is not None:
            for name, rows in fisher.items():
                store.add(name, {"fisher": rows}, tokens)
            return store
        for name, rows in fisher.items():
            st = out.get(name)
            values = {**st.values, "fisher": rows} if st is not None else {"fisher": rows}
            out[name] = LinearStats(values, st.tokens if st is not None else tokens, module=name)
    return store if store is not None else out
