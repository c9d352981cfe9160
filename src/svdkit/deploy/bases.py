"""qlr's quantized bases in an export: traced as float MatMuls, written back as MatMulNBits of their own codes.

A layer with a quantized base (``qlr``'s QuantLowRankLinear, y = Q x + B (A x) + bias) is traced in one of two
forms (:func:`traced_as_float`):

- *apart*: Q x as a MatMul of the dequantized base, plus the pair's two MatMuls and an Add;
- *joined*, where the export stores the pairs at the base's own bits and block size, rounded to nearest
  (``--weights int4 --block-size 32 --quantizer rtn`` for a 4-bit base in blocks of 32), and the base's
  blocks end where its inputs do: y = [Q | B'] [x ; A x] + bias, one MatMul over the inputs and the rank-k
  latent together, B' being B rounded to nearest at those bits and block (exactly what B's own MatMulNBits
  would hold). Per target one matrix product and one Add fewer at decode, the same bytes.

:func:`native_bases` then finds each traced base by its values (the exporter names folded weights freely)
and replaces its MatMul by a MatMulNBits of the codes: Q's own (no requantization), joined with B''s.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SvdkitError
from ..methods.blockquant import dequantize, pack, round_to_nearest

__all__ = ["NativeBase", "native_bases", "traced_as_float"]


@dataclass(frozen=True)
class NativeBase:
    """A base as :func:`native_bases` writes it: its float matrix as traced (N x K), and its MatMulNBits codes."""

    weight: torch.Tensor
    qweight: torch.Tensor
    """uint8 (N, blocks, block * bits / 8), MatMulNBits' layout"""
    scales: torch.Tensor
    bits: int
    block: int


def _apart(layer: nn.Module) -> NativeBase:
    weight = layer.quantized_weight().detach().float()
    return NativeBase(weight, layer.qweight, layer.scales.detach().float(), layer.bits, layer.block)


def _joined(layer: nn.Module) -> NativeBase:
    """[Q | B'] with B' the pair's B rounded to nearest at the base's bits and block."""
    codes, scales = round_to_nearest(layer.B.detach().double(), layer.bits, layer.block)
    codes = torch.cat([layer.codes(), codes.to(torch.int16)], dim=1)
    scales = torch.cat([layer.scales.detach().double(), scales], dim=1)
    weight = dequantize(codes, scales, layer.block).float()
    return NativeBase(weight, pack(codes, layer.bits, layer.block), scales.float(), layer.bits, layer.block)


class _Traced(nn.Module):
    """What an export traces in place of a QuantLowRankLinear: its base (apart, or joined with B) as a float
    matrix, and its pair."""

    def __init__(self, layer: nn.Module, base: NativeBase, joined: bool):
        super().__init__()
        self.base = nn.Parameter(base.weight, requires_grad=False)
        self.A, self.B, self.bias, self.joined = layer.A, layer.B, layer.bias, joined

    def forward(self, x):
        latent = F.linear(x, self.A)
        if self.joined:
            return F.linear(torch.cat([x, latent], dim=-1), self.base, self.bias)
        return F.linear(x, self.base, self.bias) + F.linear(latent, self.B)


def _joins(layer: nn.Module, bits: int | None, block: int | None, quantizer: str | None) -> bool:
    """True when the export stores `layer`'s pair as its base is stored (rounded to nearest at the base's bits and
    block), and the base's blocks end where its inputs do: B then joins the base's MatMulNBits."""
    same = (bits, block, quantizer) == (layer.bits, layer.block, "rtn")
    return same and layer.in_features % layer.block == 0


@contextmanager
def traced_as_float(model: nn.Module, pairs: tuple | None = None) -> Iterator[dict[str, NativeBase]]:
    """Each layer of `model` with a quantized base (a ``qweight``) traced as :class:`_Traced`, joined with its B
    where :func:`_joins` says so for `pairs` = (bits, block, quantizer) of the export's pairs (None: float
    pairs); yields {name: its :class:`NativeBase`}, and puts the layers back after."""
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "qweight")}
    bases = {}
    for name, layer in layers.items():
        joined = pairs is not None and _joins(layer, *pairs)
        bases[name] = _joined(layer) if joined else _apart(layer)
        model.set_submodule(name, _Traced(layer, bases[name], joined))
    try:
        yield bases
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)


def _digest(values: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(values, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def native_bases(model, bases: dict[str, NativeBase]) -> int:
    """Replace, in the onnx ModelProto `model`, each MatMul that reads a traced base (:func:`traced_as_float`;
    found by its values) by a MatMulNBits of the base's codes and scales; returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    wanted = {_digest(base.weight.T.cpu().numpy()): (n, base) for n, base in bases.items()}
    stale, count = set(), 0
    for node in [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]:
        hit = wanted.get(_digest(numpy_helper.to_array(weights[node.input[1]])))
        if hit is None:
            continue
        name, base = hit
        codes = numpy_helper.from_array(base.qweight.cpu().numpy(), f"{name}.qweight")
        scales = numpy_helper.from_array(base.scales.cpu().numpy(), f"{name}.scales")
        graph.initializer.extend([codes, scales])
        n, k = base.weight.shape
        sizes = {"K": k, "N": n, "bits": base.bits, "block_size": base.block}
        native = helper.make_node(
            "MatMulNBits", [node.input[0], codes.name, scales.name], list(node.output), domain="com.microsoft", **sizes
        )
        graph.node.insert(list(graph.node).index(node), native)
        graph.node.remove(node)
        stale.add(node.input[1])
        count += 1
    used = {name for node in graph.node for name in node.input}
    for t in [t for t in graph.initializer if t.name in stale and t.name not in used]:
        graph.initializer.remove(t)
    if count != len(bases):
        raise SvdkitError(f"the export found {count} of the {len(bases)} quantized bases in the traced graph")
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count
