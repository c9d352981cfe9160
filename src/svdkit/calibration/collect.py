"""Input statistics of every target linear, collected on the layer engine (:mod:`svdkit.engine`).

Linears fed the very same tensor (q/k/v, gate/up) share one accumulator, so each Gram matrix is
computed once. :func:`calibrate_layers` hands each layer with its finished statistics to a callable,
which may replace modules in that layer before the walk goes on. By default the next layer's inputs are the
dense layer's outputs; with ``sequential=True`` every input (within a layer too) is recomputed through
the modules modified so far. :func:`collect_statistics` runs the whole pass (and the gradient pass for
Fisher information) and returns every target's statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.architecture import Architecture
from ..engine import LayerSource, Step, Work, captured, layer_output, walk_layers
from ..errors import SvdkitError
from .gradients import GRADIENT_COLLECTORS, GRADIENT_STATISTICS
from .statistics import STATISTICS, LinearStats, Statistic
from .store import StatisticsStore

CROSS = "cross"
"""dense inputs against compressed inputs, mean of x_dense x^T (sequential calibration, dense hidden states kept)"""

__all__ = ["CROSS", "LayerStats", "calibrate_layers", "collect_statistics"]


@dataclass
class LayerStats:
    """What :func:`calibrate_layers` hands its user: a decoder layer and its targets' statistics."""

    index: int
    layer: nn.Module
    stats: dict[str, LinearStats]
    """target name relative to the layer (e.g. 'self_attn.q_proj') -> statistics"""


class _Cross(Statistic):
    """Mean over tokens of x_dense x^T (n x n, float64): the dense layer's inputs against the compressed
    model's inputs for the same tokens (sequential calibration; see :mod:`svdkit.pipeline.update`)."""

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
        return (self.total / max(self.tokens, 1)).cpu()


_ACCUMULATORS: dict[str, type[Statistic]] = {**STATISTICS, CROSS: _Cross}


class _Stop(Exception):
    """Raised by a staged collector's hook once the layer's forward has passed the input it collects."""


class _Collector:
    """Hooks on one layer's target linears that feed each distinct input once into shared statistics.

    Staged (sequential calibration): only the first distinct input the forward reaches among the hooked
    targets is collected (the ``group``: q/k/v, or o, or gate/up, or down), and the forward stops at
    the next one. With ``record=True`` the hooks only keep each group input (the dense hidden states); a
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
            return layer_output(layer, x, kwargs, device)
        except _Stop:
            return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()

    def finish(self, prefix: str = "") -> dict[str, LinearStats]:
        """Finished statistics per collected target (summed over the processes of a distributed run); targets
        that read the same input share one values dict."""
        for acc in self.acc.values():
            for stat in acc.values():
                stat.reduce()
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


def calibrate_layers(
    model: nn.Module,
    arch: Architecture,
    windows: torch.Tensor,
    needs: Iterable[str],
    device: torch.device,
    use: Callable[[LayerStats], None],
    sequential: bool = False,
    progress: bool = True,
    source: LayerSource | None = None,
    desc: str = "calibrating layers",
    then: Sequence[Work] = (),
) -> list[dict[str, Any]]:
    """Hand `use` every decoder layer (on `device`) with its targets' statistics, in order, on the layer
    engine (:func:`~svdkit.engine.walk.walk_layers`).

    `use` may swap modules inside ``item.layer``; the layer goes back to its original device afterwards.
    By default each layer comes once, with every target's statistics from the dense inputs, and the next
    layer's inputs are the dense layer's outputs.

    ``sequential=True`` hands each layer once per distinct input, in the order the forward reaches
    them (q/k/v, then o, then gate/up, then down), each time with only those targets' statistics,
    computed through the layer as `use` has modified it so far (intra-layer sequential, as GPTQ's
    "true sequential"): o_proj's statistics see the compressed q/k/v. Each stage reruns the layer up to
    the input it needs; the next layer's inputs are the fully modified layer's outputs. With ``"cross"``
    in `needs` the dense hidden states run through a dense copy of each layer alongside, and
    each target also gets C = mean x_dense x^T (the least-squares update's cross statistic); this
    doubles the activations held and adds one dense forward per stage.

    `then` is more work on each layer after `use` (block healing, see :mod:`svdkit.heal.block`): with it the
    walk keeps the dense model's hidden states beside those of the layers as changed, and the default mode's
    statistics come from the dense ones, as without it. `source` (a :class:`~svdkit.engine.walk.LayerSource`)
    loads each layer before it runs and takes it once final, and may start the walk at a later layer. `desc`
    names the progress bar. Returns every layer's record (:attr:`~svdkit.engine.walk.Step.record`).
    """
    needs = set(needs)
    if CROSS in needs and not sequential:
        raise SvdkitError("the cross statistic compares dense and compressed inputs: it needs sequential=True")
    if then and sequential:
        raise SvdkitError("work after sequential calibration would change the inputs its statistics come from")
    work = _staged(arch.targets, needs, use) if sequential else _dense(arch.targets, needs, use)
    keep_dense = CROSS in needs or bool(then)
    with captured(model, arch, windows, device, progress) as inputs:
        walk = [work, *then]
        return walk_layers(
            arch, device, walk, inputs, keep_dense=keep_dense, source=source, progress=progress, desc=desc
        ).records


def _dense(targets: list[str], needs: set[str], use: Callable[[LayerStats], None]) -> Work:
    """Every target's statistics from the dense model's inputs to the layer (kept beside the changed ones where
    the walk keeps both); its next inputs are the layer's outputs before `use` changes it."""

    def work(step: Step) -> None:
        xs = step.hidden if step.dense is None else step.dense
        collector = _Collector(step.layer, targets, needs)
        try:
            outputs = [collector.run(step.layer, x, step.kwargs, step.device) for x in xs]
        finally:
            collector.remove()
        if step.dense is None:
            step.next_hidden = outputs
        else:
            step.next_dense = outputs
        use(LayerStats(step.index, step.layer, collector.finish(step.name)))

    return work


def _staged(targets: list[str], needs: set[str], use: Callable[[LayerStats], None]) -> Work:
    """Sequential mode's stages for one layer; the dense hidden states advance through a dense copy."""

    def work(step: Step) -> None:
        layer, kwargs, device = step.layer, step.kwargs, step.device
        dense_layer = copy.deepcopy(layer) if step.dense is not None else None
        pending = list(targets)
        while pending:
            collector = _Collector(layer, pending, needs, staged=True)
            recorder = _Collector(dense_layer, pending, (), staged=True, record=True) if dense_layer else None
            collector.dense = recorder
            try:
                for w, x in enumerate(step.hidden):
                    if recorder is not None:
                        recorder.run(dense_layer, step.dense[w], kwargs, device)
                    collector.run(layer, x, kwargs, device)
            finally:
                collector.remove()
                if recorder is not None:
                    recorder.remove()
            stats = collector.finish(step.name)
            pending = [t for t in pending if t not in stats]  # before `use` takes (and may drop) them
            use(LayerStats(step.index, layer, stats))
            stats = None
        if dense_layer is not None:
            step.next_dense = step.outputs(step.dense, dense_layer)

    return work


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

    Input statistics (see :data:`~svdkit.calibration.statistics.STATISTICS`) come from one layer-by-layer pass;
    gradient statistics (``fisher``, see :mod:`svdkit.calibration.gradients`) from a backward pass each. Costs one n x n
    float64 Gram matrix per distinct input (shared by q/k/v and by gate/up): for SmolLM2-135M about
    27 MB per layer, held in CPU memory (a dict is returned), or written layer by layer into `store`
    (a :class:`~svdkit.calibration.store.StatisticsStore`, returned) so memory holds one layer. Lets several
    compressions (methods, ratios, allocations) reuse one pass.
    """
    needs = set(needs)
    unknown = sorted(needs - set(STATISTICS) - GRADIENT_STATISTICS)
    if unknown:
        raise SvdkitError(f"unknown statistic(s) {unknown}; known: {sorted(set(STATISTICS) | GRADIENT_STATISTICS)}")
    out: dict[str, LinearStats] = {}
    hooks = needs - GRADIENT_STATISTICS
    if hooks:

        def keep(item: LayerStats) -> None:
            named = {f"{arch.layers_path}.{item.index}.{name}": st for name, st in item.stats.items()}
            if store is not None:
                store.put_layer(item.index, named)
            else:
                out.update(named)

        calibrate_layers(model, arch, windows, hooks, device, keep, progress=progress)
    for statistic in sorted(needs & GRADIENT_STATISTICS):
        collected = GRADIENT_COLLECTORS[statistic](model, arch, windows, device, progress)
        tokens = windows.numel()
        for name, rows in collected.items():
            if store is not None:
                store.add(name, {statistic: rows}, tokens)
                continue
            st = out.get(name)
            values = {**st.values, statistic: rows} if st is not None else {statistic: rows}
            out[name] = LinearStats(values, st.tokens if st is not None else tokens, module=name)
    return store if store is not None else out
