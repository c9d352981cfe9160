"""Block-wise output matching (``--heal block``): each decoder layer's factors are trained so that the
compressed layer, fed the hidden states the already-healed layers before it produce, reproduces the dense
layer's outputs on the dense model's own hidden states (AA-SVD's anchored objective, arXiv 2604.02119):

    min over the factors of layer i   sum_w || L_i^c(X_w^c) - L_i(X_w) ||^2 / || L_i(X_w) ||^2

where X_w is the dense model's input to layer i for window w and X_w^c the compressed model's. Anchoring on
the dense hidden states (not on L_i(X^c)) lets a layer correct the error the layers before it left. The layer
engine (:mod:`svdkit.engine`) keeps both: one layer's dense and compressed hidden states at a time, on the CPU;
the layer trains on the compute device in float32 with Adam, one window a step, under the held-out guard
(:mod:`.guard`, held-out windows: the relative error above), and its closed-form factors stay when
training does not beat them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.options import Options, integer, number, option
from ..core.report import Report, held_out_line
from ..engine import Step, captured, layer_output, walk_layers
from ..errors import SvdkitError
from .base import HealContext, register
from .guard import Guard, split_windows, steps_for
from .logfile import open_log

__all__ = ["BlockConfig", "heal_blocks"]


@dataclass
class BlockConfig(Options):
    epochs: float = option(
        1.0, "passes over the training windows per layer (one window a step)", number(0, lo_open=True)
    )
    max_steps: int = option(64, "at most this many steps per layer", integer(1))
    lr: float = option(1e-4, "Adam learning rate of the factors", number(0, lo_open=True))
    held_out: float = option(
        0.125, "share of the calibration windows held out (at least one)", number(0, 1, lo_open=True, hi_open=True)
    )
    every: int = option(7, "steps between held-out measurements", integer(1))
    patience: int = option(4, "stop a layer after this many held-out measurements without improvement", integer(1))
    seed: int = option(0, "order of the training windows", integer())
    log: str | None = option(None, "a file that receives one JSON line per step and per held-out measurement")


def _factors(layer: nn.Module) -> list[nn.Parameter]:
    return [p for m in layer.modules() if hasattr(m, "rank") and hasattr(m, "A") for p in (m.A, m.B)]


def _relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean()


class BlockHealing:
    """Block healing as work on the layer engine's walk with the dense hidden states (:class:`~.base.LayerHealing`):
    each layer, once factored, trains toward the dense layer's outputs on the dense hidden states, from the
    compressed ones."""

    def __init__(self, context: HealContext, config: BlockConfig) -> None:
        self.context, self.config = context, config
        train, held = split_windows(context.windows, config.held_out, "block healing")
        self.windows = len(train), len(held)
        self.log = open_log(config.log, "block healing")

    def __call__(self, step: Step) -> None:
        t = time.perf_counter()
        if step.next_dense is None:  # the dense layer's outputs: the targets, and the dense hidden states' next inputs
            with self.context.dense.swapped(self.context.model, step.name.removesuffix(".")):
                step.next_dense = step.outputs(step.dense)
        layer, n_train = step.layer, self.windows[0]
        with torch.enable_grad(), _float32(layer, step.kwargs) as kwargs32:
            row = _fit(
                layer, step.hidden, step.next_dense, n_train, kwargs32, self.config, step.device, self.log, step.index
            )
        step.record["block"] = {**row, "seconds": round(time.perf_counter() - t, 3)}
        step.postfix.update(error=f"{row['held_out_best']:.4f}", start=f"{row['held_out_start']:.4f}")

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None

    def report(self, records: list[dict[str, Any]]) -> Report:
        """The mean over the layers of the held-out relative error before and after; every layer's row."""
        rows = [r["block"] for r in records if "block" in r]
        seconds, steps = round(sum(r["seconds"] for r in rows), 2), sum(r["steps_run"] for r in rows)
        start = sum(r["held_out_start"] for r in rows) / len(rows) if rows else None
        best = sum(r["held_out_best"] for r in rows) / len(rows) if rows else None
        return Report(
            seconds,
            steps,
            f"{len(rows)} layers, {steps} steps" + held_out_line(start, best),
            start,
            best,
            {"layers": [{k: v for k, v in r.items() if k != "seconds"} for r in rows]},
            {"train_windows": self.windows[0], "held_out_windows": self.windows[1]},
        )


@register(
    "block",
    BlockConfig,
    "match each compressed decoder layer's output to the dense layer's",
    "AA-SVD (2026)",
    layer=BlockHealing,
)
def heal_blocks(context: HealContext, config: BlockConfig) -> Report:
    """Heal every decoder layer in turn on a walk of its own; the report: per layer, the held-out relative error
    before and after."""
    model, arch, device, progress = context.model, context.arch, context.device, context.progress
    work = BlockHealing(context, config)
    try:
        with captured(model, arch, context.windows, device, progress) as inputs:
            walked = walk_layers(
                arch, device, [work], inputs, keep_dense=True, progress=progress, desc="healing layers"
            )
    finally:
        work.close()
    return work.report(walked.records)


def _fit(layer, xs, ys, n_train, kwargs, config: BlockConfig, device, log, index) -> dict[str, Any]:
    """Train one layer's factors on windows [0, n_train) of (xs -> ys), guarded on the rest."""
    params = _factors(layer)
    steps = steps_for(config.epochs, n_train, 1, config.max_steps)
    if not params:
        return {"layer": index, "steps": 0, "steps_run": 0, "held_out_start": 0.0, "held_out_best": 0.0}

    def loss_on(w: int) -> torch.Tensor:
        out = layer_output(layer, xs[w].float(), kwargs, device, keep=True)
        return _relative_error(out, ys[w].to(device, torch.float32))

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(loss_on(w)) for w in range(n_train, len(xs))) / (len(xs) - n_train)

    frozen = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        guard = Guard(params, held_out, config.every, config.patience)
        opt = torch.optim.Adam(params, lr=config.lr)
        order = _order(n_train, steps, config.seed + index)
        step = 0
        for step, w in enumerate(order, start=1):
            loss = loss_on(int(w))
            if not torch.isfinite(loss):
                raise SvdkitError(
                    f"block healing diverged in layer {index} at step {step}: the loss is {float(loss)}; lower "
                    f"the learning rate (now {config.lr}, heal option block.lr)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _write(log, {"layer": index, "step": step, "loss": float(loss.detach())})
            if guard.check(step, last=step == steps):
                break
        report = guard.finish(step)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    _write(log, {"layer": index, "held_out_curve": report["held_out_curve"]})
    return {"layer": index, "steps": steps, **{k: v for k, v in report.items() if k != "held_out_curve"}}


@contextmanager
def _float32(layer: nn.Module, kwargs: dict) -> Iterator[dict]:
    """Within the block the layer (and the floating tensors of its keyword arguments) are float32: Adam's
    small steps vanish in bfloat16. The layer returns to its dtype afterwards, the trained factors rounded."""
    dtype = next(layer.parameters()).dtype
    if dtype == torch.float32:
        yield kwargs
        return
    layer.float()
    try:
        yield {k: _cast(v) for k, v in kwargs.items()}
    finally:
        layer.to(dtype)


def _cast(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.float() if v.is_floating_point() else v
    if isinstance(v, tuple | list):
        return type(v)(_cast(x) for x in v)
    return v


def _order(n: int, steps: int, seed: int) -> torch.Tensor:
    """`steps` window indices: shuffled passes over range(n)."""
    g = torch.Generator().manual_seed(seed)
    passes = -(-steps // n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(passes)])[:steps]


def _write(log, row: dict) -> None:
    if log is not None:
        log.write(json.dumps(row) + "\n")
        log.flush()
